"""Model control under load, through a real ``visionrpc serve`` process and 32 real clients.

(a) a new version written into the polled repository by the writer training uses
    (``write_repository_entry``): no call fails, and the answers switch to the new
    version's outputs, each client's at one point (never back);
(b) a corrupt version dropped in: no call fails, the old version keeps answering, and the
    failure shows in the log (file and reason), the metrics and the repository index;
(c) unload and load through the admin API: calls during the unload either finish on the
    model (they held it already) or get UNAVAILABLE, none hangs; the process's RSS comes
    back after the unload.

Clients run without retries, so every failure shows at the client; the server's own
``visionrpc_requests_total`` must count the same outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import (
    analytic_model,
    channel_mean_graph,
    channel_mean_scores,
    config_dict,
    write_corrupt_onnx,
)
from tests.helpers.serve_process import serving
from tests.server.support import png, solid
from visionrpc.client import AsyncClient, Classification
from visionrpc.client.errors import VisionRPCError
from visionrpc.client.model_control import ModelControlClient
from visionrpc.server.model_config import model_config_from_dict, write_repository_entry

CLIENTS = 32
RED = png(solid(255, 0, 0))
COLORS = ("red", "green", "blue")
# Every call gets a deadline, so a call that hangs shows up as DEADLINE_EXCEEDED.
CALL_TIMEOUT = 20.0


def red_score(temperature: float) -> float:
    return float(channel_mean_scores(solid(255, 0, 0)[None], temperature)[0, 0])


def publish(root: Path, name: str, model: onnx.ModelProto, **config: object) -> Path:
    """A new version, written the way training writes one (``export_to_repository``)."""
    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        onnx.save(model, onnx_file)
        entry = model_config_from_dict(config_dict(name, "classification", COLORS, 8, **config))
        return write_repository_entry(root, entry, onnx_file)


@dataclass
class Answer:
    code: str
    version: str = ""
    score: float = 0.0


@dataclass
class Load:
    """``CLIENTS`` callers, each with its own client, calling one model back to back."""

    address: str
    model: str
    answers: list[list[Answer]] = field(default_factory=lambda: [[] for _ in range(CLIENTS)])
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._client(index) for index in range(CLIENTS)))

    async def _client(self, index: int) -> None:
        async with AsyncClient(self.address, retries=None, timeout=CALL_TIMEOUT) as client:
            while not self.stop.is_set():
                try:
                    result = await client.predict(self.model, RED)
                except VisionRPCError as error:
                    self.answers[index].append(Answer(error.code.name))
                    await asyncio.sleep(0.01)  # a refused call comes back at once
                    continue
                assert isinstance(result, Classification), result
                self.answers[index].append(Answer("OK", result.version, result.score))

    def count(self) -> int:
        return sum(len(answers) for answers in self.answers)

    async def until(self, condition: object, seconds: float = 120.0) -> None:
        assert callable(condition)
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 (the state has no event to wait on)
                await asyncio.sleep(0.05)

    def codes(self) -> collections.Counter[str]:
        return collections.Counter(a.code for answers in self.answers for a in answers)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    publish(root, "colors", channel_mean_graph(10.0, 8, softmax=True))
    return root


async def test_a_new_version_written_by_training_is_picked_up_with_no_failed_call(
    root: Path, tmp_path: Path
) -> None:
    flags = ("--model-control", "poll", "--poll-interval-seconds", "0.2")
    with serving(root, tmp_path, *flags, ready_model="colors") as server:
        load = Load(server.address, "colors")
        running = asyncio.create_task(load.run())
        await load.until(lambda: all(len(a) >= 5 for a in load.answers))
        publish(root, "colors", channel_mean_graph(20.0, 8, softmax=True))
        await load.until(lambda: all(sum(x.version == "2" for x in a) >= 5 for a in load.answers))
        load.stop.set()
        await running
        assert load.codes() == {"OK": load.count()}
        for answers in load.answers:
            versions = [answer.version for answer in answers]
            # Each client sees version 1, then version 2 from one call on, never back.
            switch = versions.index("2")
            assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}
            scores = {answer.version: answer.score for answer in answers}
            assert scores["1"] == pytest.approx(red_score(10.0), abs=1e-5)
            assert scores["2"] == pytest.approx(red_score(20.0), abs=1e-5)
        assert server.requests_by_code("colors") == {"OK": load.count()}


async def test_a_corrupt_version_keeps_the_old_one_serving_with_no_failed_call(
    root: Path, tmp_path: Path
) -> None:
    flags = (
        "--model-control",
        "poll",
        "--poll-interval-seconds",
        "0.2",
        "--model-control-api",
        "on",
    )
    with serving(root, tmp_path, *flags, ready_model="colors") as server:
        load = Load(server.address, "colors")
        running = asyncio.create_task(load.run())
        await load.until(lambda: all(len(a) >= 5 for a in load.answers))
        version_dir = write_corrupt_onnx(root, config_dict("colors", "classification", COLORS, 8))
        failures = "visionrpc_model_load_failures_total"
        await load.until(lambda: server.metric(failures, model="colors") >= 1)
        seen = [len(a) for a in load.answers]
        await load.until(
            lambda: all(len(a) >= n + 5 for a, n in zip(load.answers, seen, strict=True))
        )
        load.stop.set()
        await running
        assert load.codes() == {"OK": load.count()}
        assert {a.version for answers in load.answers for a in answers} == {"1"}
        assert server.requests_by_code("colors") == {"OK": load.count()}
        # Not retried while the file stays the same.
        assert server.metric(failures, model="colors") == 1
        with ModelControlClient(server.address) as control:
            (colors,) = control.index()
        assert colors.state == "READY"
        states = {v.version: (v.state, v.reason) for v in colors.versions}
        assert states["1"] == ("READY", "")
        assert states["2"][0] == "UNAVAILABLE" and "onnxruntime cannot load" in states["2"][1]
        logged = [
            r for r in server.log_records() if r.get("path") == str(version_dir / "model.onnx")
        ]
        assert logged and "Protobuf parsing failed" in str(logged[0]["reason"])


# About 64 MiB of weights, so the model's memory stands out from the process's own.
BALLAST_COLUMNS = 87_040
BALLAST_BYTES = 8 * 8 * 3 * BALLAST_COLUMNS * 4


def heavy_classifier() -> onnx.ModelProto:
    """The channel-mean classifier plus a big matrix product whose result softmax cancels.

    The product depends on the image, so onnxruntime cannot fold the weights away; its
    mean is added to every logit alike, which leaves the softmax, the answer, unchanged.
    """
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((8 * 8 * 3, BALLAST_COLUMNS)) * 1e-3).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "spatial_axes"], ["means"], keepdims=0),
        helper.make_node("Mul", ["means", "scale"], ["logits"]),
        helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "ballast"], ["product"]),
        helper.make_node("ReduceMean", ["product", "last_axis"], ["shift"], keepdims=1),
        helper.make_node("Add", ["logits", "shift"], ["shifted"]),
        helper.make_node("Softmax", ["shifted"], ["scores"], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "spatial_axes"),
        numpy_helper.from_array(np.array(10.0 / 255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array([-1, 8 * 8 * 3], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(weights, "ballast"),
    ]
    return analytic_model(nodes, initializers, 8, 8, output_width=3)


# After an unload the RSS is back within this of where it was before the load. Measured on
# a 2-core AMD EPYC: +15 to 17 MiB, the 32 clients' connections and the threads that stay.
RSS_MARGIN_BYTES = 24 * 1024 * 1024


async def test_unload_and_load_under_load_refuse_with_unavailable_and_free_the_memory(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    publish(root, "heavy", heavy_classifier(), batching={"max_batch_size": 8})
    flags = ("--model-control", "explicit", "--model-control-api", "on")
    with serving(root, tmp_path, *flags) as server, ModelControlClient(server.address) as control:
        empty = server.rss_bytes()
        control.load("heavy")
        load = Load(server.address, "heavy")
        running = asyncio.create_task(load.run())
        await load.until(lambda: all(len(a) >= 3 for a in load.answers))
        loaded = server.rss_bytes()
        unloaded_status = await asyncio.to_thread(control.unload, "heavy")
        after_unload = server.rss_bytes()
        await load.until(lambda: load.codes()["UNAVAILABLE"] >= CLIENTS)
        await asyncio.to_thread(control.load, "heavy")
        ok_before = load.codes()["OK"]
        await load.until(lambda: load.codes()["OK"] >= ok_before + CLIENTS)
        load.stop.set()
        await running
        codes = load.codes()
        assert set(codes) == {"OK", "UNAVAILABLE"}, codes
        assert server.requests_by_code("heavy") == dict(codes)
        assert unloaded_status.state == "UNAVAILABLE"
        # The model took its weights' worth of memory, and the unload gave it back.
        rss = (empty, loaded, after_unload)
        assert loaded - after_unload > BALLAST_BYTES * 0.9, rss
        assert after_unload - empty < RSS_MARGIN_BYTES, rss
