"""``visionrpc train inspect``: what the reader found, and one augmented batch to look at.

    visionrpc train inspect biwi --data ~/data/biwi_head_pose [--out batch.png]

As fastai's ``DataBlock.summary`` and ``show_batch``: the images per label (per person for
BIWI) in each split, every skipped file with its reason, and one training batch saved
after the same batch augmentation training applies, points drawn on their heads.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from . import plots
from .config import TrainConfig
from .data import make_loaders
from .datasets import Dataset, Item, read_dataset
from .models import uint8_to_float
from .tasks import get_task
from .train import augmenter, input_size

# Enough to see the augmentation vary, few enough to read the titles.
BATCH_IMAGES = 16
SKIPPED_SHOWN = 20


def inspect_dataset(config: TrainConfig, out: Path) -> str:
    """The report printed by the command; the augmented batch is written to ``out``."""
    dataset = read_dataset(config.kind, config.data, **config.reader_options())
    size = input_size(config)
    loaders = make_loaders(
        dataset,
        size=size,
        presize=config.presize,
        bs=min(config.bs, BATCH_IMAGES),
        resize_method=config.resize_method,
        seed=config.seed,
    )
    torch.manual_seed(config.seed)
    images, targets = next(iter(loaders.train))
    augment = augmenter(config, dataset.task, size)
    points = targets if dataset.task == "points" else None
    augmented, moved = augment(uint8_to_float(images), points)
    pictures = (augmented * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    if moved is not None:
        plots.points_grid(pictures, moved, None, out)
    else:
        titles = get_task(dataset.task).decode_targets(targets, dataset.vocab)
        plots.image_grid(pictures, titles, out)
    return "\n".join([*summary(dataset), f"one augmented training batch: {out}"])


def summary(dataset: Dataset) -> list[str]:
    """Counts per label and split, then the skipped files with their reasons."""
    lines = [
        f"{dataset.kind} ({dataset.task}) in {dataset.root}: {len(dataset.train)} training and "
        f"{len(dataset.valid)} validation images; validation split: {dataset.split}",
    ]
    heading = "person" if dataset.task == "points" else "label"
    train, valid = _counts(dataset, dataset.train), _counts(dataset, dataset.valid)
    width = max([len(heading), *(len(name) for name in train | valid)])
    lines.append(f"  {heading:<{width}}  {'train':>7}  {'valid':>7}")
    for name in sorted(train | valid):
        lines.append(f"  {name:<{width}}  {train[name]:>7}  {valid[name]:>7}")
    if dataset.skipped:
        lines.append(f"skipped {len(dataset.skipped)} file(s):")
        lines.extend(f"  {path}: {reason}" for path, reason in dataset.skipped[:SKIPPED_SHOWN])
        if len(dataset.skipped) > SKIPPED_SHOWN:
            lines.append(f"  ... and {len(dataset.skipped) - SKIPPED_SHOWN} more")
    else:
        lines.append("skipped no files")
    return lines


def _counts(dataset: Dataset, items: list[Item]) -> Counter[str]:
    """Images per label (multi-label: images carrying it); per person folder for points."""
    counts: Counter[str] = Counter()
    for item in items:
        if dataset.task == "points":
            counts[item.path.parent.name] += 1
        elif isinstance(item.target, int):
            counts[dataset.vocab[item.target]] += 1
        else:
            counts.update(dataset.vocab[int(i)] for i in item.target)
    return counts
