"""Training throughput per task: images/s and epoch times, on the CPU and on a GPU if any.

    .venv/bin/python bench/train_bench.py                       # about a minute on 2 cores
    .venv/bin/python bench/train_bench.py --arch resnet18 --size 128 --epochs 3

Generates the synthetic pets, voc and biwi datasets in a temporary folder and trains
each for a few epochs with the real loaders, batch augmentation and learner. The first
epoch also decodes and presizes every image (then kept in memory); later epochs show the
steady training rate. Random weights: the speed is the same as pretrained.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from visionrpc.training.augment import AugmentConfig, augment_batch
from visionrpc.training.data import make_loaders
from visionrpc.training.datasets import read_dataset
from visionrpc.training.learner import EpochRecord, Learner, LearnerOptions
from visionrpc.training.models import create_model
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task

DATA_OPTIONS = {
    "pets": {"breeds": 10, "per_breed": 30},
    "voc": {"images": 300},
    "biwi": {"people": 4, "frames_per_person": 30},
}


def bench_task(
    kind: str, data: Path, device: torch.device, args: argparse.Namespace
) -> list[EpochRecord]:
    torch.manual_seed(0)
    size = (args.size * 3 // 4, args.size) if kind == "biwi" else (args.size, args.size)
    loaders = make_loaders(read_dataset(kind, data), size=size, bs=args.bs)
    task = get_task(loaders.task)
    model = create_model(args.arch, task.n_outputs(len(loaders.vocab)), None)
    config = AugmentConfig(size=size)
    generator = torch.Generator().manual_seed(0)

    def augment(
        images: torch.Tensor, points: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return augment_batch(images, points, config, generator)

    learner = Learner(
        model, loaders, task, device=device, augment=augment, options=LearnerOptions(quiet=True)
    )
    return learner.fit_one_cycle(args.epochs, 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny")
    parser.add_argument("--size", type=int, default=64, help="input side (biwi: 3/4 of it high)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", default=list(DATA_OPTIONS), choices=DATA_OPTIONS)
    args = parser.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="visionrpc-train-bench-") as scratch:
        for kind in args.tasks:
            data = make_dataset(kind, Path(scratch) / kind, **DATA_OPTIONS[kind])
            for device in devices:
                records = bench_task(kind, data, device, args)
                steady = records[1:] or records
                rate = sum(r.train_images for r in steady) / sum(r.train_seconds for r in steady)
                rows.append(
                    (
                        kind,
                        device.type,
                        records[0].train_images,
                        rate,
                        records[0].seconds,
                        statistics.mean(r.seconds for r in steady),
                    )
                )
    print(
        f"\narch {args.arch}, input {args.size} px, batch {args.bs}, {args.epochs} epochs, "
        f"{torch.get_num_threads()} CPU threads"
    )
    header = ("task", "device", "train imgs", "train img/s", "epoch 1 s", "later epoch s")
    print("  ".join(f"{h:>13}" for h in header))
    for kind, device_name, images, rate, first, later in rows:
        print(
            f"{kind:>13}  {device_name:>13}  {images:>13}  {rate:>13.1f}  "
            f"{first:>13.2f}  {later:>13.2f}"
        )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - started:.0f} s")
