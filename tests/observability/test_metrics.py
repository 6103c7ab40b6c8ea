"""ServerMetrics against its own registry: the agreed families, labels and buckets, and what
each event method records."""

from __future__ import annotations

import types
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.traffic import exercise
from visionrpc.server.metrics import (
    GPU_MEMORY_USED,
    GPU_UTILIZATION,
    UNKNOWN,
    GpuCollector,
    ServerMetrics,
    gpu_collector,
)

LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
MV = ("model", "version")

# The agreed table (notes/metrics.md), written out here independently of server/metrics.py.
AGREED: dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]] = {
    "visionrpc_requests_total": ("counter", (*MV, "code"), None),
    "visionrpc_images_total": ("counter", (*MV, "code"), None),
    "visionrpc_request_duration_seconds": ("histogram", (*MV, "code"), LATENCY),
    "visionrpc_queue_wait_seconds": ("histogram", MV, LATENCY),
    "visionrpc_preprocess_seconds": ("histogram", ("model",), LATENCY),
    "visionrpc_inference_batch_seconds": ("histogram", MV, LATENCY),
    "visionrpc_batch_size": ("histogram", MV, (1, 2, 4, 8, 16, 32, 64, 128)),
    "visionrpc_queue_depth": ("gauge", MV, None),
    "visionrpc_queue_capacity": ("gauge", MV, None),
    "visionrpc_in_flight_requests": ("gauge", ("model",), None),
    "visionrpc_queue_rejections_total": ("counter", MV, None),
    "visionrpc_deadline_drops_total": ("counter", MV, None),
    "visionrpc_model_info": ("gauge", (*MV, "task", "provider"), None),
    "visionrpc_model_load_failures_total": ("counter", ("model",), None),
    "visionrpc_model_warmup_seconds": ("gauge", MV, None),
    "visionrpc_top1_confidence": (
        "histogram",
        MV,
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    ),
    "visionrpc_multilabel_labels_per_image": ("histogram", MV, (0, 1, 2, 3, 4, 5, 8, 13, 21)),
    "visionrpc_multilabel_empty_results_total": ("counter", MV, None),
    "visionrpc_point_position": (
        "histogram",
        (*MV, "axis"),
        (-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1),
    ),
    "visionrpc_tta_images_total": ("counter", MV, None),
}
# The names go-grpc-prometheus and py-grpc-prometheus give the standard server families.
GRPC_METHOD = ("grpc_type", "grpc_service", "grpc_method")
GRPC_AGREED: dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None]] = {
    "grpc_server_started_total": ("counter", GRPC_METHOD, None),
    "grpc_server_handled_total": ("counter", (*GRPC_METHOD, "grpc_code"), None),
    "grpc_server_handling_seconds": ("histogram", GRPC_METHOD, LATENCY),
    "grpc_server_msg_received_total": ("counter", GRPC_METHOD, None),
    "grpc_server_msg_sent_total": ("counter", GRPC_METHOD, None),
}


def family_name(agreed: str, kind: str) -> str:
    # The text parser names a counter family without its _total suffix.
    return agreed.removesuffix("_total") if kind == "counter" else agreed


def test_every_agreed_family_is_exposed_with_its_type_and_labels(
    exercised_exposition: str,
) -> None:
    families = {f.name: f for f in text_string_to_metric_families(exercised_exposition)}
    for name, (kind, labels, _) in (AGREED | GRPC_AGREED).items():
        family = families.get(family_name(name, kind))
        assert family is not None, f"{name} missing"
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            assert set(sample.labels) - {"le"} == set(labels), (name, sample)


def test_histograms_use_the_agreed_buckets(exercised_exposition: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(exercised_exposition)}
    for name, (_, _, buckets) in (AGREED | GRPC_AGREED).items():
        if buckets is None:
            continue
        family = families[name]
        first_series = family.samples[0].labels | {"le": ""}
        bounds = [
            float(sample.labels["le"])
            for sample in family.samples
            if sample.name == f"{name}_bucket" and sample.labels | {"le": ""} == first_series
        ]
        assert bounds == [*map(float, buckets), float("inf")], name


def test_only_agreed_families_carry_the_visionrpc_prefix(exercised_exposition: str) -> None:
    exposed = {
        f.name
        for f in text_string_to_metric_families(exercised_exposition)
        if f.name.startswith("visionrpc_") and not f.name.endswith("_created")
    }
    expected = {family_name(name, kind) for name, (kind, _, _) in AGREED.items()}
    assert exposed - {GPU_MEMORY_USED, GPU_UTILIZATION} == expected


def test_default_registry_carries_process_collectors_and_servers_do_not_collide() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    for metrics in (first, second):
        assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None
        assert metrics.registry.get_sample_value("python_info", _python_info(metrics)) == 1.0
    first.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    first.request_finished("pets", "1", "OK", images=1, seconds=0.01)
    assert _requests(first, "pets", "1", "OK") == 1.0
    assert _requests(second, "pets", "1", "OK") is None


def _python_info(metrics: ServerMetrics) -> dict[str, str]:
    for family in metrics.registry.collect():
        if family.name == "python_info":
            return family.samples[0].labels
    raise AssertionError("python_info missing")


def _requests(metrics: ServerMetrics, model: str, version: str, code: str) -> float | None:
    return metrics.registry.get_sample_value(
        "visionrpc_requests_total", {"model": model, "version": version, "code": code}
    )


def test_gpu_gauges_exist_exactly_when_a_gpu_can_be_read() -> None:
    exposed = {family.name for family in ServerMetrics().registry.collect()}
    collector = gpu_collector()
    if collector is None:
        assert not exposed & {GPU_MEMORY_USED, GPU_UTILIZATION}
    else:
        assert {GPU_MEMORY_USED, GPU_UTILIZATION} <= exposed
        for family in collector.collect():
            assert {sample.labels["gpu"] for sample in family.samples} >= {"0"}


def test_a_successful_request_leaves_image_counts_to_image_finished(
    metrics: ServerMetrics,
) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    metrics.request_finished("pets", "1", "OK", images=3, seconds=0.05)
    for code in ("OK", "OK", "INVALID_ARGUMENT"):
        metrics.image_finished("pets", "1", code)
    images = {"model": "pets", "version": "1"}
    get = metrics.registry.get_sample_value
    assert get("visionrpc_images_total", images | {"code": "OK"}) == 2.0
    assert get("visionrpc_images_total", images | {"code": "INVALID_ARGUMENT"}) == 1.0
    ok = images | {"code": "OK"}
    assert get("visionrpc_request_duration_seconds_count", ok) == 1.0
    assert get("visionrpc_request_duration_seconds_sum", ok) == pytest.approx(0.05)


def test_a_failed_request_counts_its_images_under_its_status(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    metrics.request_finished("pets", "1", "RESOURCE_EXHAUSTED", images=4, seconds=0.001)
    labels = {"model": "pets", "version": "1", "code": "RESOURCE_EXHAUSTED"}
    assert metrics.registry.get_sample_value("visionrpc_images_total", labels) == 4.0
    assert metrics.registry.get_sample_value("visionrpc_requests_total", labels) == 1.0


def test_names_never_loaded_are_recorded_as_unknown(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    for typo in ("pest", "p3ts", "dogs"):
        metrics.request_finished(typo, "1", "NOT_FOUND", images=1, seconds=0.001)
    metrics.request_finished("pets", "99", "NOT_FOUND", images=1, seconds=0.001)
    metrics.request_finished("pets", "", "INVALID_ARGUMENT", images=1, seconds=0.001)
    metrics.preprocess_observed("dogs", 0.01)
    assert _requests(metrics, UNKNOWN, "", "NOT_FOUND") == 3.0
    assert _requests(metrics, "pets", UNKNOWN, "NOT_FOUND") == 1.0
    assert _requests(metrics, "pets", "", "INVALID_ARGUMENT") == 1.0
    assert _requests(metrics, "pest", "1", "NOT_FOUND") is None
    assert (
        metrics.registry.get_sample_value("visionrpc_preprocess_seconds_count", {"model": UNKNOWN})
        == 1.0
    )


def test_in_flight_counts_a_request_from_its_start_to_its_end(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)

    def in_flight() -> float | None:
        return metrics.registry.get_sample_value("visionrpc_in_flight_requests", {"model": "pets"})

    metrics.request_started("pets")
    metrics.request_started("pets")
    assert in_flight() == 2.0
    metrics.request_finished("pets", "1", "OK", images=1, seconds=0.01)
    metrics.request_finished("pets", "1", "CANCELLED", images=1, seconds=0.01)
    assert in_flight() == 0.0


def test_request_latency_is_kept_apart_by_status(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    for code, seconds in (("OK", 0.004), ("OK", 0.006), ("RESOURCE_EXHAUSTED", 0.0004)):
        metrics.request_started("pets")
        metrics.request_finished("pets", "1", code, images=1, seconds=seconds)
    get = metrics.registry.get_sample_value
    ok = {"model": "pets", "version": "1", "code": "OK"}
    refused = ok | {"code": "RESOURCE_EXHAUSTED"}
    assert get("visionrpc_request_duration_seconds_count", ok) == 2.0
    assert get("visionrpc_request_duration_seconds_sum", ok) == pytest.approx(0.01)
    assert get("visionrpc_request_duration_seconds_bucket", refused | {"le": "0.0005"}) == 1.0


def test_rpc_metrics_count_each_call_by_method_and_status(metrics: ServerMetrics) -> None:
    predict = metrics.for_rpc("unary", "visionrpc.v1.InferenceService", "Predict")
    get = metrics.registry.get_sample_value
    method = {"grpc_type": "unary", "grpc_service": "visionrpc.v1.InferenceService"}
    method["grpc_method"] = "Predict"
    # Started at zero, so rate() sees the first call as an increase.
    assert get("grpc_server_started_total", method) == 0.0
    assert get("grpc_server_handled_total", method | {"grpc_code": "OK"}) == 0.0
    for code in ("OK", "OK", "NOT_FOUND"):
        predict.started()
        predict.received()
        predict.handled(code, 0.003)
    assert get("grpc_server_started_total", method) == 3.0
    assert get("grpc_server_handled_total", method | {"grpc_code": "OK"}) == 2.0
    assert get("grpc_server_handled_total", method | {"grpc_code": "NOT_FOUND"}) == 1.0
    assert get("grpc_server_handling_seconds_count", method) == 3.0
    assert get("grpc_server_msg_received_total", method) == 3.0
    assert get("grpc_server_msg_sent_total", method) == 0.0


def test_model_loaded_starts_the_alerted_counters_at_zero(metrics: ServerMetrics) -> None:
    metrics.model_loaded("voc", "3", "multilabel", "CUDAExecutionProvider", 1.5)
    get = metrics.registry.get_sample_value
    mv = {"model": "voc", "version": "3"}
    assert get("visionrpc_requests_total", mv | {"code": "OK"}) == 0.0
    assert get("visionrpc_queue_rejections_total", mv) == 0.0
    assert get("visionrpc_deadline_drops_total", mv) == 0.0
    assert get("visionrpc_model_load_failures_total", {"model": "voc"}) == 0.0
    assert get("visionrpc_model_warmup_seconds", mv) == 1.5
    info = mv | {"task": "multilabel", "provider": "CUDAExecutionProvider"}
    assert get("visionrpc_model_info", info) == 1.0


def test_model_unloaded_removes_its_gauges_and_keeps_its_counters(
    metrics: ServerMetrics,
) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    metrics.model_loaded("pets", "2", "classification", "CPUExecutionProvider", 0.1)
    batcher = metrics.for_batcher("pets", "1")
    batcher.queue_capacity_set(64)
    batcher.queue_depth_changed(3)
    metrics.request_finished("pets", "1", "OK", images=1, seconds=0.01)
    metrics.model_unloaded("pets", "1")
    get = metrics.registry.get_sample_value
    v1 = {"model": "pets", "version": "1"}
    info = {"task": "classification", "provider": "CPUExecutionProvider"}
    assert get("visionrpc_model_info", v1 | info) is None
    assert get("visionrpc_model_info", {"model": "pets", "version": "2"} | info) == 1.0
    for gauge in ("visionrpc_queue_capacity", "visionrpc_queue_depth"):
        assert get(gauge, v1) is None
    assert get("visionrpc_model_warmup_seconds", v1) is None
    assert _requests(metrics, "pets", "1", "OK") == 1.0


def test_batch_ran_records_size_and_duration(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    batcher = metrics.for_batcher("pets", "1")
    for size in (1, 3, 8, 8):
        batcher.batch_ran(size=size, seconds=0.02)
    get = metrics.registry.get_sample_value
    mv = {"model": "pets", "version": "1"}
    assert get("visionrpc_batch_size_sum", mv) == 20.0
    assert get("visionrpc_batch_size_bucket", mv | {"le": "4.0"}) == 2.0
    assert get("visionrpc_batch_size_bucket", mv | {"le": "8.0"}) == 4.0
    assert get("visionrpc_inference_batch_seconds_count", mv) == 4.0


def test_multilabel_counts_an_empty_result_only_when_no_label_passed(
    metrics: ServerMetrics,
) -> None:
    metrics.model_loaded("voc", "1", "multilabel", "CPUExecutionProvider", 0.1)
    for count in (0, 1, 0, 4):
        metrics.multilabel_observed("voc", "1", count)
    get = metrics.registry.get_sample_value
    mv = {"model": "voc", "version": "1"}
    assert get("visionrpc_multilabel_empty_results_total", mv) == 2.0
    assert get("visionrpc_multilabel_labels_per_image_count", mv) == 4.0
    assert get("visionrpc_multilabel_labels_per_image_sum", mv) == 5.0


def test_points_are_observed_per_axis(metrics: ServerMetrics) -> None:
    metrics.model_loaded("heads", "1", "points", "CPUExecutionProvider", 0.1)
    metrics.points_observed("heads", "1", [-0.5, 0.5, 0.9], [0.1])
    get = metrics.registry.get_sample_value
    x = {"model": "heads", "version": "1", "axis": "x"}
    y = x | {"axis": "y"}
    assert get("visionrpc_point_position_count", x) == 3.0
    assert get("visionrpc_point_position_bucket", x | {"le": "-0.5"}) == 1.0
    assert get("visionrpc_point_position_bucket", x | {"le": "0.5"}) == 2.0
    assert get("visionrpc_point_position_bucket", y | {"le": "0.0"}) == 0.0
    assert get("visionrpc_point_position_count", y) == 1.0


def test_classification_tta_and_drops_accumulate(metrics: ServerMetrics) -> None:
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.1)
    for score in (0.97, 0.42):
        metrics.classification_observed("pets", "1", score)
    metrics.tta_used("pets", "1", images=3)
    batcher = metrics.for_batcher("pets", "1")
    batcher.rows_dropped(2)
    batcher.rows_dropped(1)
    batcher.queue_rejected()
    get = metrics.registry.get_sample_value
    mv = {"model": "pets", "version": "1"}
    assert get("visionrpc_top1_confidence_bucket", mv | {"le": "0.5"}) == 1.0
    assert get("visionrpc_top1_confidence_bucket", mv | {"le": "0.99"}) == 2.0
    assert get("visionrpc_tta_images_total", mv) == 3.0
    assert get("visionrpc_deadline_drops_total", mv) == 3.0
    assert get("visionrpc_queue_rejections_total", mv) == 1.0


def test_http_server_serves_this_registry_on_loopback() -> None:
    metrics = ServerMetrics(CollectorRegistry())
    exercise(metrics)
    server, thread = metrics.start_http_server("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert 'visionrpc_requests_total{code="OK",model="pets",version="1"} 1.0' in body
    assert "process_cpu_seconds_total" not in body


class _StandInNvmlError(Exception):
    pass


def _stand_in_nvml(lost_gpu: int) -> types.ModuleType:
    """NVML's call surface over fixed numbers: CI machines have no GPU to read."""
    nvml = types.ModuleType("stand_in_nvml")

    def handle_by_index(index: int) -> int:
        if index == lost_gpu:
            raise _StandInNvmlError("GPU is lost")
        return index

    nvml.NVMLError = _StandInNvmlError  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = handle_by_index  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=(handle + 1) * 2**30
    )
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=35 + handle
    )
    return nvml


def test_gpu_collector_reports_bytes_and_ratios_and_skips_a_lost_gpu() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(_stand_in_nvml(lost_gpu=1), device_count=3))
    get = registry.get_sample_value
    assert get(GPU_MEMORY_USED, {"gpu": "0"}) == 2**30
    assert get(GPU_MEMORY_USED, {"gpu": "2"}) == 3 * 2**30
    assert get(GPU_UTILIZATION, {"gpu": "2"}) == pytest.approx(0.37)
    assert get(GPU_MEMORY_USED, {"gpu": "1"}) is None
    assert get(GPU_UTILIZATION, {"gpu": "1"}) is None
