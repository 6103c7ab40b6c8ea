"""``TrainConfig``: every training setting declared once, with its type, default and help.

``visionrpc train``'s flags are generated from these fields (training.cli), so a new
setting is one field here. Importing this module loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kinds import KINDS, get_kind


class TrainConfigError(ValueError):
    """Options that do not fit together, such as mixup for point regression."""


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``240x320`` (height x width)."""
    try:
        sides = [int(part) for part in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIDE or HEIGHTxWIDTH in pixels")
    return (sides[0], sides[-1])


def option(
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
) -> dict[str, Any]:
    """A TrainConfig field's metadata: how its command-line flag reads it.

    ``flag`` overrides ``--field-name``; ``parse`` the type taken from the annotation.
    A boolean that defaults to True gets a ``--no-...`` flag.
    """
    return {"help": help, "flag": flag, "parse": parse, "choices": choices, "cli": cli}


@dataclass(frozen=True)
class TrainConfig:
    kind: str = field(metadata=option("dataset kind", cli=False))
    data: Path = field(metadata=option("the dataset's root folder"))
    repository: Path = field(metadata=option("model repository folder", cli=False))
    arch: str | None = field(
        default=None,
        metadata=option("architecture (tiny, a torchvision name, or timm:NAME); default per kind"),
    )
    epochs: int = field(
        default=4, metadata=option("epochs (after the frozen ones when pretrained)")
    )
    freeze_epochs: int = field(default=1, metadata=option("epochs with the pretrained body frozen"))
    lr: float | None = field(
        default=None, metadata=option("peak learning rate (default: lr_find's suggestion)")
    )
    size: tuple[int, int] | None = field(
        default=None,
        metadata=option(
            "model input: SIDE or HEIGHTxWIDTH (default 224, biwi 240x320)", parse=image_size
        ),
    )
    presize: tuple[int, int] | None = field(
        default=None,
        metadata=option(
            "item size before batch augmentation (default 1.5x; points: the model size)",
            parse=image_size,
        ),
    )
    bs: int = field(default=64, metadata=option("batch size per process"))
    resize_method: str = field(
        default="crop",
        metadata=option("how items fit the input", choices=("crop", "squish", "pad")),
    )
    weights: str | None = field(
        default=None,
        metadata=option("pretrained state dict (.pth), or 'none' for random initialisation"),
    )
    resume: Path | None = field(
        default=None,
        metadata=option(
            "checkpoint.pt of an earlier run: continue from its weights, at any --size"
        ),
    )
    seed: int = field(
        default=42, metadata=option("seed for the split, the order and the augmentation")
    )
    label_smoothing: float = field(default=0.0, metadata=option("classification: label smoothing"))
    mixup: float = field(default=0.0, metadata=option("mixup Beta alpha; 0 = off"))
    # Augmentation: None takes the task's default (training.augment.TASK_DEFAULTS).
    min_scale: float | None = field(
        default=None,
        metadata=option("smallest crop area kept, in (0, 1] (default 0.75; points 1: no crop)"),
    )
    max_rotate: float | None = field(
        default=None, metadata=option("largest rotation in degrees (default 10)")
    )
    max_lighting: float | None = field(
        default=None, metadata=option("brightness/contrast change (default 0.2)")
    )
    max_warp: float | None = field(default=None, metadata=option("perspective warp (default 0.2)"))
    max_zoom: float | None = field(default=None, metadata=option("largest zoom (default 1.1)"))
    flip_p: float | None = field(
        default=None, metadata=option("chance of a horizontal flip (default 0.5)")
    )
    tta: bool = field(
        default=True, metadata=option("also report the validation metric with flip TTA")
    )
    mixed_precision: bool = field(default=True, metadata=option("float16 autocast on CUDA"))
    cpu_bf16: bool = field(default=False, metadata=option("bfloat16 autocast on the CPU"))
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:1 ..."))
    strict: bool = field(default=False, metadata=option("fail on the first bad file"))
    valid_person: str | None = field(
        default=None, metadata=option("biwi: the person held out (default 13)")
    )
    valid_pct: float | None = field(
        default=None,
        metadata=option("share held out at random (pets: default 0.2; voc: instead of is_valid)"),
    )
    model_name: str | None = field(
        default=None,
        metadata=option("model name in the repository (default: the kind)", flag="--name"),
    )
    num_workers: int = field(default=0, metadata=option("loader processes"))
    quiet: bool = field(default=False, metadata=option("no progress bars"))

    @property
    def arch_name(self) -> str:
        return self.arch or get_kind(self.kind).default_arch

    def reader_options(self) -> dict[str, Any]:
        """The dataset reader's options; a split option the layout does not take is refused."""
        kind = get_kind(self.kind)
        options: dict[str, Any] = {"strict": self.strict}
        for name in ("valid_pct", "valid_person"):
            value = getattr(self, name)
            if value is None:
                continue
            if name not in kind.options:
                takers = [k.name for k in KINDS.values() if name in k.options]
                raise TrainConfigError(
                    f"{flag_of(name)} applies to {' and '.join(takers)} only, not {self.kind}"
                )
            options[name] = value
        if "seed" in kind.options:
            options["seed"] = self.seed
        return options


def flag_of(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    return field.metadata["flag"] or "--" + name.replace("_", "-")
