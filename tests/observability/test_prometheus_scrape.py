"""A real Prometheus scrapes a ServerMetrics endpoint: what it stores is exactly what was
recorded, and every dashboard query runs against it."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers.prometheus import SCRAPE_JOB, PrometheusServer
from visionrpc.server.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "visionrpc-dashboard.json"


def drive(metrics: ServerMetrics) -> None:
    """Known traffic: 7 OK requests of 2 images, 2 INVALID_ARGUMENT, 1 unknown model."""
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.25)
    metrics.model_loaded("voc", "2", "multilabel", "CPUExecutionProvider", 0.5)
    batcher = metrics.for_batcher("pets", "1")
    batcher.queue_capacity_set(64)
    batcher.queue_depth_changed(12)
    for index in range(7):
        metrics.request_started("pets")
        metrics.request_finished("pets", "1", "OK", images=2, seconds=0.004 * (index + 1))
        for _ in range(2):
            metrics.image_finished("pets", "1", "OK")
            metrics.classification_observed("pets", "1", 0.9)
    for _ in range(2):
        metrics.request_started("pets")
        metrics.request_finished("pets", "1", "INVALID_ARGUMENT", images=1, seconds=0.001)
    metrics.request_started("pest")
    metrics.request_finished("pest", "1", "NOT_FOUND", images=3, seconds=0.0003)
    for size in (1, 2, 4, 4, 3):
        batcher.batch_ran(size=size, seconds=0.05)
    for count in (0, 0, 1, 3):
        metrics.multilabel_observed("voc", "2", count)
    batcher.queue_rejected()
    batcher.rows_dropped(4)
    metrics.tta_used("pets", "1", images=5)
    batcher.queue_waited(0.003)
    metrics.preprocess_observed("pets", 0.002)
    predict = metrics.for_rpc("unary", "visionrpc.v1.InferenceService", "Predict")
    for code in ("OK", "OK", "NOT_FOUND"):
        predict.started()
        predict.handled(code, 0.004)
    metrics.model_loaded("heads", "1", "points", "CPUExecutionProvider", 0.1)
    metrics.points_observed("heads", "1", [-0.2, 0.1], [0.4, 0.6])


# One Prometheus for the module: starting one and waiting for its first scrape is most of
# the time here. The tests that change gauges put them back, so the order does not matter.
@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[ServerMetrics, PrometheusServer]]:
    metrics = ServerMetrics(CollectorRegistry())
    drive(metrics)
    server, thread = metrics.start_http_server("127.0.0.1", 0)
    try:
        with PrometheusServer(targets=[f"127.0.0.1:{server.server_port}"]) as prometheus:
            prometheus.wait_for(f'up{{job="{SCRAPE_JOB}"}}', lambda up: up == 1.0)
            yield metrics, prometheus
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_counters_and_histograms_match_what_was_recorded(
    scraped: tuple[ServerMetrics, PrometheusServer],
) -> None:
    _, prometheus = scraped
    pets = 'model="pets",version="1"'
    expected = {
        f'visionrpc_requests_total{{{pets},code="OK"}}': 7.0,
        f'visionrpc_requests_total{{{pets},code="INVALID_ARGUMENT"}}': 2.0,
        'visionrpc_requests_total{model="_unknown",code="NOT_FOUND"}': 1.0,
        f'visionrpc_images_total{{{pets},code="OK"}}': 14.0,
        f'visionrpc_images_total{{{pets},code="INVALID_ARGUMENT"}}': 2.0,
        'visionrpc_images_total{model="_unknown",code="NOT_FOUND"}': 3.0,
        f'visionrpc_request_duration_seconds_count{{{pets},code="OK"}}': 7.0,
        f'visionrpc_request_duration_seconds_bucket{{{pets},code="OK",le="0.01"}}': 2.0,
        f'visionrpc_request_duration_seconds_bucket{{{pets},code="INVALID_ARGUMENT",le="0.01"}}': (
            2.0
        ),
        f"visionrpc_batch_size_count{{{pets}}}": 5.0,
        f"visionrpc_batch_size_sum{{{pets}}}": 14.0,
        f'visionrpc_batch_size_bucket{{{pets},le=~"4(\\\\.0)?"}}': 5.0,
        f'visionrpc_batch_size_bucket{{{pets},le=~"2(\\\\.0)?"}}': 2.0,
        f"visionrpc_inference_batch_seconds_count{{{pets}}}": 5.0,
        f"visionrpc_top1_confidence_count{{{pets}}}": 14.0,
        'visionrpc_multilabel_empty_results_total{model="voc"}': 2.0,
        'visionrpc_multilabel_labels_per_image_sum{model="voc"}': 4.0,
        f"visionrpc_queue_rejections_total{{{pets}}}": 1.0,
        f"visionrpc_deadline_drops_total{{{pets}}}": 4.0,
        f"visionrpc_tta_images_total{{{pets}}}": 5.0,
        f"visionrpc_queue_depth{{{pets}}}": 12.0,
        f"visionrpc_queue_capacity{{{pets}}}": 64.0,
        'visionrpc_model_info{model="voc",task="multilabel"}': 1.0,
        'visionrpc_model_warmup_seconds{model="voc"}': 0.5,
    }
    actual = {expr: prometheus.value(expr) for expr in expected}
    assert actual == expected


def test_gauge_changes_reach_prometheus(
    scraped: tuple[ServerMetrics, PrometheusServer],
) -> None:
    metrics, prometheus = scraped
    in_flight = 'visionrpc_in_flight_requests{model="pets"}'
    metrics.request_started("pets")
    metrics.request_started("pets")
    prometheus.wait_for(in_flight, lambda value: value == 2.0)
    for _ in range(2):
        metrics.request_finished("pets", "1", "CANCELLED", images=0, seconds=0.001)
    prometheus.wait_for(in_flight, lambda value: value == 0.0)
    dogs = 'visionrpc_model_info{model="dogs",version="1",task="classification"}'
    metrics.model_loaded("dogs", "1", "classification", "CPUExecutionProvider", 0.1)
    prometheus.wait_for(dogs, lambda value: value == 1.0)
    metrics.model_unloaded("dogs", "1")
    prometheus.wait_for(dogs, lambda value: value is None)


def test_every_dashboard_query_runs_and_returns_series(
    scraped: tuple[ServerMetrics, PrometheusServer],
) -> None:
    _, prometheus = scraped
    # rate() needs two samples in its window; wait for a scrape after the first one.
    prometheus.wait_for(
        'count_over_time(visionrpc_requests_total{model="pets",code="OK"}[1m])',
        lambda samples: samples is not None and samples >= 2,
    )
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$model", ".+").replace("$__rate_interval", "1m")
            samples = prometheus.query(expr)
            if not samples and "visionrpc_gpu_" not in expr:
                empty.append((panel["title"], expr))
            for sample in samples:
                assert not math.isinf(sample.value), (panel["title"], expr, sample)
    assert empty == []
