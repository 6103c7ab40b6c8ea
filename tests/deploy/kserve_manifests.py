"""deploy/kserve: the ServingRuntime and InferenceService, checked offline.

Each object is validated against the resource models the kserve package ships (see
resource_models.py: unknown fields, types, required fields, enums), its pod parts against
the Kubernetes schemas (kubernetes-validate, strict), and the wiring against what the
image and the server really do: the flags parse with `visionrpc serve`'s own parser, the
ports are the image's, the autoscaling query names a metric the server exports.
No KServe cluster runs here, so the tritonclient call through it is the README's only.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import kserve.constants
import kserve.model_repository
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.deploy.resource_models import InvalidResource, check
from visionrpc.server import cli as serve_cli
from visionrpc.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"

Manifest = dict[str, Any]


def load(name: str) -> Manifest:
    manifest: Manifest = yaml.safe_load((KSERVE / name).read_text())
    return manifest


@pytest.fixture
def runtime() -> Manifest:
    return load("servingruntime.yaml")


@pytest.fixture
def service() -> Manifest:
    return load("inferenceservice.yaml")


def container_of(runtime: Manifest) -> Manifest:
    (container,) = runtime["spec"]["containers"]
    result: Manifest = container
    return result


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"\b(VISIONRPC_\w+)=(\S+)", text))


def test_the_serving_runtime_matches_kserves_resource_model(runtime: Manifest) -> None:
    assert (runtime["apiVersion"], runtime["kind"]) == (
        kserve.constants.KSERVE_V1ALPHA1,
        "ServingRuntime",
    )
    check(runtime, "V1alpha1ServingRuntime")


def test_the_inference_service_matches_kserves_resource_model(service: Manifest) -> None:
    assert (service["apiVersion"], service["kind"]) == (
        kserve.constants.KSERVE_V1BETA1,
        kserve.constants.KSERVE_KIND_INFERENCESERVICE,
    )
    check(service, "V1beta1InferenceService")


@pytest.mark.parametrize(
    ("path", "change", "complaint"),
    [
        (
            ("spec", "predictor", "model"),
            {"storageURI": "pvc://x"},
            "unknown field(s) ['storageURI']",
        ),
        (("spec", "predictor", "model", "ports", 0), {"containerPort": "8001"}, "expected int"),
        (("spec", "predictor"), {"minReplicas": True}, "expected int"),
    ],
)
def test_the_validation_refuses_a_misspelt_field_or_a_wrong_type(
    service: Manifest, path: tuple[str | int, ...], change: Manifest, complaint: str
) -> None:
    target: Any = service
    for key in path:
        target = target[key]
    target.update(change)
    with pytest.raises(InvalidResource, match=re.escape(complaint)):
        check(service, "V1beta1InferenceService")


def test_the_validation_refuses_a_missing_required_field(service: Manifest) -> None:
    del service["spec"]["predictor"]["model"]["modelFormat"]
    with pytest.raises(InvalidResource, match="model_format"):
        check(service, "V1beta1InferenceService")


def test_the_runtime_container_is_a_valid_kubernetes_container(runtime: Manifest) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "visionrpc"},
        "spec": {"containers": runtime["spec"]["containers"]},
    }
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_the_runtime_speaks_grpc_v2_on_a_port_named_h2c_that_the_image_serves(
    runtime: Manifest, service: Manifest
) -> None:
    protocols = {protocol.value for protocol in kserve.constants.PredictorProtocol}
    assert set(runtime["spec"]["protocolVersions"]) <= protocols
    assert kserve.constants.PredictorProtocol.GRPC_V2.value in runtime["spec"]["protocolVersions"]
    assert service["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2"
    container = container_of(runtime)
    # KServe runs the model server from the container of this name.
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]
    assert (port["name"], str(port["containerPort"])) == ("h2c", dockerfile_env()["VISIONRPC_PORT"])
    # The same port; named h2c for Knative, grpc-<suffix> for Istio in RawDeployment.
    (service_port,) = service["spec"]["predictor"]["model"]["ports"]
    assert service_port["containerPort"] == port["containerPort"]
    assert service_port["name"].startswith("grpc")
    assert container["readinessProbe"]["grpc"] == {"port": port["containerPort"]}
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == dockerfile_env()["VISIONRPC_METRICS_PORT"]


def test_the_inference_service_selects_this_runtime_and_its_model_format(
    runtime: Manifest, service: Manifest
) -> None:
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://", "https://"))


def test_the_server_reads_its_repository_where_the_storage_initializer_puts_it(
    runtime: Manifest,
) -> None:
    container = container_of(runtime)
    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", *container["args"]])
    environ = {**dockerfile_env(), **{e["name"]: e["value"] for e in container["env"]}}
    settings = serve_cli.settings_from_args(args, environ)
    assert str(settings.repository) == kserve.model_repository.MODEL_MOUNT_DIRS
    assert settings.port == int(container["ports"][0]["containerPort"])
    assert settings.host == "0.0.0.0"


def test_autoscaling_scales_on_the_queue_depth_the_server_exports(
    runtime: Manifest, service: Manifest
) -> None:
    assert service["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == (
        "RawDeployment"
    )
    (metric,) = service["spec"]["predictor"]["autoScaling"]["metrics"]
    query = metric["external"]["metric"]["query"]
    (name,) = re.findall(r"\b(visionrpc_\w+)\{", query)
    exported = {family.name for family in ServerMetrics().registry.collect()}
    assert name in exported
    # KServe names the predictor's pods <InferenceService>-predictor-...
    assert f'pod=~"{service["metadata"]["name"]}-predictor-.*"' in query
    batch = {e["name"]: e["value"] for e in container_of(runtime)["env"]}[
        "VISIONRPC_MAX_BATCH_SIZE"
    ]
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": batch}
