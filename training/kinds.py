"""The dataset kinds, declared once: the CLI, the readers, training and evaluate read this.

Importing it loads nothing heavy, so ``visionrpc --help`` can list the kinds with any
subset of the extras installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetKind:
    name: str
    task: str
    # The function of training.datasets that reads this layout.
    reader: str
    # Which reader options (TrainConfig fields of the same name) this layout takes.
    options: tuple[str, ...]
    # fastai's book: resnet34 for pets, resnet50 for PASCAL, resnet18 for BIWI.
    default_arch: str
    # (height, width) of the model's input when --size is not given.
    default_size: tuple[int, int]
    summary: str


KINDS: dict[str, DatasetKind] = {
    kind.name: kind
    for kind in (
        DatasetKind(
            "pets", "classification", "read_pets", ("valid_pct", "seed"), "resnet34",
            (224, 224), "Oxford-IIIT Pet breeds",
        ),
        DatasetKind(
            "voc", "multilabel", "read_voc", ("valid_pct", "seed"), "resnet50",
            (224, 224), "PASCAL VOC 2007 multi-label",
        ),
        # BIWI frames are 640x480: a 4:3 input keeps the whole frame, and so every head, in view.
        DatasetKind(
            "biwi", "points", "read_biwi", ("valid_person",), "resnet18",
            (240, 320), "BIWI head centres",
        ),
    )
}  # fmt: skip


def get_kind(name: str) -> DatasetKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown dataset kind {name!r}: use one of {', '.join(KINDS)}") from None


def kind_of_task(task: str) -> str:
    """The one registered kind of this task, for models trained before kinds were recorded."""
    (kind,) = [k.name for k in KINDS.values() if k.task == task]
    return kind
