"""``visionrpc train ...``: train, find a learning rate, make synthetic data, build the demo.

    visionrpc train pets --data DIR --repository DIR [--arch resnet34 --epochs 4 ...]
    visionrpc train lr-find pets --data DIR [--out lr_find.png]
    visionrpc train make-data pets DIR
    visionrpc train demo --repository DIR

Registration touches argparse only; handlers import torch when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .quantize import add_quantize_options

if TYPE_CHECKING:
    from .train import TrainConfig

KINDS = ("pets", "voc", "biwi")
ARCHS = ("tiny", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small")


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``train`` and its subcommands to the ``visionrpc`` parser."""
    train = subcommands.add_parser(
        "train", help="train models and add them to a repository", description=__doc__
    )
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = train.add_subparsers(dest="train_command", required=True, metavar="ACTION")
    for kind in KINDS:
        parser = actions.add_parser(kind, help=f"train the {kind} model")
        add_training_arguments(parser)
        parser.add_argument(
            "--quantize", choices=("int8",),
            help="also add an int8 version (see visionrpc quantize) if its metric holds",
        )  # fmt: skip
        add_quantize_options(parser)
        parser.set_defaults(handler=_train, kind=kind)

    lr_find = actions.add_parser("lr-find", help="sweep learning rates and suggest one")
    lr_find.add_argument("kind", choices=KINDS)
    add_training_arguments(lr_find, with_repository=False)
    lr_find.add_argument("--out", type=Path, default=Path("lr_find.png"), help="plot file")
    lr_find.set_defaults(handler=_lr_find)

    make_data = actions.add_parser("make-data", help="write a small synthetic dataset")
    make_data.add_argument("kind", choices=KINDS)
    make_data.add_argument("directory", type=Path)
    make_data.add_argument("--seed", type=int, default=0)
    make_data.set_defaults(handler=_make_data)

    demo = actions.add_parser(
        "demo", help="train small pets, voc and biwi models on synthetic data"
    )
    _add_repository(demo)
    demo.add_argument("--cache", type=Path, help="where the synthetic datasets go (kept)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)


def add_training_arguments(
    parser: argparse.ArgumentParser, *, with_repository: bool = True
) -> None:
    parser.add_argument("--data", type=Path, required=True, help="the dataset's root folder")
    if with_repository:
        _add_repository(parser)
    parser.add_argument("--arch", choices=ARCHS, help="default: resnet34/50/18 for pets/voc/biwi")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, help="default: lr_find's suggestion")
    parser.add_argument(
        "--size",
        type=image_size,
        help="model input: SIDE or HEIGHTxWIDTH (default 224, biwi 240x320)",
    )
    parser.add_argument(
        "--presize", type=image_size, help="item size before batch augmentation (default 1.5x)"
    )
    parser.add_argument("--bs", type=int, default=64, help="batch size per process")
    parser.add_argument("--resize-method", choices=("crop", "squish", "pad"), default="crop")
    parser.add_argument(
        "--weights", help="pretrained state dict (.pth), or 'none' for random initialisation"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--mixup", type=float, default=0.0, help="Beta alpha; 0 = off")
    parser.add_argument(
        "--no-mixed-precision", dest="mixed_precision", action="store_false",
        help="train in float32 on CUDA too",
    )  # fmt: skip
    parser.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad file")
    parser.add_argument("--valid-person", help="biwi: the person held out (default 13)")
    parser.add_argument("--valid-pct", type=float, help="pets: share held out (default 0.2)")
    parser.add_argument("--name", help="model name in the repository (default: the kind)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def image_size(text: str) -> tuple[int, int]:
    """``224`` or ``240x320`` (height x width)."""
    try:
        sides = [int(part) for part in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIDE or HEIGHTxWIDTH in pixels")
    return (sides[0], sides[-1])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .train import TrainConfig

    return TrainConfig(
        kind=args.kind,
        data=args.data,
        repository=getattr(args, "repository", None) or Path("."),
        arch=args.arch,
        epochs=args.epochs,
        freeze_epochs=args.freeze_epochs,
        lr=args.lr,
        size=args.size,
        presize=args.presize,
        bs=args.bs,
        resize_method=args.resize_method,
        weights=args.weights,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
        mixup=args.mixup,
        mixed_precision=args.mixed_precision,
        cpu_bf16=args.cpu_bf16,
        device=args.device,
        strict=args.strict,
        valid_person=args.valid_person,
        valid_pct=args.valid_pct,
        model_name=args.name,
        num_workers=args.num_workers,
        quiet=args.quiet,
    )


def _add_repository(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("VISIONRPC_REPOSITORY")
    parser.add_argument(
        "--repository", type=Path, default=default, required=default is None,
        help="model repository folder (env VISIONRPC_REPOSITORY)",
    )  # fmt: skip


def _failures() -> tuple[type[Exception], ...]:
    """Errors with a message meant for the user: printed without a traceback."""
    from .datasets import DatasetError
    from .export import ExportParityError
    from .models import WeightsNotFound
    from .train import TrainConfigError

    return DatasetError, WeightsNotFound, ExportParityError, TrainConfigError


def _train(args: argparse.Namespace) -> int:
    from .train import train

    try:
        result = train(config_from_args(args))
    except _failures() as exc:
        print(f"visionrpc train {args.kind}: {exc}", file=sys.stderr)
        return 1
    if result.version_dir is None:
        return 1
    if args.quantize is None:
        return 0
    from .quantize import QuantizationError, quantize_version

    try:
        quantized = quantize_version(
            args.repository,
            result.version_dir.parent.name,
            version=int(result.version_dir.name),
            max_drop=args.max_drop,
            calibration_images=args.calibration_images,
            force=args.force,
        )
    except QuantizationError as exc:
        print(f"visionrpc train {args.kind} --quantize: {exc}", file=sys.stderr)
        return 1
    return 0 if quantized.version_dir is not None else 1


def _lr_find(args: argparse.Namespace) -> int:
    from .plots import lr_find_curve
    from .train import find_lr, open_session

    try:
        result = find_lr(open_session(config_from_args(args)))
    except _failures() as exc:
        print(f"visionrpc train lr-find: {exc}", file=sys.stderr)
        return 1
    lr_find_curve(result.lrs, result.losses, result.suggestions, args.out)
    for name, lr in result.suggestions.items():
        print(f"{name}: {lr:.2e}")
    print(f"plot: {args.out}")
    return 0


def _make_data(args: argparse.Namespace) -> int:
    from .synthetic import make_dataset

    root = make_dataset(args.kind, args.directory, seed=args.seed)
    print(f"wrote a synthetic {args.kind} dataset to {root}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_demo

    build_demo(args.repository, cache=args.cache, quiet=args.quiet)
    return 0
