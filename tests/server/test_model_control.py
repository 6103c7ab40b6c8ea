"""Model control in a real in-process server: polling, the admin API, version policies, swaps.

Each test changes the repository on disk and asks the manager to rescan (``poll()``, the
one step ``--model-control poll`` repeats on its interval), or calls the admin API over
gRPC, then checks what real calls get back. Under concurrent load and through the
``visionrpc serve`` process: ``test_model_control_under_load.py``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.onnx_models import (
    channel_mean_scores,
    config_dict,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
    write_corrupt_onnx,
)
from tests.helpers.server import RunningServer, running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos import model_control_pb2 as control_pb
from visionrpc.protos import model_control_pb2_grpc as control_grpc
from visionrpc.server.model_config import ConfigError, model_config_from_dict
from visionrpc.server.repository import VersionState

RED = png(solid(255, 0, 0))
COLORS = ("red", "green", "blue")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Long enough that the interval never fires during a test: the tests poll themselves.
POLL_BY_HAND: dict[str, Any] = {"model_control": "poll", "poll_interval_seconds": 3600.0}


def red_score(temperature: float) -> float:
    return float(channel_mean_scores(solid(255, 0, 0)[None], temperature)[0, 0])


async def predict(
    channel: grpc.aio.Channel, model: str = "colors", **fields: object
) -> pb.PredictResponse:
    return await pb_grpc.InferenceServiceStub(channel).Predict(
        encoded_request(model, RED, **fields)
    )


async def health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(answer.status)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, temperature=10.0)
    return root


@pytest.fixture
async def polled(root: Path) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    async with (
        running_server(root, metrics=True, **POLL_BY_HAND) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield server, channel


async def until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Wait for a state another task reaches; bounded, so a bug fails instead of hanging."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 (the state has no event to wait on)
            await asyncio.sleep(0.01)


def index_of(server: RunningServer, name: str) -> dict[int, tuple[VersionState, str]]:
    status = server.repository.statuses()[name]
    return {v.version: (v.state, v.reason) for v in status.versions}


async def test_poll_serves_a_new_version_and_releases_the_old_one(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    old = (await predict(channel)).results[0].classification.top[0]
    assert old.score == pytest.approx(red_score(10.0), abs=1e-5)
    old_model = server.repository.get("colors")
    write_channel_mean_classifier(root, temperature=20.0)
    await server.app.models.poll()
    answer = await predict(channel)
    assert answer.version == "2"
    assert answer.results[0].classification.top[0].score == pytest.approx(red_score(20.0), abs=1e-5)
    # It warmed up before it took traffic (batch sizes 1 and max_batch_size ran at load).
    assert server.repository.get("colors").runtime.warmup_seconds > 0
    # The default policy serves the newest version alone; version 1 was released.
    assert index_of(server, "colors") == {
        1: (VersionState.UNAVAILABLE, "not selected by the version policy"),
        2: (VersionState.READY, ""),
    }
    with pytest.raises(grpc.aio.AioRpcError) as pinned:
        await predict(channel, version="1")
    assert pinned.value.code() == grpc.StatusCode.NOT_FOUND
    assert old_model.batcher.queued == 0
    with pytest.raises(Exception, match="shutting down"):
        old_model.batcher.submit([np.zeros((8, 8, 3), np.uint8)])
    scrape = server.metrics.registry.get_sample_value
    assert (
        scrape(
            "visionrpc_model_info",
            {
                "model": "colors",
                "version": "2",
                "task": "classification",
                "provider": "CPUExecutionProvider",
            },
        )
        == 1.0
    )
    assert (
        scrape(
            "visionrpc_model_info",
            {
                "model": "colors",
                "version": "1",
                "task": "classification",
                "provider": "CPUExecutionProvider",
            },
        )
        is None
    )


async def test_poll_reloads_a_model_file_replaced_in_place(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    replacement = root.parent / "replacement"
    write_channel_mean_classifier(replacement, temperature=30.0)
    (replacement / "colors" / "1" / "model.onnx").replace(root / "colors" / "1" / "model.onnx")
    await server.app.models.poll()
    answer = await predict(channel)
    assert answer.version == "1"
    assert answer.results[0].classification.top[0].score == pytest.approx(red_score(30.0), abs=1e-5)


async def test_a_call_running_during_a_swap_finishes_on_the_old_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    # Version 1 runs a batch only once it holds two rows (or after a minute), so the call
    # stays running, queued, until the test adds the second row itself.
    write_channel_mean_classifier(
        root,
        batching={"max_batch_size": 2, "max_queue_delay_ms": 60_000, "wait_when_idle": True},
    )
    async with (
        running_server(root, **POLL_BY_HAND) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        old = server.repository.get("colors")
        running = asyncio.ensure_future(predict(channel))
        await until(lambda: old.batcher.queued > 0)
        write_channel_mean_classifier(root, temperature=20.0)
        swap = asyncio.ensure_future(server.app.models.poll())
        # New calls move to version 2 at once, while version 1 still holds the running call.
        await until(lambda: server.repository.versions("colors") == [2])
        assert (await predict(channel)).version == "2"
        assert not running.done() and not swap.done()
        assert index_of(server, "colors")[1][0] is VersionState.UNLOADING
        (filler,) = old.batcher.submit([np.zeros((8, 8, 3), np.uint8)])
        answer = await running
        assert answer.version == "1"
        assert answer.results[0].classification.top[0].score == pytest.approx(
            red_score(10.0), abs=1e-5
        )
        await swap
        await filler
        assert index_of(server, "colors")[1][0] is VersionState.UNAVAILABLE


async def test_a_corrupt_version_leaves_the_old_one_serving_and_shows_everywhere(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    version_dir = write_corrupt_onnx(root, config_dict("colors", "classification", COLORS, 8))
    await server.app.models.poll()
    await server.app.models.poll()  # the same broken file is not tried again
    assert (await predict(channel)).version == "1"
    assert await health(channel, "colors") == SERVING
    state, reason = index_of(server, "colors")[2]
    assert state is VersionState.UNAVAILABLE and "onnxruntime cannot load" in reason
    assert [(f.model, f.path) for f in server.repository.failures] == [
        ("colors", version_dir / "model.onnx")
    ]
    failures = server.metrics.registry.get_sample_value(
        "visionrpc_model_load_failures_total", {"model": "colors"}
    )
    assert failures == 1.0


async def test_a_broken_config_keeps_what_serves_and_a_fixed_one_reloads(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    config_file = root / "colors" / "config.json"
    good = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**good, "task": "detection"}))
    await server.app.models.poll()
    assert (await predict(channel)).version == "1"
    status = server.repository.statuses()["colors"]
    assert "task must be one of" in status.reason and "still serve" in status.reason
    config_file.write_text(json.dumps({**good, "top_k": 1}))
    await server.app.models.poll()
    assert len((await predict(channel)).results[0].classification.top) == 1
    assert server.repository.statuses()["colors"].reason == ""
    assert server.repository.failures == []


async def test_poll_adds_new_models_and_drops_removed_ones_and_health_follows(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    write_channel_mean_multilabel(root)
    await server.app.models.poll()
    assert (await predict(channel, "channels")).results[0].HasField("multilabel")
    assert await health(channel, "channels") == SERVING
    shutil.rmtree(root / "channels")
    await server.app.models.poll()
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await predict(channel, "channels")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await health(channel, "channels") == NOT_SERVING
    assert "channels" not in server.repository.statuses()
    assert await health(channel, "") == SERVING


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        (None, [3]),
        ({"latest": {"num_versions": 2}}, [2, 3]),
        ({"all": {}}, [1, 2, 3]),
        ({"specific": {"versions": [1, 3]}}, [1, 3]),
    ],
)
async def test_the_version_policy_picks_the_versions_that_serve(
    tmp_path: Path, policy: dict[str, object] | None, served: list[int]
) -> None:
    root = tmp_path / "models"
    extra: dict[str, Any] = {} if policy is None else {"version_policy": policy}
    for temperature in (10.0, 20.0, 30.0):
        write_channel_mean_classifier(root, temperature=temperature, **extra)
    async with running_server(root) as server:
        assert server.repository.versions("colors") == served


def test_a_version_policy_that_cannot_work_is_a_config_error() -> None:
    base = config_dict("colors", "classification", COLORS, 8)
    policies: list[dict[str, Any]] = [
        {"newest": {}},
        {"latest": {"num_versions": 0}},
        {"specific": {"versions": []}},
        {"latest": {}, "all": {}},
    ]
    for policy in policies:
        with pytest.raises(ConfigError, match="version_policy"):
            model_config_from_dict({**base, "version_policy": policy})
    parsed = model_config_from_dict({**base, "version_policy": {"specific": {"versions": [3, 1]}}})
    assert parsed.to_dict()["version_policy"] == {"specific": {"versions": [1, 3]}}
    assert "version_policy" not in model_config_from_dict(base).to_dict()


async def test_a_broken_newest_version_at_start_up_lets_the_next_newest_serve(
    root: Path,
) -> None:
    write_corrupt_onnx(root, config_dict("colors", "classification", COLORS, 8))
    async with running_server(root) as server:
        assert server.repository.versions("colors") == [1]
        assert index_of(server, "colors")[2][0] is VersionState.UNAVAILABLE


# --- the admin API ---------------------------------------------------------------------------


@pytest.fixture
async def explicit(root: Path) -> AsyncIterator[tuple[RunningServer, grpc.aio.Channel]]:
    write_channel_mean_multilabel(root)
    async with (
        running_server(
            root, model_control="explicit", load_model=("colors",), model_control_api="on"
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield server, channel


def control(channel: grpc.aio.Channel) -> control_grpc.ModelControlServiceAsyncStub:
    return control_grpc.ModelControlServiceStub(channel)


async def test_explicit_mode_loads_only_what_is_asked_for(
    explicit: tuple[RunningServer, grpc.aio.Channel],
) -> None:
    _, channel = explicit
    index = await control(channel).RepositoryIndex(control_pb.RepositoryIndexRequest())
    states = {m.name: (m.state, m.reason) for m in index.models}
    assert states == {
        "channels": (control_pb.VERSION_STATE_UNAVAILABLE, "not loaded"),
        "colors": (control_pb.VERSION_STATE_READY, ""),
    }
    with pytest.raises(grpc.aio.AioRpcError) as unloaded:
        await predict(channel, "channels")
    assert unloaded.value.code() == grpc.StatusCode.NOT_FOUND
    loaded = await control(channel).LoadModel(control_pb.LoadModelRequest(name="channels"))
    assert loaded.model.state == control_pb.VERSION_STATE_READY
    assert [(v.version, v.state) for v in loaded.model.versions] == [
        ("1", control_pb.VERSION_STATE_READY)
    ]
    assert (await predict(channel, "channels")).version == "1"
    assert await health(channel, "channels") == SERVING
    ready = await control(channel).RepositoryIndex(
        control_pb.RepositoryIndexRequest(ready_only=True)
    )
    assert [m.name for m in ready.models] == ["channels", "colors"]


async def test_unload_refuses_new_calls_with_unavailable_and_reload_serves_again(
    explicit: tuple[RunningServer, grpc.aio.Channel],
) -> None:
    server, channel = explicit
    unloaded = await control(channel).UnloadModel(control_pb.UnloadModelRequest(name="colors"))
    assert unloaded.model.state == control_pb.VERSION_STATE_UNAVAILABLE
    assert [(v.version, v.reason) for v in unloaded.model.versions] == [("1", "unloaded")]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await predict(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not serving now" in (refused.value.details() or "")
    assert await health(channel, "colors") == NOT_SERVING
    assert await health(channel, "") == NOT_SERVING
    await control(channel).LoadModel(control_pb.LoadModelRequest(name="colors"))
    first = server.repository.get("colors")
    await control(channel).ReloadModel(control_pb.ReloadModelRequest(name="colors"))
    assert server.repository.get("colors") is not first
    assert (await predict(channel)).version == "1"
    assert await health(channel, "") == SERVING


async def test_admin_calls_fail_with_clear_codes(
    root: Path, explicit: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    _, channel = explicit
    stub = control(channel)
    cases = [
        ("nosuch", grpc.StatusCode.NOT_FOUND, "no model folder named 'nosuch'"),
        ("../colors", grpc.StatusCode.INVALID_ARGUMENT, "is not a model name"),
        ("x" * 5000, grpc.StatusCode.INVALID_ARGUMENT, "..."),
    ]
    for name, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.LoadModel(control_pb.LoadModelRequest(name=name))
        assert failed.value.code() == code
        assert text in (failed.value.details() or "")
        assert len(failed.value.details() or "") < 300
    write_corrupt_onnx(root, config_dict("colors", "classification", COLORS, 8))
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await stub.LoadModel(control_pb.LoadModelRequest(name="colors"))
    assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version(s) 2 did not load" in (broken.value.details() or "")
    assert (await predict(channel)).version == "1"


async def test_load_and_unload_are_refused_unless_the_mode_is_explicit(
    root: Path,
) -> None:
    async with (
        running_server(root, model_control_api="on", **POLL_BY_HAND) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control(channel).UnloadModel(control_pb.UnloadModelRequest(name="colors"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control poll" in (refused.value.details() or "")
        index = await control(channel).RepositoryIndex(control_pb.RepositoryIndexRequest())
        assert [m.name for m in index.models] == ["colors"]
        assert (await predict(channel)).version == "1"


async def test_the_admin_api_is_off_unless_enabled(root: Path) -> None:
    async with (
        running_server(root, model_control="explicit", load_model=("*",)) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as off:
            await control(channel).RepositoryIndex(control_pb.RepositoryIndexRequest())
        assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (await predict(channel)).version == "1"


async def test_with_auth_on_the_admin_api_takes_its_own_token_only(root: Path) -> None:
    async with (
        running_server(
            root,
            model_control="explicit",
            load_model=("colors",),
            model_control_api="on",
            auth_token="inference-secret",
            model_control_token="control-secret",
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = control(channel)
        request = control_pb.RepositoryIndexRequest()
        for metadata in ((), (("authorization", "Bearer inference-secret"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RepositoryIndex(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        allowed = await stub.RepositoryIndex(
            request, metadata=(("authorization", "Bearer control-secret"),)
        )
        assert [m.name for m in allowed.models] == ["colors"]
        with pytest.raises(grpc.aio.AioRpcError) as not_for_inference:
            await predict(channel)
        assert not_for_inference.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_model_being_written_into_a_polled_repository_raises_no_failure(
    root: Path, polled: tuple[RunningServer, grpc.aio.Channel]
) -> None:
    server, channel = polled
    # What write_repository_entry has done before it writes the config, which comes last.
    scratch = root.parent / "scratch"
    write_channel_mean_multilabel(scratch)
    (root / "channels" / "1").mkdir(parents=True)
    (scratch / "channels" / "1" / "model.onnx").replace(root / "channels" / "1" / "model.onnx")
    await server.app.models.poll()
    assert server.repository.statuses()["channels"].reason == "no config.json or config.yaml yet"
    assert server.repository.failures == []
    (scratch / "channels" / "config.json").replace(root / "channels" / "config.json")
    await server.app.models.poll()
    assert (await predict(channel, "channels")).version == "1"
    assert server.repository.failures == []


async def test_a_model_with_no_version_is_a_failure_until_one_arrives(root: Path) -> None:
    (root / "empty").mkdir()
    config = config_dict("empty", "classification", COLORS, 8)
    (root / "empty" / "config.json").write_text(json.dumps(config))
    async with (
        running_server(root, **POLL_BY_HAND) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        (failure,) = server.repository.failures
        assert (failure.model, failure.path) == ("empty", root / "empty")
        assert failure.reason == "no numbered version folders with a model.onnx"
        await server.app.models.poll()
        assert len(server.repository.failures) == 1
        write_channel_mean_classifier(root, "empty")
        await server.app.models.poll()
        assert (await predict(channel, "empty")).version == "1"
        assert server.repository.failures == []
