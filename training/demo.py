"""``visionrpc train demo``: three small models on synthetic data, in minutes on a laptop CPU.

Generates the synthetic pets, voc and biwi datasets (training.synthetic) and trains the
tiny CNN from random weights on each, then writes all three into one repository that
``visionrpc serve`` loads. No pretrained weights and no downloads are needed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig
from .synthetic import make_dataset
from .train import TrainResult, train


@dataclass(frozen=True)
class DemoRun:
    size: tuple[int, int]
    epochs: int
    lr: float = 1e-2
    # Options for training.synthetic's maker of this kind.
    data: Mapping[str, int] = field(default_factory=dict)


# About a minute each on two CPU cores. Multi-label from scratch needs the most examples;
# biwi keeps the frames' 4:3 shape so no head falls outside the crop.
DEMO_RUNS = {
    "pets": DemoRun(size=(64, 64), epochs=10),
    "voc": DemoRun(size=(64, 64), epochs=30, data={"images": 1200}),
    "biwi": DemoRun(size=(48, 64), epochs=20, data={"people": 6, "frames_per_person": 40}),
}


def demo_config(kind: str, run: DemoRun, data: Path, repository: Path, quiet: bool) -> TrainConfig:
    return TrainConfig(
        kind=kind,
        data=data,
        repository=repository,
        arch="tiny",
        weights="none",
        size=run.size,
        bs=32,
        epochs=run.epochs,
        lr=run.lr,
        quiet=quiet,
    )


def build_demo(
    repository: Path,
    *,
    cache: Path | None = None,
    quiet: bool = False,
    runs: Mapping[str, DemoRun] = DEMO_RUNS,
) -> dict[str, TrainResult]:
    """Train the demo models into ``repository``; datasets go to ``cache`` when given."""
    results: dict[str, TrainResult] = {}
    with tempfile.TemporaryDirectory(prefix="visionrpc-demo-") as scratch:
        data_root = cache if cache is not None else Path(scratch)
        for kind, run in runs.items():
            started = time.perf_counter()
            data = data_root / kind
            if not data.exists():
                make_dataset(kind, data, **run.data)
            results[kind] = train(demo_config(kind, run, data, repository, quiet))
            print(f"demo {kind}: {time.perf_counter() - started:.0f} s", flush=True)
    return results
