"""The ``visionrpc`` command: one entry point, each part registers its subcommands.

Registration only touches argparse, so ``visionrpc --help`` works with any subset of
the extras installed; a subcommand whose extra is missing says which one to install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from visionrpc import __version__

Handler = Callable[[argparse.Namespace], int]
# Commands whose every dependency comes with the train extra (Pillow and numpy included).
TRAINING_COMMANDS = frozenset({"train", "quantize"})
TRAINING_MODULES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "timm", "matplotlib"})


def build_parser() -> argparse.ArgumentParser:
    from visionrpc.client import cli as client_cli
    from visionrpc.server import cli as server_cli
    from visionrpc.training import cli as training_cli
    from visionrpc.training import evaluate as evaluate_cli
    from visionrpc.training import quantize as quantize_cli

    parser = argparse.ArgumentParser(prog="visionrpc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"visionrpc {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server_cli.register(subcommands)
    training_cli.register(subcommands)
    client_cli.register(subcommands)
    evaluate_cli.register(subcommands)
    quantize_cli.register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from visionrpc.client import cli as client_cli

    # Before build_parser: registering the commands may load gRPC, which reads its
    # log settings once, on import.
    client_cli.quiet_transport_logs(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        training = args.command in TRAINING_COMMANDS or module in TRAINING_MODULES
        extra = "train" if training else "server"
        print(
            f"visionrpc {args.command}: missing module {exc.name!r}; "
            f"install it with: pip install 'visionrpc[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
