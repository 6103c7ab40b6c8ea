"""The deploy/ files against the code: promtool validates exposition, rules and config, the
alert unit tests pass, and the dashboard and alerts only name metrics the server exposes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.prometheus import require_binary
from visionrpc.server.metrics import GPU_MEMORY_USED, GPU_UTILIZATION

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "visionrpc-dashboard.json"
METRIC_NAME = re.compile(r"\bvisionrpc_[a-z0-9_]+\b")
ALERTS = {
    "VisionRPCHighErrorRatio",
    "VisionRPCHighP99Latency",
    "VisionRPCQueueSaturation",
    "VisionRPCModelLoadFailure",
    "VisionRPCConfidenceDrift",
}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=PROMETHEUS_DIR,
        timeout=120,
        check=False,
    )


def exposed_names(exposition: str) -> set[str]:
    names = {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    return names | {GPU_MEMORY_USED, GPU_UTILIZATION}


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS_DIR / "alerts.yaml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_accepts_the_exposition(exercised_exposition: str) -> None:
    result = promtool("check", "metrics", stdin=exercised_exposition)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_flags_a_badly_named_metric() -> None:
    # Proves the check above reads its input: promtool's linter rejects this one.
    bad = "# HELP latency_ms Latency.\n# TYPE latency_ms counter\nlatency_ms 1\n"
    result = promtool("check", "metrics", stdin=bad)
    assert result.returncode != 0
    assert "latency_ms" in result.stdout + result.stderr


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {rule["alert"] for rule in alert_rules()} == ALERTS


def test_every_alert_fires_on_its_failure_and_stays_quiet_when_healthy() -> None:
    result = promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yaml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert fired == ALERTS
    assert quiet | {"VisionRPCModelLoadFailure"} == ALERTS


def test_compose_prometheus_config_is_valid_and_scrapes_the_server() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert targets == ["visionrpc:8002"]
    assert config["rule_files"] == ["alerts.yaml"]


def test_alerts_name_only_exposed_metrics(exercised_exposition: str) -> None:
    exposed = exposed_names(exercised_exposition)
    for rule in alert_rules():
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, rule["alert"]
        assert used <= exposed, (rule["alert"], used - exposed)


def test_dashboard_names_only_exposed_metrics(exercised_exposition: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_names(exercised_exposition)
    exprs = dashboard_exprs(dashboard)
    assert exprs
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used <= exposed, used - exposed
    families = {name.removesuffix(s) for name in used for s in ("_bucket", "_sum", "_count")}
    # The panels the brief asks for, by the families they read.
    for family in (
        "visionrpc_images_total",
        "visionrpc_requests_total",
        "visionrpc_request_duration_seconds",
        "visionrpc_queue_wait_seconds",
        "visionrpc_batch_size",
        "visionrpc_queue_depth",
        "visionrpc_queue_capacity",
        "visionrpc_top1_confidence",
        "visionrpc_multilabel_empty_results_total",
        "visionrpc_point_position",
        "visionrpc_tta_images_total",
        GPU_MEMORY_USED,
        GPU_UTILIZATION,
    ):
        assert family in families, family


def test_dashboard_takes_its_datasource_and_models_from_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "visionrpc_model_info" in variables["model"]["definition"]
    panel_ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(panel_ids) == len(set(panel_ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for expr in (target["expr"] for target in panel["targets"]):
            # GPU and gRPC families have no model label.
            if "visionrpc_gpu_" not in expr and "grpc_server_" not in expr:
                assert 'model=~"$model"' in expr, (panel["title"], expr)
