"""The client works with only grpcio and protobuf: numpy and Pillow stay optional."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a fresh interpreter where importing numpy or PIL fails, as if not installed.
_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("numpy", "PIL"):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Block())

    import visionrpc.client
    from visionrpc.client import Client, InvalidInputError
    from visionrpc.client.inputs import to_proto_image

    assert to_proto_image(b"\\x89PNG fake").encoded == b"\\x89PNG fake"
    try:
        to_proto_image(object())
    except InvalidInputError as error:
        print("refused:", error.message)
    Client("127.0.0.1:1").close()
    print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "PIL")))
    """
)


def test_client_imports_and_encodes_bytes_without_numpy_or_pillow() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert "refused: unsupported image type object" in finished.stdout
    assert "loaded: []" in finished.stdout


def test_the_blocker_really_blocks() -> None:
    script = _SCRIPT.split("import visionrpc.client")[0] + "import numpy\n"
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode != 0
    assert "numpy is blocked" in finished.stderr


def test_registering_the_commands_does_not_load_grpc() -> None:
    script = (
        "import argparse, sys\n"
        "from visionrpc.client import cli\n"
        "cli.register(argparse.ArgumentParser().add_subparsers())\n"
        "print(sorted(m for m in ('grpc', 'google.protobuf', 'numpy') if m in sys.modules))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "[]"


def test_every_public_name_resolves_from_its_home() -> None:
    import visionrpc.client as client

    assert sorted(client.__all__) == sorted(client._HOMES)
    for name in client.__all__:
        assert getattr(client, name) is not None
    assert "Client" in dir(client)
