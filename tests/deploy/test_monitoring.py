"""deploy/k8s/monitoring and the GPU overlay's autoscaler, checked offline.

The ServiceMonitor is validated with the schemas @kubernetes-models/prometheus-operator
generates from the operator's API types (tests/deploy/validate_prometheus_operator.mjs),
then matched against the Services `kubectl kustomize` renders. The GPU overlay's HPA
scales on the per-pod custom metric that prometheus-adapter's rule serves, from a gauge
the server exports; every PromQL expression here (the adapter's, KServe's KEDA query)
is parsed by the real promtool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.container.engine import missing_or_skip
from visionrpc.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VALIDATOR = Path(__file__).with_name("validate_prometheus_operator.mjs")

Manifest = dict[str, Any]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    missing_or_skip([] if found else [f"{name} is not installed"])
    assert found is not None
    return found


def render(kustomization: str) -> dict[tuple[str, str], Manifest]:
    output = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(output) if d}


def load(name: str) -> Manifest:
    manifest: Manifest = yaml.safe_load((K8S / "monitoring" / name).read_text())
    return manifest


def validate_operator_objects(*objects: Manifest) -> subprocess.CompletedProcess[str]:
    installed = (ROOT / "node_modules" / "@kubernetes-models").is_dir()
    missing_or_skip([] if installed else ["the Node tools are not installed (make node-deps)"])
    return subprocess.run(
        [tool("node"), str(VALIDATOR)],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=60,
    )


def promql_parses(*expressions: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = {
        "groups": [
            {
                "name": "expressions",
                "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(expressions)],
            }
        ]
    }
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run(
        [tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


def test_the_service_monitor_matches_the_prometheus_operator_schema() -> None:
    done = validate_operator_objects(load("servicemonitor.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_refuses_a_malformed_service_monitor() -> None:
    broken = load("servicemonitor.yaml")
    broken["spec"]["endpoints"][0]["interval"] = "15 seconds"
    done = validate_operator_objects(broken)
    assert done.returncode == 1
    assert "endpoints/0/interval must match pattern" in done.stdout


def test_the_service_monitor_scrapes_the_metrics_port_of_one_service_only() -> None:
    monitor = load("servicemonitor.yaml")["spec"]
    services = [doc for (kind, _), doc in render("base").items() if kind == "Service"]
    wanted = monitor["selector"]["matchLabels"].items()
    selected = [s for s in services if wanted <= s["metadata"].get("labels", {}).items()]
    # The headless Service fronts the same pods: selecting it too would scrape them twice.
    assert [s["metadata"]["name"] for s in selected] == ["visionrpc"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {port["name"] for port in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_the_gpu_overlay_scales_on_queue_depth_and_the_cpu_base_on_cpu() -> None:
    base = render("base")["HorizontalPodAutoscaler", "visionrpc"]["spec"]
    gpu_objects = render("overlays/gpu")
    gpu = gpu_objects["HorizontalPodAutoscaler", "visionrpc"]["spec"]
    assert [m["resource"]["name"] for m in base["metrics"]] == ["cpu"]
    (metric,) = gpu["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "visionrpc_queue_depth"
    # The target is one full batch waiting per pod.
    (container,) = gpu_objects["Deployment", "visionrpc"]["spec"]["template"]["spec"]["containers"]
    batch = {e["name"]: e.get("value") for e in container["env"]}["VISIONRPC_MAX_BATCH_SIZE"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": batch}
    # Scaling and everything else of the base stay.
    assert (gpu["minReplicas"], gpu["maxReplicas"], gpu["behavior"]) == (
        base["minReplicas"],
        base["maxReplicas"],
        base["behavior"],
    )


def test_the_adapter_serves_the_metric_the_hpa_reads_from_a_gauge_the_server_exports(
    tmp_path: Path,
) -> None:
    (rule,) = load("prometheus-adapter-values.yaml")["rules"]["custom"]
    gpu = render("overlays/gpu")["HorizontalPodAutoscaler", "visionrpc"]["spec"]
    assert rule["name"]["as"] == gpu["metrics"][0]["pods"]["metric"]["name"]
    series = rule["seriesQuery"].split("{", 1)[0]
    families = {family.name: family.type for family in ServerMetrics().registry.collect()}
    assert families.get(series) == "gauge"
    # Per pod, as the Pods metric type needs; the operator's scrape adds these labels.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # The adapter fills the template in; promtool must parse what it sends Prometheus.
    expanded = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"visionrpc-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    keda = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    (scaler,) = keda["spec"]["predictor"]["autoScaling"]["metrics"]
    done = promql_parses(
        rule["seriesQuery"], expanded, scaler["external"]["metric"]["query"], tmp_path=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    done = promql_parses("sum(visionrpc_queue_depth{pod=~}) by (pod)", tmp_path=tmp_path)
    assert done.returncode != 0
