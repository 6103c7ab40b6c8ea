"""Every metric family through a real server: known gRPC traffic in, exact counts out.

The server runs in the test's event loop; its registry is read directly (the same values
its ``/metrics`` endpoint serves, which the last tests read over HTTP).
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.helpers.onnx_models import (
    config_dict,
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
    write_corrupt_onnx,
)
from tests.helpers.prometheus import require_binary
from tests.helpers.server import RunningServer, running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.metrics import GPU_MEMORY_USED, UNKNOWN, gpu_collector

CPU = "CPUExecutionProvider"
GARBAGE = b"these bytes are not an image"
# Waits a second for company before running: long enough to watch a request queued.
PATIENT_DELAY_MS = 1000

# The async stub type exists only in the generated .pyi, hence the quotes.
Served = tuple[RunningServer, "pb_grpc.InferenceServiceAsyncStub"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors", tta={"enabled": False, "views": ["flip"]})
    write_channel_mean_multilabel(root, "channels", threshold=0.5)
    write_centroid_points(root, "centroid")
    write_channel_mean_classifier(
        root,
        "patient",
        batching={
            "max_queue_delay_ms": PATIENT_DELAY_MS,
            "max_queue_size": 2,
            "wait_when_idle": True,
        },
    )
    write_corrupt_onnx(root, config_dict("broken", "classification", ("a", "b", "c"), 8))
    return root


@pytest.fixture
async def served(repository: Path) -> AsyncIterator[Served]:
    async with (
        running_server(repository, metrics=True) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield server, pb_grpc.InferenceServiceStub(channel)


def reader(server: RunningServer) -> Callable[..., float | None]:
    """``get(name, model=..., version=..., ...)``: one sample of the server's registry."""

    def get(name: str, **labels: str) -> float | None:
        return server.metrics.registry.get_sample_value(name, labels)

    return get


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def failed_code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value.code()


RED = png(solid(255, 0, 0))
GREY = png(solid(128, 128, 128))
BLACK = png(solid(0, 0, 0))
WHITE = png(solid(255, 255, 255))


async def test_requests_images_and_stage_timings_match_the_traffic(served: Served) -> None:
    server, stub = served
    await stub.Predict(encoded_request("colors", RED, GREY))
    await stub.Predict(encoded_request("colors", RED, GARBAGE))
    bad_option = encoded_request("colors", RED, options=pb.PredictionOptions(top_k=0))
    assert await failed_code(stub.Predict(bad_option)) == grpc.StatusCode.INVALID_ARGUMENT
    unknown_model = encoded_request("nope", RED, RED)
    assert await failed_code(stub.Predict(unknown_model)) == grpc.StatusCode.NOT_FOUND
    unknown_version = encoded_request("colors", RED, version="7")
    assert await failed_code(stub.Predict(unknown_version)) == grpc.StatusCode.NOT_FOUND

    get = reader(server)
    colors = {"model": "colors", "version": "1"}
    typo = {"model": "colors", "version": UNKNOWN}
    # grpc.aio's abort sends the status before it raises, so the caller can hear NOT_FOUND
    # a moment before the interceptor counts the call: wait for the last one counted.
    await wait_until(lambda: get("visionrpc_requests_total", **typo, code="NOT_FOUND") == 1.0)
    assert get("visionrpc_requests_total", **colors, code="OK") == 2.0
    assert get("visionrpc_requests_total", **colors, code="INVALID_ARGUMENT") == 1.0
    unknown = {"model": UNKNOWN, "version": ""}
    assert get("visionrpc_requests_total", **unknown, code="NOT_FOUND") == 1.0
    # Images: three answered; one undecodable plus the refused request's one image.
    assert get("visionrpc_images_total", **colors, code="OK") == 3.0
    assert get("visionrpc_images_total", **colors, code="INVALID_ARGUMENT") == 2.0
    assert get("visionrpc_images_total", **unknown, code="NOT_FOUND") == 2.0
    assert get("visionrpc_images_total", **typo, code="NOT_FOUND") == 1.0
    assert get("visionrpc_request_duration_seconds_count", **colors, code="OK") == 2.0
    assert get("visionrpc_request_duration_seconds_count", **colors, code="INVALID_ARGUMENT") == 1.0
    # Only images that decoded were timed, batched and waited in the queue.
    assert get("visionrpc_preprocess_seconds_count", model="colors") == 3.0
    assert get("visionrpc_batch_size_sum", **colors) == 3.0
    assert get("visionrpc_queue_wait_seconds_count", **colors) == 3.0
    batches = get("visionrpc_batch_size_count", **colors)
    assert batches is not None and 1.0 <= batches <= 3.0
    assert get("visionrpc_inference_batch_seconds_count", **colors) == batches
    assert get("visionrpc_in_flight_requests", model="colors") == 0.0


async def test_streamed_requests_are_counted_one_by_one(served: Served) -> None:
    server, stub = served
    requests = [
        encoded_request("colors", RED, request_id="a"),
        encoded_request("nope", RED, request_id="b"),
        encoded_request("colors", GREY, GREY, request_id="c"),
    ]
    answers = [answer async for answer in stub.PredictStream(iter(requests))]
    assert sorted(answer.request_id for answer in answers) == ["a", "b", "c"]
    get = reader(server)
    assert get("visionrpc_requests_total", model="colors", version="1", code="OK") == 2.0
    assert get("visionrpc_images_total", model="colors", version="1", code="OK") == 3.0
    assert get("visionrpc_requests_total", model=UNKNOWN, version="", code="NOT_FOUND") == 1.0


async def test_prediction_shapes_are_recorded_per_task(served: Served) -> None:
    server, stub = served
    await stub.Predict(encoded_request("colors", RED, GREY))
    await stub.Predict(encoded_request("channels", BLACK, RED, WHITE))
    # One bright pixel in row 1, column 6 of 8: its centre is at x 0.625, y -0.625.
    bright = solid(0, 0, 0)
    bright[1, 6] = 255
    response = await stub.Predict(encoded_request("centroid", png(bright)))
    point = response.results[0].points.points[0]
    np.testing.assert_allclose([point.x_normalized, point.y_normalized], [0.625, -0.625])

    get = reader(server)
    colors = {"model": "colors", "version": "1"}
    # softmax(10 * (1, 0, 0)) = 0.9999 for red; a third each for grey.
    assert get("visionrpc_top1_confidence_bucket", **colors, le="0.3") == 0.0
    assert get("visionrpc_top1_confidence_bucket", **colors, le="0.4") == 1.0
    assert get("visionrpc_top1_confidence_bucket", **colors, le="0.99") == 1.0
    assert get("visionrpc_top1_confidence_bucket", **colors, le="1.0") == 2.0
    channels = {"model": "channels", "version": "1"}
    assert get("visionrpc_multilabel_labels_per_image_count", **channels) == 3.0
    assert get("visionrpc_multilabel_labels_per_image_sum", **channels) == 4.0
    assert get("visionrpc_multilabel_labels_per_image_bucket", **channels, le="0.0") == 1.0
    assert get("visionrpc_multilabel_empty_results_total", **channels) == 1.0
    x = {"model": "centroid", "version": "1", "axis": "x"}
    y = x | {"axis": "y"}
    assert get("visionrpc_point_position_bucket", **x, le="0.5") == 0.0
    assert get("visionrpc_point_position_bucket", **x, le="0.75") == 1.0
    assert get("visionrpc_point_position_bucket", **y, le="-0.75") == 0.0
    assert get("visionrpc_point_position_bucket", **y, le="-0.5") == 1.0
    assert get("visionrpc_tta_images_total", **colors) is None


async def test_tta_counts_images_and_their_views_reach_the_batches(served: Served) -> None:
    server, stub = served
    tta = pb.PredictionOptions(tta=True)
    response = await stub.Predict(encoded_request("colors", RED, GREY, options=tta))
    assert all(result.tta_applied for result in response.results)
    get = reader(server)
    colors = {"model": "colors", "version": "1"}
    assert get("visionrpc_tta_images_total", **colors) == 2.0
    # Each image ran as itself and flipped: four rows for two images.
    assert get("visionrpc_batch_size_sum", **colors) == 4.0
    assert get("visionrpc_top1_confidence_count", **colors) == 2.0


async def test_loaded_models_their_warm_up_and_load_failures(served: Served) -> None:
    server, _ = served
    get = reader(server)
    for model, task in (("colors", "classification"), ("centroid", "points")):
        info = {"model": model, "version": "1", "task": task, "provider": CPU}
        assert get("visionrpc_model_info", **info) == 1.0
        warmup = get("visionrpc_model_warmup_seconds", model=model, version="1")
        assert warmup is not None and warmup > 0.0
    assert get("visionrpc_model_load_failures_total", model="broken") == 1.0
    assert get("visionrpc_model_load_failures_total", model="colors") == 0.0
    assert get("visionrpc_model_warmup_seconds", model="broken", version="1") is None
    assert get("visionrpc_queue_capacity", model="colors", version="1") == 256.0
    assert get("visionrpc_queue_capacity", model="patient", version="1") == 2.0
    assert get("visionrpc_queue_depth", model="patient", version="1") == 0.0


async def test_more_images_than_the_queue_holds_is_the_callers_mistake_not_load(
    served: Served,
) -> None:
    server, stub = served
    three_images = encoded_request("patient", RED, RED, RED)
    assert await failed_code(stub.Predict(three_images)) == grpc.StatusCode.INVALID_ARGUMENT
    get = reader(server)
    patient = {"model": "patient", "version": "1"}
    # The abort sends the status before the interceptor counts the call, so a loaded
    # machine can show the client its answer first.
    await wait_until(
        lambda: get("visionrpc_requests_total", **patient, code="INVALID_ARGUMENT") == 1.0
    )
    assert get("visionrpc_queue_rejections_total", **patient) == 0.0
    assert get("visionrpc_images_total", **patient, code="INVALID_ARGUMENT") == 3.0
    assert get("visionrpc_batch_size_count", **patient) == 0.0


async def test_a_waiting_request_shows_in_flight_and_in_the_queue_depth(served: Served) -> None:
    server, stub = served
    get = reader(server)
    patient = {"model": "patient", "version": "1"}
    call = asyncio.ensure_future(stub.Predict(encoded_request("patient", RED)))
    await wait_until(
        lambda: (
            get("visionrpc_in_flight_requests", model="patient") == 1.0
            and get("visionrpc_queue_depth", **patient) == 1.0
        )
    )
    response = await call
    assert response.results[0].classification.top[0].label == "red"
    assert get("visionrpc_in_flight_requests", model="patient") == 0.0
    assert get("visionrpc_queue_depth", **patient) == 0.0
    wait = get("visionrpc_queue_wait_seconds_sum", **patient)
    assert wait is not None and wait >= PATIENT_DELAY_MS / 1000.0


async def test_rows_whose_deadline_passed_are_dropped_before_compute(served: Served) -> None:
    server, stub = served
    late = stub.Predict(encoded_request("patient", RED), timeout=0.2)
    assert await failed_code(late) == grpc.StatusCode.DEADLINE_EXCEEDED
    get = reader(server)
    patient = {"model": "patient", "version": "1"}
    # The row leaves the queue when its batch would have formed, a second after it came.
    await wait_until(lambda: get("visionrpc_deadline_drops_total", **patient) == 1.0)
    assert get("visionrpc_requests_total", **patient, code="DEADLINE_EXCEEDED") == 1.0
    assert get("visionrpc_images_total", **patient, code="DEADLINE_EXCEEDED") == 1.0
    assert get("visionrpc_batch_size_count", **patient) == 0.0
    assert get("visionrpc_queue_depth", **patient) == 0.0


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture
def promtool() -> Iterator[str]:
    yield require_binary("promtool")


async def test_the_endpoint_passes_promtool_with_process_and_gpu_metrics(
    served: Served, promtool: str
) -> None:
    server, stub = served
    await stub.Predict(encoded_request("colors", RED))
    await stub.Predict(encoded_request("channels", RED))
    await stub.Predict(encoded_request("centroid", RED))
    body = await asyncio.to_thread(fetch, server.metrics_port)
    assert 'visionrpc_requests_total{code="OK",model="colors",version="1"} 1.0' in body
    assert "process_cpu_seconds_total" in body
    assert "process_resident_memory_bytes" in body
    assert (GPU_MEMORY_USED in body) == (gpu_collector() is not None)
    checked = await asyncio.to_thread(check_metrics, promtool, body)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def check_metrics(promtool: str, exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
