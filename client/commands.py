"""What the ``visionrpc`` client commands do once parsed (see ``visionrpc.client.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ._sync import Client
from .channel import TLSConfig
from .errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
    VisionRPCError,
)
from .progress import progress_reporter
from .results import ImageError, Prediction
from .table import format_table, summarize

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4

# What the server decodes (see the proto's Image.encoded); folders are searched for these.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

_EXIT_BY_ERROR: tuple[tuple[type[VisionRPCError], int], ...] = (
    (InvalidInputError, EXIT_USAGE),
    (ModelNotFoundError, EXIT_NOT_FOUND),
    (UnavailableError, EXIT_UNAVAILABLE),
    (DeadlineExceededError, EXIT_UNAVAILABLE),
    (OverloadedError, EXIT_UNAVAILABLE),
)


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def image_files(paths: list[str]) -> list[Path]:
    """The given files, plus image files found under the given folders, recursively, sorted."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(p for p in found if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such file or folder: {name}")
    if not files:
        raise UsageError("no image files found")
    return files


def _read_pem(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings of the connection flags; None for plaintext."""
    if not (args.ca or args.cert or args.key or args.tls):
        return None
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together")
    return TLSConfig(
        root_certificates=_read_pem(args.ca),
        certificate_chain=_read_pem(args.cert),
        private_key=_read_pem(args.key),
    )


def connect(args: argparse.Namespace) -> Client:
    """A client for the connection flags of any command."""
    tls = _tls(args)
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return Client(args.server, timeout=args.timeout, tls=tls, metadata=metadata)


def _predict(args: argparse.Namespace) -> int:
    files = image_files(args.paths)
    report = progress_reporter(len(files), enabled=len(files) > args.batch_size)
    with connect(args) as client:
        try:
            results = client.predict_many(
                args.model,
                files,
                batch_size=args.batch_size,
                max_in_flight=args.max_in_flight,
                version=args.model_version,
                top_k=args.top_k,
                threshold=args.threshold,
                thresholds=dict(args.class_threshold),
                min_confidence=args.min_confidence,
                tta=args.tta,
                tta_views=args.tta_views,
                all_scores=args.all_scores,
                progress=report,
            )
        finally:
            report.close()
    _print_predictions(files, results, as_json=args.json)
    failed = sum(isinstance(result, ImageError) for result in results)
    if failed:
        print(f"visionrpc predict: {failed} of {len(files)} images failed", file=sys.stderr)
        return EXIT_IMAGES_FAILED
    return EXIT_OK


def _print_predictions(files: list[Path], results: list[Prediction], *, as_json: bool) -> None:
    if as_json:
        for path, result in zip(files, results, strict=True):
            print(json.dumps({"path": str(path), **result.to_dict()}))
        return
    rows = [(str(path), summarize(result)) for path, result in zip(files, results, strict=True)]
    print(format_table(("PATH", "RESULT"), rows))


def _models(args: argparse.Namespace) -> int:
    if args.action is not None or args.all:
        return _model_control(args)
    with connect(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps([model.to_dict() for model in models], indent=2))
    else:
        rows = [
            (model.name, model.task, ", ".join(model.versions), model.provider) for model in models
        ]
        print(format_table(("MODEL", "TASK", "VERSIONS", "PROVIDER"), rows))
    return EXIT_OK


def _model_control(args: argparse.Namespace) -> int:
    """``models --all`` and ``models load|unload|reload NAME``, through ModelControlService."""
    from .model_control import ModelControlClient

    if (args.action is None) == (args.name is None) or (args.action and args.all):
        raise UsageError("use load|unload|reload NAME, or --all")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    with ModelControlClient(
        args.server, timeout=args.timeout, tls=_tls(args), token=args.control_token
    ) as control:
        if args.action is None:
            models = control.index()
        else:
            models = [getattr(control, args.action)(args.name)]
    if args.json:
        print(json.dumps([model.to_dict() for model in models], indent=2))
        return EXIT_OK
    rows = []
    for model in models:
        rows.append((model.name, "", model.state, model.reason))
        rows.extend(("", v.version, v.state, v.reason) for v in model.versions)
    print(format_table(("MODEL", "VERSION", "STATE", "REASON"), rows))
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.model_info(args.model, args.model_version)
    print(json.dumps(info.to_dict(), indent=2) if args.json else str(info))
    return EXIT_OK


def _health(args: argparse.Namespace) -> int:
    with connect(args) as client:
        status = client.health(args.model)
    print(status.name)
    return EXIT_OK if status else EXIT_UNAVAILABLE


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "predict": _predict,
    "models": _models,
    "info": _info,
    "health": _health,
}


def exit_code_for(error: VisionRPCError) -> int:
    """The documented exit code for a failed call."""
    for error_class, code in _EXIT_BY_ERROR:
        if isinstance(error, error_class):
            return code
    return EXIT_IMAGES_FAILED


def run(command: str, args: argparse.Namespace) -> int:
    """Run one command; failures become a one-line reason on stderr and an exit code."""
    try:
        return _COMMANDS[command](args)
    except (UsageError, OSError) as error:
        _say(command, error)
        return EXIT_USAGE
    except VisionRPCError as error:
        _say(command, error)
        return exit_code_for(error)


def _say(command: str, error: Exception) -> None:
    reason = " ".join(str(error).split())
    print(f"visionrpc {command}: {reason}", file=sys.stderr)
