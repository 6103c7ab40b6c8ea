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

# Folders are searched for the suffixes the server reports (ModelInfo.accepted_extensions);
# these stand in for a server too old to report them (it decoded these formats).
FALLBACK_SUFFIXES = frozenset({".jpg", ".jpeg", ".mpo", ".png", ".webp", ".bmp", ".gif"})
# How many skipped files are named before "and N more".
_SKIPPED_SHOWN = 5

_EXIT_BY_ERROR: tuple[tuple[type[VisionRPCError], int], ...] = (
    (InvalidInputError, EXIT_USAGE),
    (ModelNotFoundError, EXIT_NOT_FOUND),
    (UnavailableError, EXIT_UNAVAILABLE),
    (DeadlineExceededError, EXIT_UNAVAILABLE),
    (OverloadedError, EXIT_UNAVAILABLE),
)


class UsageError(Exception):
    """A problem with the command line itself (exit code 2)."""


def image_files(paths: list[str], suffixes: frozenset[str]) -> tuple[list[Path], list[Path]]:
    """The given files, plus files with ``suffixes`` under the given folders, sorted.

    Paths named on the command line that are not folders are kept whatever their suffix,
    and even when missing: each then fails alone, named (the client or the server says
    what is wrong with it), and its neighbours are still predicted. Files found in
    folders with other suffixes are returned second, as skipped.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file()):
                (files if found.suffix.lower() in suffixes else skipped).append(found)
        else:
            files.append(path)
    return files, skipped


def _searched_suffixes(client: Client, args: argparse.Namespace) -> frozenset[str]:
    """The suffixes of the formats the server accepts; asked only when a folder is given."""
    if not any(Path(name).is_dir() for name in args.paths):
        return frozenset()  # only folders are searched
    info = client.model_info(args.model, args.model_version)
    return frozenset(info.accepted_extensions) or FALLBACK_SUFFIXES


def _report_skipped(skipped: list[Path]) -> None:
    if not skipped:
        return
    shown = ", ".join(str(path) for path in skipped[:_SKIPPED_SHOWN])
    more = f" and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
    print(
        f"visionrpc predict: skipped {len(skipped)} files not in a format the server accepts: "
        f"{shown}{more}",
        file=sys.stderr,
    )


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
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return Client(args.server, token=args.token, timeout=args.timeout, tls=tls)


def _predict(args: argparse.Namespace) -> int:
    with connect(args) as client:
        files, skipped = image_files(args.paths, _searched_suffixes(client, args))
        _report_skipped(skipped)
        if not files:
            raise UsageError("no image files found")
        report = progress_reporter(len(files), enabled=len(files) > args.batch_size)
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
    failed = [result for result in results if isinstance(result, ImageError)]
    for failure in failed:
        # The message names the file: "image 3 (cats/x.jpg): ...".
        print(f"visionrpc predict: {failure.code}: {_one_line(failure.message)}", file=sys.stderr)
    if failed:
        print(f"visionrpc predict: {len(failed)} of {len(files)} images failed", file=sys.stderr)
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

    wanted = args.action is None and args.name is None if args.all else args.action and args.name
    if not wanted:
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _say(command: str, error: Exception) -> None:
    print(f"visionrpc {command}: {_one_line(str(error))}", file=sys.stderr)
