"""Regenerate the Python code for the protos: visionrpc.v1 and the Open Inference Protocol.

    python -m visionrpc.protos.generate            # rewrite the committed files
    python -m visionrpc.protos.generate --out DIR  # write elsewhere (the test compares bytes)

The generated code is committed so that the client installs with grpcio and
protobuf alone. It is made with grpcio-tools 1.81 (protobuf 6 gencode), which
runs on protobuf 6 and 7; pyproject's dev extra pins that version.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = (
    "visionrpc/v1/inference.proto",
    "visionrpc/v1/model_control.proto",
    "inference/grpc_predict_v2.proto",
)
# Files whose descriptors live in a pool of their own instead of protobuf's default one:
# tritonclient (and other Open Inference Protocol clients) register the same symbols
# (inference.ModelInferRequest, ...) from their own file, and the default pool refuses a
# second definition, so with the default pool our server and their client could not be
# imported into one process.
PRIVATE_POOL_FILES = ("inference/grpc_predict_v2.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over PROTO_FILES and write the Python modules under out_dir."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *(str(PROTO_ROOT / name) for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        for name in PROTO_FILES:
            stem = Path(name).with_suffix("")
            for suffix in GENERATED_SUFFIXES:
                source = Path(tmp) / f"{stem}{suffix}"
                target = out_dir / f"{stem}{suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                text = _relative_imports(source.read_text())
                if name in PRIVATE_POOL_FILES and suffix == "_pb2.py":
                    text = _private_pool(text)
                target.write_text(text)
                written.append(target)
    return written


def _plugin(name: str) -> str:
    # mypy-protobuf's plugins sit beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install 'visionrpc[dev]'")
    return found


def _relative_imports(text: str) -> str:
    # protoc writes absolute imports ("from visionrpc.v1 import inference_pb2") that
    # would resolve against our own top-level package, or against a top-level
    # "inference" package that is not ours; siblings import relatively.
    text = re.sub(
        r"^from (?:visionrpc\.v1|inference) import (\w+)",
        r"from . import \1",
        text,
        flags=re.MULTILINE,
    )
    text = text.replace("import visionrpc.v1.inference_pb2", "from . import inference_pb2")
    return text.replace("import inference.grpc_predict_v2_pb2", "from . import grpc_predict_v2_pb2")


def _private_pool(text: str) -> str:
    default = "_descriptor_pool.Default().AddSerializedFile("
    if text.count(default) != 1:
        raise RuntimeError("unexpected generated code: cannot give it a private descriptor pool")
    return text.replace(default, "_descriptor_pool.DescriptorPool().AddSerializedFile(")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
