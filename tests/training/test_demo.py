"""The demo repository: three models the server's own repository loader accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.demo import QUICK_RUNS
from visionrpc.server.batching import BatchSettings
from visionrpc.server.model_config import load_model_config
from visionrpc.server.repository import load_repository
from visionrpc.server.runtime import RuntimeOptions
from visionrpc.training.demo import DEMO_RUNS, build_demo


def test_demo_covers_the_three_tasks_with_tiny_random_init_models() -> None:
    assert set(DEMO_RUNS) == {"pets", "voc", "biwi"}
    height, width = DEMO_RUNS["biwi"].size
    assert width / height == 640 / 480


async def test_demo_repository_loads_in_the_server(tmp_path: Path) -> None:
    repository = tmp_path / "demo-models"
    results = build_demo(repository, cache=tmp_path / "data", quiet=True, runs=QUICK_RUNS)
    assert {kind: r.version_dir for kind, r in results.items()} == {
        kind: repository / kind / "1" for kind in QUICK_RUNS
    }
    tasks = {kind: load_model_config(repository / kind / "config.json").task for kind in QUICK_RUNS}
    assert tasks == {"pets": "classification", "voc": "multilabel", "biwi": "points"}

    batching = BatchSettings(
        max_batch_size=4, max_queue_delay_ms=1.0, max_queue_size=16, instances=1
    )
    served = load_repository(
        repository, RuntimeOptions(providers=("CPUExecutionProvider",)), batching
    )
    try:
        assert served.failures == []
        assert served.names() == ["biwi", "pets", "voc"]
        for model in served.loaded():
            spec = model.config.input
            outputs = model.runtime.run(np.zeros((3, spec.height, spec.width, 3), np.uint8))
            assert outputs.shape == (3, model.runtime.output_width)
    finally:
        await served.close()
