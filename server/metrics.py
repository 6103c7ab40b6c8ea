"""Prometheus metrics of the server: one ``ServerMetrics`` per server, on its own registry.

The families and their names are the ones agreed for dashboards and alerts
(``deploy/grafana``, ``deploy/prometheus``); tests check those files against this module.
Every method takes plain values, so the batcher, runtime and servicer call them without
knowing Prometheus, and grpc types never reach this module.

Label values stay bounded: a model or version that was never loaded (a caller's typo, a
scan for names) is recorded as ``_unknown`` instead of growing a series per string sent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Sequence
from types import ModuleType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LABELS_PER_IMAGE_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 13, 21)
POINT_POSITION_BUCKETS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)

GPU_MEMORY_USED = "visionrpc_gpu_memory_used_bytes"
GPU_UTILIZATION = "visionrpc_gpu_utilization_ratio"
UNKNOWN = "_unknown"

_MODEL_VERSION = ("model", "version")
_GRPC_METHOD = ("grpc_type", "grpc_service", "grpc_method")


class GpuCollector(Collector):
    """Reads memory and utilisation of every NVIDIA GPU at scrape time through NVML."""

    def __init__(self, nvml: ModuleType, device_count: int) -> None:
        self._nvml = nvml
        self._device_count = device_count

    def collect(self) -> Iterable[Metric]:
        nvml = self._nvml
        memory = GaugeMetricFamily(
            GPU_MEMORY_USED, "GPU memory in use, all processes.", labels=["gpu"]
        )
        utilization = GaugeMetricFamily(
            GPU_UTILIZATION,
            "Fraction of the last sample period in which a kernel ran on the GPU.",
            labels=["gpu"],
        )
        for index in range(self._device_count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory_info = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            except nvml.NVMLError:
                # A GPU that stops answering (fell off the bus, reset) loses its series;
                # raising here would fail the whole scrape and hide every other metric.
                continue
            memory.add_metric([str(index)], float(memory_info.used))
            utilization.add_metric([str(index)], rates.gpu / 100.0)
        return [memory, utilization]


def gpu_collector() -> GpuCollector | None:
    """A collector for the machine's GPUs, or None without nvidia-ml-py, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        device_count = int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return None
    if device_count == 0:
        pynvml.nvmlShutdown()
        return None
    return GpuCollector(pynvml, device_count)


def default_registry() -> CollectorRegistry:
    """A fresh registry with process, platform and (when there is one) GPU collectors.

    prometheus_client's own process and platform collectors sit on its global registry;
    a registry per server lets tests run several servers in one process.
    """
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    gpus = gpu_collector()
    if gpus is not None:
        registry.register(gpus)
    return registry


class ServerMetrics:
    """Every ``visionrpc_*`` family, and the one method the server calls for each event."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = default_registry() if registry is None else registry
        self._lock = threading.Lock()
        self._versions: dict[str, set[str]] = {}
        self._loaded: dict[tuple[str, str], tuple[str, str]] = {}

        def counter(name: str, doc: str, labels: Sequence[str] = _MODEL_VERSION) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = _MODEL_VERSION) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        def histogram(
            name: str,
            doc: str,
            buckets: Sequence[float],
            labels: Sequence[str] = _MODEL_VERSION,
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.requests = counter(
            "visionrpc_requests_total",
            "Predict requests (and streamed requests) by final gRPC status.",
            ("model", "version", "code"),
        )
        self.images = counter(
            "visionrpc_images_total",
            "Images by their own status; images of a failed request take the request's status.",
            ("model", "version", "code"),
        )
        self.request_duration = histogram(
            "visionrpc_request_duration_seconds",
            "Time from receiving a request to having its answer, by final gRPC status.",
            LATENCY_BUCKETS,
            ("model", "version", "code"),
        )
        self.queue_wait = histogram(
            "visionrpc_queue_wait_seconds",
            "Time an item waited in the batcher queue before its batch ran.",
            LATENCY_BUCKETS,
        )
        self.preprocess = histogram(
            "visionrpc_preprocess_seconds",
            "Decoding and resizing of one image.",
            LATENCY_BUCKETS,
            ("model",),
        )
        self.inference_batch = histogram(
            "visionrpc_inference_batch_seconds",
            "One onnxruntime run over a whole batch.",
            LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "visionrpc_batch_size", "Rows in each batch sent to the model.", BATCH_SIZE_BUCKETS
        )
        self.queue_depth = gauge("visionrpc_queue_depth", "Items waiting in the batcher queue.")
        self.queue_capacity = gauge(
            "visionrpc_queue_capacity", "Items the batcher queue holds before refusing more."
        )
        self.in_flight_requests = gauge(
            "visionrpc_in_flight_requests", "Requests being served now.", ("model",)
        )
        self.queue_rejections = counter(
            "visionrpc_queue_rejections_total",
            "Items refused because the queue was full (RESOURCE_EXHAUSTED).",
        )
        self.deadline_drops = counter(
            "visionrpc_deadline_drops_total",
            "Items dropped before compute because their deadline passed or the call was cancelled.",
        )
        self.model_info = gauge(
            "visionrpc_model_info",
            "1 for every loaded model version, with its task and execution provider.",
            ("model", "version", "task", "provider"),
        )
        self.model_load_failures = counter(
            "visionrpc_model_load_failures_total",
            "Model versions that failed to load and were skipped.",
            ("model",),
        )
        self.model_warmup = gauge(
            "visionrpc_model_warmup_seconds", "Duration of the warm-up run at load."
        )
        self.top1_confidence = histogram(
            "visionrpc_top1_confidence",
            "Top-1 score of each classification; a shift shows drifting inputs.",
            CONFIDENCE_BUCKETS,
        )
        self.labels_per_image = histogram(
            "visionrpc_multilabel_labels_per_image",
            "Labels at or above threshold for each multi-label image.",
            LABELS_PER_IMAGE_BUCKETS,
        )
        self.multilabel_empty = counter(
            "visionrpc_multilabel_empty_results_total",
            "Multi-label images with no label at or above threshold.",
        )
        # Buckets below zero mean no _sum series (OpenMetrics): read drift from quantiles.
        self.point_position = histogram(
            "visionrpc_point_position",
            "Predicted point coordinates in the model's [-1, 1] frame, by axis.",
            POINT_POSITION_BUCKETS,
            ("model", "version", "axis"),
        )
        self.tta_images = counter(
            "visionrpc_tta_images_total", "Images predicted with test-time augmentation."
        )
        # Every RPC, named and labelled as go-grpc-prometheus and py-grpc-prometheus name
        # theirs, so the dashboards and alerts written for those work unchanged.
        self.grpc_started = counter(
            "grpc_server_started_total", "RPCs started on the server.", _GRPC_METHOD
        )
        self.grpc_handled = counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status.",
            (*_GRPC_METHOD, "grpc_code"),
        )
        self.grpc_handling = histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status, on the server.",
            LATENCY_BUCKETS,
            _GRPC_METHOD,
        )
        self.grpc_received = counter(
            "grpc_server_msg_received_total",
            "Messages received from clients; one per call for unary requests.",
            _GRPC_METHOD,
        )
        self.grpc_sent = counter(
            "grpc_server_msg_sent_total",
            "Messages sent to clients; one per successful call for unary responses.",
            _GRPC_METHOD,
        )

    def _model(self, model: str) -> str:
        return model if model in self._versions else UNKNOWN

    def _model_version(self, model: str, version: str) -> tuple[str, str]:
        versions = self._versions.get(model)
        if versions is None:
            return UNKNOWN, ""
        # An empty version is a request that failed before "newest" was resolved.
        return model, version if version == "" or version in versions else UNKNOWN

    def request_started(self, model: str) -> None:
        """A request is being served; it stays in flight until :meth:`request_finished`."""
        self.in_flight_requests.labels(self._model(model)).inc()

    def request_finished(
        self, model: str, version: str, code: str, images: int, seconds: float
    ) -> None:
        """One request answered. ``code`` is the gRPC status name (``OK``, ``NOT_FOUND``...).

        A request that failed as a whole has no per-image results, so its ``images`` are
        counted here under the request's code; images of an ``OK`` request are counted one
        by one through :meth:`image_finished`.
        """
        self.in_flight_requests.labels(self._model(model)).dec()
        labels = self._model_version(model, version)
        self.requests.labels(*labels, code).inc()
        self.request_duration.labels(*labels, code).observe(seconds)
        if code != "OK" and images > 0:
            self.images.labels(*labels, code).inc(images)

    def image_finished(self, model: str, version: str, code: str) -> None:
        """One image of an answered request got its result (``OK``) or its own error."""
        self.images.labels(*self._model_version(model, version), code).inc()

    def preprocess_observed(self, model: str, seconds: float) -> None:
        self.preprocess.labels(self._model(model)).observe(seconds)

    def model_loaded(
        self, model: str, version: str, task: str, provider: str, warmup_seconds: float
    ) -> None:
        """A model version is serving: its label values become known and its series exist.

        Counters that alerts take ``rate()`` or ``increase()`` of start at zero here, so
        their first event is an increase rather than the first sample of a new series;
        the in-flight gauge starts at zero so dashboards show an idle model, not no data.
        """
        with self._lock:
            self._versions.setdefault(model, set()).add(version)
            self._loaded[model, version] = (task, provider)
        self.model_info.labels(model, version, task, provider).set(1)
        self.model_warmup.labels(model, version).set(warmup_seconds)
        self.requests.labels(model, version, "OK")
        self.images.labels(model, version, "OK")
        self.queue_rejections.labels(model, version)
        self.deadline_drops.labels(model, version)
        self.model_load_failures.labels(model)
        self.in_flight_requests.labels(model)

    def model_unloaded(self, model: str, version: str) -> None:
        """Removes the version's gauges so dashboards and alerts stop seeing it.

        Its counters and histograms stay: removing them would read as a counter reset.
        """
        with self._lock:
            task_provider = self._loaded.pop((model, version), None)
        if task_provider is None:
            return
        self.model_info.remove(model, version, *task_provider)
        for gauge in (self.model_warmup, self.queue_depth, self.queue_capacity):
            with contextlib.suppress(KeyError):
                gauge.remove(model, version)

    def model_load_failed(self, model: str) -> None:
        """A version of ``model`` (a repository folder name, so bounded) failed to load."""
        with self._lock:
            self._versions.setdefault(model, set())
        self.model_load_failures.labels(model).inc()

    def classification_observed(self, model: str, version: str, top1_score: float) -> None:
        self.top1_confidence.labels(*self._model_version(model, version)).observe(top1_score)

    def multilabel_observed(self, model: str, version: str, labels_count: int) -> None:
        labels = self._model_version(model, version)
        self.labels_per_image.labels(*labels).observe(labels_count)
        if labels_count == 0:
            self.multilabel_empty.labels(*labels).inc()

    def points_observed(
        self,
        model: str,
        version: str,
        xs_normalized: Iterable[float],
        ys_normalized: Iterable[float],
    ) -> None:
        """The points predicted for one image, in the model's [-1, 1] frame."""
        labels = self._model_version(model, version)
        x_histogram = self.point_position.labels(*labels, "x")
        y_histogram = self.point_position.labels(*labels, "y")
        for x in xs_normalized:
            x_histogram.observe(x)
        for y in ys_normalized:
            y_histogram.observe(y)

    def tta_used(self, model: str, version: str, images: int) -> None:
        self.tta_images.labels(*self._model_version(model, version)).inc(images)

    def for_rpc(self, rpc_type: str, service: str, method: str) -> RpcMetrics:
        """One gRPC method's families with their labels bound, its series started at zero.

        ``rpc_type`` is ``unary``, ``client_stream``, ``server_stream`` or ``bidi_stream``.
        """
        return RpcMetrics(self, rpc_type, service, method)

    def for_batcher(self, model: str, version: str) -> BatcherMetrics:
        """The batcher's events for one loaded model version; call after :meth:`model_loaded`."""
        return BatcherMetrics(self, *self._model_version(model, version))

    def start_http_server(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serves ``/metrics`` from this registry in a daemon thread; port 0 picks a free one.

        Stop it with ``server.shutdown(); server.server_close()``.
        """
        return start_http_server(port, host, registry=self.registry)


class BatcherMetrics:
    """One model version's batching families with their labels bound once.

    The batcher reports several events per row; resolving label values on each would
    take a lock and a dictionary lookup every time.
    """

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._depth = metrics.queue_depth.labels(model, version)
        self._capacity = metrics.queue_capacity.labels(model, version)
        self._rejections = metrics.queue_rejections.labels(model, version)
        self._drops = metrics.deadline_drops.labels(model, version)
        self._queue_wait = metrics.queue_wait.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._inference = metrics.inference_batch.labels(model, version)

    def queue_capacity_set(self, capacity: int) -> None:
        self._capacity.set(capacity)

    def queue_depth_changed(self, depth: int) -> None:
        self._depth.set(depth)

    def queue_rejected(self) -> None:
        self._rejections.inc()

    def rows_dropped(self, count: int) -> None:
        """Rows whose deadline passed or whose caller gave up, dropped before compute."""
        self._drops.inc(count)

    def queue_waited(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def batch_ran(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._inference.observe(seconds)


class RpcMetrics:
    """One gRPC method's ``grpc_server_*`` series, labels bound once per method."""

    def __init__(self, metrics: ServerMetrics, rpc_type: str, service: str, method: str) -> None:
        labels = (rpc_type, service, method)
        self._labels = labels
        self._handled_family = metrics.grpc_handled
        self._started = metrics.grpc_started.labels(*labels)
        self._handling = metrics.grpc_handling.labels(*labels)
        self._received = metrics.grpc_received.labels(*labels)
        self._sent = metrics.grpc_sent.labels(*labels)
        # OK exists from the start so a success-ratio query has a series before traffic.
        self._handled = {"OK": metrics.grpc_handled.labels(*labels, "OK")}

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: str, seconds: float) -> None:
        """The RPC ended with status ``code`` (a ``grpc.StatusCode`` name)."""
        counter = self._handled.get(code)
        if counter is None:
            # At most the 17 status codes per method, so the cache stays small.
            counter = self._handled[code] = self._handled_family.labels(*self._labels, code)
        counter.inc()
        self._handling.observe(seconds)

    def received(self) -> None:
        self._received.inc()

    def sent(self) -> None:
        self._sent.inc()
