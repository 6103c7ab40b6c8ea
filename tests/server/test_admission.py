"""Admission before work: per-request image limits, queue reservations, retry hints."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import RunningServer, running_server, settings_for_tests
from tests.observability.slow_model import write_slow_model
from tests.server.support import (
    encoded_request,
    fill_queue,
    png,
    predict_as_stream,
    sent_when,
    solid,
)
from visionrpc.client import AsyncClient, OverloadedError
from visionrpc.protos import MODEL_HINT_KEY, VERSION_HINT_KEY
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from visionrpc.server.admission import HOLD_SECONDS
from visionrpc.server.app import start_app
from visionrpc.server.batching import Batcher, BatchSettings
from visionrpc.server.errors import Overloaded

RED = png(solid(255, 0, 0))


def large_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    """A legal but large photo-sized JPEG (smooth, so it stays small on the wire)."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.broadcast_to(ramp[None, :, None], (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


async def test_more_images_than_the_limit_is_invalid_argument_naming_it(tmp_path: Path) -> None:
    # Queue 4 rows, TTA with one extra view: two images with every view is the most.
    write_channel_mean_classifier(
        tmp_path,
        tta={"enabled": False, "views": ["flip"]},
        batching={"max_queue_size": 4},
    )
    async with (
        running_server(tmp_path, max_images_per_request=3) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="colors"))
        assert info.max_images_per_request == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(encoded_request("colors", RED, RED, RED))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_images_per_request (2)" in (refused.value.details() or "")
        answer = await stub.Predict(
            encoded_request("colors", RED, RED, options=pb.PredictionOptions(tta=True))
        )
        assert [result.tta_views for result in answer.results] == [2, 2]


async def test_with_every_queue_full_a_large_image_is_refused_unread_with_a_retry_hint(
    tmp_path: Path,
) -> None:
    write_slow_model(tmp_path, name="slow", products=20)
    large = large_jpeg()
    async with (
        running_server(tmp_path, max_queue_size=1, metrics=True) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        registry = server.metrics.registry

        def received(service: str, method: str) -> float:
            labels = {"grpc_service": service, "grpc_method": method, "grpc_type": "unary"}
            return registry.get_sample_value("grpc_server_msg_received_total", labels) or 0.0

        fillers = await fill_queue(stub, encoded_request("slow", RED))
        decoded = registry.get_sample_value("visionrpc_preprocess_seconds_count", {"model": "slow"})
        before = received("visionrpc.v1.InferenceService", "Predict")
        call = stub.Predict(encoded_request("slow", large), timeout=60)
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no model has a free queue slot" in (await call.details() or "")
        trailing = dict(await call.trailing_metadata() or ())
        assert int(trailing["grpc-retry-pushback-ms"]) > 0
        assert "x-request-id" in trailing
        # Nothing went out before the outcome, so gRPC could still retry the call.
        assert not tuple(await call.initial_metadata() or ())
        # Refused from its headers: the server read no message and decoded nothing.
        assert received("visionrpc.v1.InferenceService", "Predict") == before
        after = registry.get_sample_value("visionrpc_preprocess_seconds_count", {"model": "slow"})
        assert after == decoded
        rejections = registry.get_sample_value(
            "visionrpc_queue_rejections_total", {"model": "slow", "version": "1"}
        )
        assert rejections is not None and rejections >= 2
        handled = {
            "grpc_service": "visionrpc.v1.InferenceService",
            "grpc_method": "Predict",
            "grpc_type": "unary",
            "grpc_code": "RESOURCE_EXHAUSTED",
        }
        # The filler's refusal and this one; the server records a call just after its status.
        for _ in range(100):
            if (registry.get_sample_value("grpc_server_handled_total", handled) or 0) >= 2:
                break
            await asyncio.sleep(0.02)
        assert registry.get_sample_value("grpc_server_handled_total", handled) == 2
        # The Open Inference Protocol's ModelInfer is refused the same way.
        v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as v2_refused:
            await v2_stub.ModelInfer(v2.ModelInferRequest(model_name="slow"), timeout=60)
        assert v2_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert received("inference.GRPCInferenceService", "ModelInfer") == 0
        # Other methods still answer.
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="slow"))
        assert info.name == "slow"
        for filler in fillers:
            assert await filler.code() in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Once the queue has room, the same large call is read and answered.
        answer = await stub.Predict(encoded_request("slow", large), timeout=60)
        assert len(answer.results) == 1


@dataclass
class Upload:
    """A slow model running one call, and a Predict whose headers have gone out but whose
    message is sent only on ``release.set()`` (a large upload still on its way)."""

    server: RunningServer
    stub: pb_grpc.InferenceServiceAsyncStub
    batcher: Batcher
    running: Any
    release: asyncio.Event
    call: Any


@contextlib.asynccontextmanager
async def an_upload_on_its_way(
    repository: Path,
    *,
    products: int = 20,
    other_model: bool = False,
    metadata: tuple[tuple[str, str], ...] = (),
) -> AsyncIterator[Upload]:
    """``products`` sets the slow model's run (20: about 0.5 s); ``other_model`` serves a
    second, fast one beside it; ``metadata`` goes with the upload's headers."""
    write_slow_model(repository, name="slow", products=products)
    if other_model:
        write_slow_model(repository, name="other", products=1)
    async with (
        running_server(repository, max_queue_size=1, metrics=True) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        batcher = server.repository.get("slow").batcher
        running = stub.Predict(encoded_request("slow", RED), timeout=60)
        await asyncio.sleep(0.25)  # decoded and taken by the model in milliseconds; runs longer
        assert not running.done() and not batcher.queued and not batcher.full()
        release = asyncio.Event()
        upload = predict_as_stream(channel)
        call = upload(sent_when(release, encoded_request("slow", RED)), metadata=metadata)
        await asyncio.sleep(0.2)  # the headers reach the server in milliseconds
        yield Upload(server, stub, batcher, running, release, call)


async def test_a_call_that_found_room_on_arrival_keeps_it_while_its_message_is_sent(
    tmp_path: Path,
) -> None:
    async with an_upload_on_its_way(tmp_path) as upload:
        assert upload.batcher.full() and not upload.batcher.queued
        # The slot is the upload's: a call arriving after it is refused, unread.
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await upload.stub.Predict(encoded_request("slow", RED), timeout=60)
        assert later.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no model has a free queue slot" in (later.value.details() or "")
        upload.release.set()
        answer = await upload.call
        assert len(answer.results) == 1 and answer.results[0].WhichOneof("result") != "error"
        await upload.running
        assert not upload.batcher.full()


async def test_headers_whose_message_does_not_come_give_their_slot_up(tmp_path: Path) -> None:
    async with an_upload_on_its_way(tmp_path, products=100) as upload:  # a run of seconds
        assert upload.batcher.full()
        await asyncio.sleep(HOLD_SECONDS)
        assert not upload.batcher.full()
        # The room goes to a call that sends its message; the stalled one, sent now, is
        # admitted only if room is left when it is read, and none is.
        queued = upload.stub.Predict(encoded_request("slow", RED), timeout=60)
        for _ in range(100):
            if upload.batcher.queued:
                break
            await asyncio.sleep(0.01)
        assert upload.batcher.queued == 1 and not upload.running.done()
        upload.release.set()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload.call
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue slots taken" in (refused.value.details() or "")
        for call in (upload.running, queued):
            assert len((await call).results) == 1
        assert not upload.batcher.full()


async def test_with_several_models_serving_a_call_holds_no_slot_before_its_message(
    tmp_path: Path,
) -> None:
    async with an_upload_on_its_way(tmp_path, other_model=True) as upload:
        # Which model the unread message names is unknown, so no queue holds a slot for it.
        assert not upload.batcher.full()
        upload.release.set()
        assert len((await upload.call).results) == 1
        await upload.running


async def test_a_client_that_names_the_model_in_its_headers_gets_a_slot_before_its_message(
    tmp_path: Path,
) -> None:
    hint = ((MODEL_HINT_KEY, "slow"), (VERSION_HINT_KEY, "1"))
    async with (
        an_upload_on_its_way(tmp_path, other_model=True, metadata=hint) as upload,
        AsyncClient(upload.server.address, retries=None) as client,
    ):
        assert upload.batcher.full() and not upload.batcher.queued
        registry = upload.server.metrics.registry
        labels = {
            "grpc_service": "visionrpc.v1.InferenceService",
            "grpc_method": "Predict",
            "grpc_type": "unary",
        }
        read = registry.get_sample_value("grpc_server_msg_received_total", labels)
        # The client names its model too: refused from its headers, its message never read,
        # although the other model has room.
        with pytest.raises(OverloadedError) as refused:
            await client.predict("slow", RED)
        assert "model slow:1 is overloaded" in str(refused.value)
        assert registry.get_sample_value("grpc_server_msg_received_total", labels) == read
        await client.predict("other", RED)  # raises unless answered
        upload.release.set()
        assert len((await upload.call).results) == 1
        await upload.running


async def test_a_caller_without_a_token_is_unauthenticated_even_when_queues_are_full(
    tmp_path: Path,
) -> None:
    write_slow_model(tmp_path, name="slow", products=20)
    token = (("authorization", "Bearer s3cret"),)
    async with (
        running_server(tmp_path, max_queue_size=1, auth_token="s3cret") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        fillers = []
        while True:
            filler = stub.Predict(encoded_request("slow", RED), timeout=60, metadata=token)
            fillers.append(filler)
            await asyncio.sleep(0.05)
            if filler.done():
                assert await filler.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Predict(encoded_request("slow", RED), timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for filler in fillers:
            await filler.code()


async def test_reserved_slots_count_against_the_queue_until_used_or_released() -> None:
    settings = BatchSettings(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=4, instances=1)
    batcher = Batcher(lambda rows: rows * 2, settings, name="double")
    held = batcher.reserve(3)
    with pytest.raises(Overloaded) as refused:
        batcher.reserve(2)
    assert refused.value.retry_after_seconds is not None
    # Two images of three failed to decode: one row goes in, the other slots free up.
    futures = held.submit([np.array([5.0], np.float32)])
    held.release()
    spare = batcher.reserve(3)
    assert [float(row[0]) for row in await asyncio.gather(*futures)] == [10.0]
    spare.release()
    assert batcher.queued == 0
    await batcher.close()


async def test_a_slot_held_on_arrival_counts_toward_the_request_that_uses_it() -> None:
    settings = BatchSettings(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=3, instances=1)
    batcher = Batcher(lambda rows: rows * 2, settings, name="double")
    other = Batcher(lambda rows: rows, settings, name="other")
    held = batcher.reserve(1)
    batcher.reserve(2)
    # Full, but the held slot is this request's own: it needs no more room.
    one = batcher.reserve(1, held)
    with pytest.raises(Overloaded):
        batcher.reserve(1)
    one.release()
    # A slot held in another model's queue is freed, and this queue is asked afresh.
    elsewhere = other.reserve(3)
    with pytest.raises(Overloaded):
        other.reserve(1)
    batcher.reserve(1, elsewhere).release()
    other.reserve(3).release()
    await batcher.close()
    await other.close()


async def test_the_drain_ends_an_idle_stream_so_it_does_not_hold_the_shutdown(
    tmp_path: Path,
) -> None:
    write_channel_mean_classifier(tmp_path)
    app = await start_app(settings_for_tests(tmp_path, shutdown_grace_seconds=60))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        requests: asyncio.Queue[pb.PredictRequest | None] = asyncio.Queue()

        async def feed() -> AsyncIterator[pb.PredictRequest]:
            while (request := await requests.get()) is not None:
                yield request

        stream = stub.PredictStream(feed())
        requests.put_nowait(encoded_request("colors", RED, request_id="first"))
        first = await stream.read()
        assert isinstance(first, pb.PredictResponse) and first.request_id == "first"
        # The stream stays open, idle: it must not hold the drain for the 60 s grace.
        stopping = asyncio.create_task(app.stop(60))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=30)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(stopping, timeout=30)
        assert app.drain.in_flight == 0


async def test_the_drain_ends_an_idle_open_inference_stream_too(tmp_path: Path) -> None:
    write_channel_mean_classifier(tmp_path)
    app = await start_app(settings_for_tests(tmp_path, shutdown_grace_seconds=60))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        never: asyncio.Event = asyncio.Event()

        async def silent() -> AsyncIterator[v2.ModelInferRequest]:
            await never.wait()
            yield v2.ModelInferRequest()

        stream = stub.ModelStreamInfer(silent())
        await asyncio.sleep(0.2)  # the call reaches its handler before the drain
        stopping = asyncio.create_task(app.stop(60))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(stream.read(), timeout=30)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(stopping, timeout=30)
