"""Single-thread lanes: real onnxruntime sessions beside a model's all-thread session."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from tests.helpers.onnx_models import channel_mean_scores, write_channel_mean_classifier
from visionrpc.server.batching import BatchSettings
from visionrpc.server.repository import ModelRepository, load_repository
from visionrpc.server.runtime import CPU, CUDA, RuntimeOptions, lane_count

CPU_LANES = RuntimeOptions(providers=(CPU,), intra_op_threads=2, cpu_lanes=True)
BATCHING = BatchSettings(max_batch_size=8, max_queue_delay_ms=0.0, max_queue_size=64, instances=1)


def repository_of(root: Path, options: RuntimeOptions, instances: int = 1) -> ModelRepository:
    write_channel_mean_classifier(root)
    return load_repository(root, options, dataclasses.replace(BATCHING, instances=instances))


async def test_a_lone_row_runs_on_all_threads_and_a_crowd_on_the_lanes(tmp_path: Path) -> None:
    repository = repository_of(tmp_path / "models", CPU_LANES)
    model = repository.get("colors")
    assert len(model.runtime.lane_runs) == 2
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    lone = await model.batcher.submit([images[0]])[0]
    assert (model.batcher.stats.runs, model.batcher.stats.lane_runs) == (1, 0)
    crowd = await asyncio.gather(*model.batcher.submit(list(images)))
    # 12 rows, lanes of at most 4 (their share of 8): three lane batches at least.
    assert model.batcher.stats.lane_runs >= 3
    assert model.batcher.stats.largest_batch == 4
    expected = channel_mean_scores(images)
    np.testing.assert_allclose(lone, expected[0], rtol=1e-6)
    np.testing.assert_allclose(np.stack(crowd), expected, rtol=1e-6)
    await repository.close()


async def test_lanes_answer_exactly_as_the_all_thread_session(tmp_path: Path) -> None:
    repository = repository_of(tmp_path / "models", CPU_LANES)
    runtime = repository.get("colors").runtime
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    for lane in runtime.lane_runs:
        np.testing.assert_array_equal(lane(images), runtime.run(images))
    await repository.close()


async def test_lanes_need_two_threads_on_the_cpu_provider_and_one_instance(tmp_path: Path) -> None:
    cases = {
        "one thread": (dataclasses.replace(CPU_LANES, intra_op_threads=1), 1),
        "lanes off": (dataclasses.replace(CPU_LANES, cpu_lanes=False), 1),
        "two instances": (CPU_LANES, 2),
    }
    for case, (options, instances) in cases.items():
        repository = repository_of(tmp_path / case, options, instances=instances)
        assert repository.get("colors").runtime.lane_runs == (), case
        await repository.close()


def test_a_model_that_asks_for_cuda_gets_no_lanes() -> None:
    assert lane_count(CPU_LANES, [CPU]) == 2
    # CUDA first, CPU as its fallback: the GPU runs the batches, so no CPU lanes.
    assert lane_count(CPU_LANES, [CUDA, CPU]) == 0
