"""Recorded events that touch every ServerMetrics family, shared by the tests here."""

from __future__ import annotations

from visionrpc.server.metrics import ServerMetrics


def exercise(metrics: ServerMetrics) -> None:
    """Calls every event method once or more, so every family has samples."""
    metrics.model_loaded("pets", "1", "classification", "CPUExecutionProvider", 0.25)
    metrics.model_loaded("voc", "3", "multilabel", "CUDAExecutionProvider", 0.5)
    metrics.model_loaded("heads", "2", "points", "CPUExecutionProvider", 0.125)
    metrics.model_load_failed("broken")
    metrics.request_started("pets")
    metrics.request_finished("pets", "1", "OK", images=2, seconds=0.03)
    metrics.image_finished("pets", "1", "OK")
    metrics.image_finished("pets", "1", "INVALID_ARGUMENT")
    metrics.preprocess_observed("pets", 0.004)
    batcher = metrics.for_batcher("pets", "1")
    batcher.queue_waited(0.002)
    batcher.batch_ran(size=3, seconds=0.02)
    batcher.queue_capacity_set(64)
    batcher.queue_depth_changed(5)
    batcher.queue_rejected()
    batcher.rows_dropped(2)
    metrics.classification_observed("pets", "1", 0.93)
    metrics.multilabel_observed("voc", "3", 0)
    metrics.multilabel_observed("voc", "3", 2)
    metrics.points_observed("heads", "2", [-0.1, 0.3], [0.6, 0.9])
    metrics.tta_used("pets", "1", images=2)
    rpc = metrics.for_rpc("unary", "visionrpc.v1.InferenceService", "Predict")
    rpc.started()
    rpc.received()
    rpc.sent()
    rpc.handled("OK", 0.03)
