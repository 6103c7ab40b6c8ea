"""The user-facing commands: ``visionrpc predict``, ``models``, ``info`` and ``health``.

Registration touches argparse only; the handlers (``visionrpc.client.commands``)
import gRPC when a command runs. Exit codes scripts can rely on:

    0  success (``health``: the server or model is SERVING)
    1  some images failed (each is reported), or another server error
    2  usage error or invalid input (bad flag, missing file, rejected option)
    3  model or version not found
    4  server unavailable, overloaded, or deadline exceeded (``health``: not SERVING)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

DEFAULT_SERVER = "127.0.0.1:8001"


def _class_threshold(text: str) -> tuple[str, float]:
    label, separator, value = text.rpartition("=")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not separator or not label or not 0.0 <= threshold <= 1.0:
        raise argparse.ArgumentTypeError(f"expected LABEL=THRESHOLD in [0, 1], got {text!r}")
    return label, threshold


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get("VISIONRPC_SERVER", DEFAULT_SERVER),
        help="host:port of the server (default: $VISIONRPC_SERVER or %(default)s)",
    )
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    group.add_argument("--ca", metavar="PEM", help="CA certificate: connect with TLS")
    group.add_argument("--cert", metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--key", metavar="PEM", help="client private key (mutual TLS)")
    group.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    group.add_argument(
        "--token",
        default=os.environ.get("VISIONRPC_TOKEN"),
        help="bearer token sent as authorization metadata (default: $VISIONRPC_TOKEN)",
    )
    return flags


def _add_predict(subcommands: argparse._SubParsersAction[Any], parent: Any) -> None:
    parser = subcommands.add_parser(
        "predict",
        parents=[parent],
        help="predict image files or folders with a served model",
        description="Predict images (files, or folders searched recursively) with a served "
        "model. Prints a table, or JSON lines with --json. Exit code 1 when any image failed.",
    )
    parser.add_argument("model", help="model name, e.g. pets")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model-version", help="model version (default: the newest)")
    parser.add_argument("--top-k", type=_positive_int, help="classification: labels to show")
    parser.add_argument("--threshold", type=float, help="multilabel: threshold for every label")
    parser.add_argument(
        "--class-threshold",
        type=_class_threshold,
        action="append",
        default=[],
        metavar="LABEL=T",
        help="multilabel: threshold for one label (repeatable)",
    )
    parser.add_argument(
        "--min-confidence", type=float, help="classification: below it, none of the classes"
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation on/off (default: the model's setting)",
    )
    parser.add_argument("--tta-views", type=_positive_int, help="TTA views to use")
    parser.add_argument(
        "--all-scores", action="store_true", help="multilabel: show every label's score"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per request")
    parser.add_argument(
        "--max-in-flight", type=_positive_int, default=4, help="requests awaiting an answer"
    )
    parser.set_defaults(handler=_run("predict"))


def _run(command: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from . import commands

        return commands.run(command, args)

    return handler


COMMANDS = ("predict", "models", "info", "health")


def quiet_transport_logs(argv: Sequence[str]) -> None:
    """Keep gRPC's own log lines off a client command's stderr.

    gRPC's core logs each failed TLS handshake (and other transport trouble) to
    stderr before the call fails; the command already prints one line saying why.
    An explicit ``GRPC_VERBOSITY`` wins, for debugging.
    """
    if argv and argv[0] in COMMANDS:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``predict``, ``models``, ``info`` and ``health`` to the ``visionrpc`` parser."""
    connection = _connection_flags()
    _add_predict(subcommands, connection)

    models = subcommands.add_parser(
        "models",
        parents=[connection],
        help="list the served models; load, unload or reload one (model control)",
        description="Without arguments: the models the server serves. With --all, or with "
        "load|unload|reload NAME: the server's model-control API (serve --model-control-api "
        "true; load, unload and reload also need --model-control explicit).",
    )
    models.add_argument(
        "action", nargs="?", choices=("load", "unload", "reload"), help="model-control action"
    )
    models.add_argument("name", nargs="?", help="the model to load, unload or reload")
    models.add_argument(
        "--all",
        action="store_true",
        help="every model in the repository, loaded or not, with each version's state",
    )
    models.add_argument(
        "--control-token",
        default=os.environ.get("VISIONRPC_MODEL_CONTROL_TOKEN"),
        help="bearer token of the model-control API (default: $VISIONRPC_MODEL_CONTROL_TOKEN)",
    )
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=_run("models"))

    info = subcommands.add_parser(
        "info", parents=[connection], help="show a served model's labels, settings and metrics"
    )
    info.add_argument("model", help="model name")
    info.add_argument("--model-version", help="model version (default: the newest)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=_run("info"))

    health = subcommands.add_parser(
        "health",
        parents=[connection],
        help="check a server's (or a model's) health; exit 0 only when SERVING",
    )
    health.add_argument("model", nargs="?", help="model name (default: the whole server)")
    health.set_defaults(handler=_run("health"))
