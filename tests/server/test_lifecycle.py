"""Shutdown, restart and retries of a real ``visionrpc serve`` process under real Client load.

Outcomes are counted on both sides: the client's results, and the server's access log
(one line per request a handler answered, with the caller's ``x-request-id``), so a
call that was retried shows every attempt the server saw.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.serve_log import ServeProcess, serve_process
from tests.observability.slow_model import write_slow_model
from tests.server.support import (
    encoded_request,
    fill_queue,
    png,
    predict_as_stream,
    sent_when,
    solid,
)
from visionrpc.client import AsyncClient, OverloadedError, VisionRPCError
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server import drain

RED = png(solid(255, 0, 0))
CONCURRENCY = 64
GRACE = ("--shutdown-grace-seconds", "30")
REQUEST_ID = "x-request-id"
# Calls made this long before SIGTERM must get their real answer; the gap only covers
# the time between two clock readings and the signal's delivery, not the server.
BEFORE_SIGTERM = 0.005


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    code: str
    request_id: str
    # The result's summary when OK.
    answer: str = ""


async def call_once(client: AsyncClient, model: str, request_id: str) -> Outcome:
    started = time.monotonic()
    try:
        result = await client.predict(model, RED, metadata=((REQUEST_ID, request_id),))
    except VisionRPCError as exc:
        return Outcome(started, time.monotonic(), exc.code.name, request_id)
    return Outcome(started, time.monotonic(), "OK", request_id, result.summary())


async def keep_calling(
    client: AsyncClient, model: str, stop: asyncio.Event, concurrency: int
) -> list[Outcome]:
    """``concurrency`` callers, each calling again as soon as its call ends, until ``stop``."""
    outcomes: list[Outcome] = []
    numbers = itertools.count()

    async def caller() -> None:
        while not stop.is_set():
            outcomes.append(await call_once(client, model, f"call-{next(numbers)}"))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return outcomes


async def answered_by(server: ServeProcess, count: int) -> None:
    """Until the server's access log holds at least ``count`` answered requests."""
    for _ in range(600):
        if len(server.access_log()) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server answered fewer than {count} requests")


def write_model_of_kind(root: Path, kind: str) -> Path:
    if kind == "fast":
        write_channel_mean_classifier(root, name="model")
    else:
        # About 0.1 s per image, one image per batch: calls wait in the queue at SIGTERM.
        write_slow_model(root, name="model", products=5)
    return root


@pytest.fixture
def fast_model(tmp_path: Path) -> Path:
    return write_model_of_kind(tmp_path, "fast")


@pytest.mark.parametrize("run", [1, 2])
@pytest.mark.parametrize("kind", ["fast", "slow"])
async def test_sigterm_under_load_cancels_no_call_and_answers_every_call_in_flight(
    kind: str, run: int, tmp_path: Path
) -> None:
    root = write_model_of_kind(tmp_path, kind)
    # The slow model's queue is small, so some calls are also refused for load and retried.
    flags = (*GRACE, "--max-queue-size", "16") if kind == "slow" else GRACE
    with serve_process(root, *flags) as server:
        server.wait_until_serving()
        async with AsyncClient(server.address) as client:
            stop = asyncio.Event()
            load = asyncio.create_task(keep_calling(client, "model", stop, CONCURRENCY))
            await answered_by(server, 2 * CONCURRENCY)
            sigterm_at = time.monotonic()
            server.sigterm()
            # No new calls: what counts is what happens to those already made.
            stop.set()
            exit_code = await asyncio.to_thread(server.exit_code)
            outcomes = await load
    assert exit_code == 0, server.log_text()
    codes = collections.Counter(outcome.code for outcome in outcomes)
    assert "CANCELLED" not in codes, codes
    in_flight = [o for o in outcomes if o.started < sigterm_at < o.ended]
    assert len(in_flight) == CONCURRENCY
    # Those made before SIGTERM got their answer, or on the slow model were refused for
    # load and their retries, after SIGTERM, refused as UNAVAILABLE (until no attempt was
    # left); one made at the signal's time may have been refused as UNAVAILABLE too.
    assert {o.code for o in in_flight} <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    if kind == "fast":
        made_before = [o for o in in_flight if o.started <= sigterm_at - BEFORE_SIGTERM]
        assert made_before
        assert {o.code for o in made_before} == {"OK"}
    assert any(o.code == "OK" and o.ended > sigterm_at for o in in_flight)
    # At the server: every call a handler began ended with its answer, a refusal for
    # load, or (once draining) UNAVAILABLE; the client saw every answer.
    served = collections.Counter(entry["status"] for entry in server.access_log())
    assert set(served) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, served
    assert served["OK"] == codes["OK"]
    assert "shutting down" in server.log_text()


# A burst this size made just before SIGTERM: calls still on their way to a handler.
BURST = 48
LATE = 16


@pytest.mark.parametrize("run", [1, 2])
async def test_every_call_made_before_sigterm_gets_its_real_answer_and_later_ones_unavailable(
    run: int, tmp_path: Path
) -> None:
    # About 0.1 s per run of up to 8 images: calls wait in the queue at SIGTERM, and the
    # drain, answering them all, takes a few seconds.
    write_slow_model(tmp_path, name="model", products=5, max_batch_size=8)
    # A queue that holds every call made, so none is refused for load.
    with serve_process(tmp_path, *GRACE, "--max-queue-size", "256") as server:
        server.wait_until_serving()
        # No retries: every attempt the client makes is one call the server counts.
        async with AsyncClient(server.address, retries=None) as client:
            answer = (await call_once(client, "model", "first")).answer
            stop = asyncio.Event()
            load = asyncio.create_task(keep_calling(client, "model", stop, CONCURRENCY))
            await answered_by(server, 8)
            # A burst of calls still in the transport, or waiting for the event loop, when
            # the signal lands (SIGTERM comes while they are being sent).
            burst = [
                asyncio.create_task(call_once(client, "model", f"burst-{number}"))
                for number in range(BURST)
            ]
            await asyncio.sleep(0)  # they start: each call is made
            await asyncio.sleep(BEFORE_SIGTERM)
            sigterm_at = time.monotonic()
            server.sigterm()
            stop.set()
            # Calls made once the server has had time to know it drains.
            await asyncio.sleep(drain.ACCEPT_WINDOW_LIMIT + 0.2)
            late_at = time.monotonic()
            late = await asyncio.gather(
                *(call_once(client, "model", f"late-{number}") for number in range(LATE))
            )
            outcomes = [*await load, *await asyncio.gather(*burst), *late]
            exit_code = await asyncio.to_thread(server.exit_code)
    assert exit_code == 0, server.log_text()
    assert answer.startswith("red "), answer
    made_before = [o for o in outcomes if o.started <= sigterm_at - BEFORE_SIGTERM]
    assert len(made_before) >= CONCURRENCY + BURST
    lost = collections.Counter(o.code for o in made_before if o.code != "OK")
    assert not lost, lost
    assert {o.answer for o in made_before} == {answer}
    assert {o.code for o in late} == {"UNAVAILABLE"}
    assert all(o.started >= late_at for o in late)
    # The server counted the same: each call one handler, the same outcome.
    served = {entry["request_id"]: entry["status"] for entry in server.access_log()}
    assert len(served) == len(server.access_log())
    assert served == {o.request_id: o.code for o in outcomes} | {"first": "OK"}
    assert "still running after" not in server.log_text()
    # The late calls found the accept window closed.
    assert "accept window closed" in server.log_text()


async def test_a_rolling_restart_on_the_same_port_fails_no_call(fast_model: Path) -> None:
    with serve_process(fast_model, *GRACE) as old:
        old.wait_until_serving()
        async with AsyncClient(old.address) as client:
            stop = asyncio.Event()
            load = asyncio.create_task(keep_calling(client, "model", stop, 8))
            await answered_by(old, 50)
            # The new process binds the same port (gRPC sets SO_REUSEPORT) before the
            # old one stops, as a rolling update starts the new pod first.
            with serve_process(fast_model, *GRACE, port=old.port) as new:
                await asyncio.to_thread(new.wait_until_serving)
                old.sigterm()
                assert await asyncio.to_thread(old.exit_code) == 0
                await answered_by(new, 50)
                stop.set()
                outcomes = await load
    codes = collections.Counter(outcome.code for outcome in outcomes)
    assert codes == {"OK": len(outcomes)}, codes
    # Each call answered exactly once, by one of the two; none failed on the way.
    answered = [
        [entry["request_id"] for entry in server.access_log() if entry["status"] == "OK"]
        for server in (old, new)
    ]
    assert sorted(answered[0] + answered[1]) == sorted(o.request_id for o in outcomes)
    assert min(len(ids) for ids in answered) >= 50


async def test_a_call_made_while_the_model_loads_is_retried_until_it_succeeds(
    tmp_path: Path,
) -> None:
    # A warm-up of about a second: the first attempt lands while it runs, and the
    # retries (1 s apart, as the server's hint says) outlast it.
    write_slow_model(tmp_path, name="model", products=40)
    with serve_process(tmp_path) as server:
        await asyncio.to_thread(server.wait_for, "loading models")
        async with AsyncClient(server.address) as client:
            await client.predict("model", RED, metadata=(("x-request-id", "early"),))
        server.sigterm()
        assert server.exit_code() == 0
        attempts = [entry["status"] for entry in server.access_log("early")]
    assert attempts[-1] == "OK"
    assert len(attempts) >= 2
    assert set(attempts[:-1]) == {"UNAVAILABLE"}


async def test_a_call_refused_for_a_full_queue_is_retried_until_it_succeeds(
    tmp_path: Path,
) -> None:
    # A second or more per image, one at a time, one waiting: the queue stays full
    # for a whole run once a call is refused.
    write_slow_model(tmp_path, name="model", products=60)
    with serve_process(tmp_path, "--max-queue-size", "1") as server:
        await asyncio.to_thread(server.wait_until_serving)
        async with (
            AsyncClient(server.address) as client,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            await client.models()  # connected before the queue fills
            stub = pb_grpc.InferenceServiceStub(channel)
            # The queue stays full for the rest of that run.
            fillers = await fill_queue(stub, encoded_request("model", RED))
            await client.predict("model", RED, metadata=(("x-request-id", "late"),))
            for filler in fillers:
                await filler.code()
        server.sigterm()
        assert server.exit_code() == 0
        attempts = [entry["status"] for entry in server.access_log("late")]
    assert attempts[-1] == "OK"
    assert len(attempts) >= 2
    assert set(attempts[:-1]) == {"RESOURCE_EXHAUSTED"}


async def test_a_photo_that_found_room_on_arrival_is_answered_though_later_calls_fill_the_queue(
    tmp_path: Path,
) -> None:
    write_slow_model(tmp_path, name="model", products=20)  # about 0.5 s a run
    with serve_process(tmp_path, "--max-queue-size", "1") as server:
        await asyncio.to_thread(server.wait_until_serving)
        async with (
            AsyncClient(server.address, retries=None) as client,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.InferenceServiceStub(channel)
            running = stub.Predict(encoded_request("model", RED), timeout=60)
            await asyncio.sleep(0.25)  # taken by the model, which runs on
            # The upload's headers arrive while the queue has room; its message comes later.
            release = asyncio.Event()
            request = encoded_request("model", RED)
            upload = predict_as_stream(channel)(
                sent_when(release, request), metadata=(("x-request-id", "upload"),)
            )
            await asyncio.sleep(0.25)
            with pytest.raises(OverloadedError) as later:
                await client.predict("model", RED, metadata=(("x-request-id", "later"),))
            # Refused from its headers, which name the model (the client's hint).
            assert "model model:1 is overloaded" in str(later.value)
            release.set()
            assert len((await upload).results) == 1
            await running
        server.sigterm()
        assert server.exit_code() == 0
    # Counted at the server too: one attempt each.
    # The later call was refused unread (no request message), the upload read and answered.
    outcomes = {
        name: [(entry["status"], entry["requests"]) for entry in server.access_log(name)]
        for name in ("upload", "later")
    }
    assert outcomes == {"upload": [("OK", 1)], "later": [("RESOURCE_EXHAUSTED", 0)]}
