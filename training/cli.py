"""``visionrpc train ...``: train, find a learning rate, make synthetic data, build the demo.

    visionrpc train pets --data DIR --repository DIR [--arch resnet34 --epochs 4 ...]
    visionrpc train lr-find pets --data DIR [--out lr_find.png]
    visionrpc train make-data pets DIR
    visionrpc train demo --repository DIR

Registration touches argparse only; handlers import torch when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .kinds import KINDS
from .quantize import add_quantize_options

if TYPE_CHECKING:
    from .config import TrainConfig


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``train`` and its subcommands to the ``visionrpc`` parser."""
    train = subcommands.add_parser(
        "train", help="train models and add them to a repository", description=__doc__
    )
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = train.add_subparsers(dest="train_command", required=True, metavar="ACTION")
    for kind in KINDS:
        parser = actions.add_parser(kind, help=f"train the {kind} model ({KINDS[kind].summary})")
        add_training_arguments(parser)
        parser.add_argument(
            "--quantize", choices=("int8",),
            help="also add an int8 version (see visionrpc quantize) if its metric holds",
        )  # fmt: skip
        add_quantize_options(parser)
        parser.set_defaults(handler=_train, kind=kind)

    lr_find = actions.add_parser("lr-find", help="sweep learning rates and suggest one")
    lr_find.add_argument("kind", choices=tuple(KINDS))
    add_training_arguments(lr_find, with_repository=False)
    lr_find.add_argument("--out", type=Path, default=Path("lr_find.png"), help="plot file")
    lr_find.set_defaults(handler=_lr_find)

    make_data = actions.add_parser("make-data", help="write a small synthetic dataset")
    make_data.add_argument("kind", choices=tuple(KINDS))
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
    """One flag per TrainConfig field, from the field's type, default and help."""
    from .config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    if with_repository:
        _add_repository(parser)
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        if not meta["cli"]:
            continue
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kind = _value_type(hints[field.name])
        if kind is bool:
            if field.default:
                no_flag = "--no-" + flag.removeprefix("--")
                parser.add_argument(
                    no_flag, dest=field.name, action="store_false", help="off: " + meta["help"]
                )
            else:
                parser.add_argument(flag, dest=field.name, action="store_true", help=meta["help"])
            continue
        default = None if field.default is dataclasses.MISSING else field.default
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(
            flag,
            dest=field.name,
            type=meta["parse"] or kind,
            choices=meta["choices"],
            default=default,
            required=field.name == "data",
            help=meta["help"] + shown,
        )


def _value_type(annotation: Any) -> Any:
    """``int`` for ``int | None``: the type a flag's text is parsed to."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _value_type(inner)
    return annotation


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .config import TrainConfig

    values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if hasattr(args, field.name)
    }
    values["repository"] = values.get("repository") or Path(".")
    return TrainConfig(**values)


def _add_repository(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("VISIONRPC_REPOSITORY")
    parser.add_argument(
        "--repository", type=Path, default=default, required=default is None,
        help="model repository folder (env VISIONRPC_REPOSITORY)",
    )  # fmt: skip


def _failures() -> tuple[type[Exception], ...]:
    """Errors with a message meant for the user: printed without a traceback."""
    from .config import TrainConfigError
    from .datasets import DatasetError
    from .export import ExportParityError
    from .models import UnknownArchitecture, WeightsNotFound

    return DatasetError, WeightsNotFound, ExportParityError, TrainConfigError, UnknownArchitecture


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
