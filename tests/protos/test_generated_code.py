"""The committed generated code is exactly what the pinned generator produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from visionrpc.protos import generate, inference_pb2, task_from_proto, task_to_proto

PROTO_ROOT = Path(generate.__file__).resolve().parent


def test_regeneration_gives_the_committed_bytes(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert len(written) == len(generate.PROTO_FILES) * len(generate.GENERATED_SUFFIXES)
    for path in written:
        committed = PROTO_ROOT / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: make protos"


def test_generated_modules_import_without_the_package_absolute_path() -> None:
    # protoc's absolute "from visionrpc.v1 import ..." would not resolve; ours are relative.
    grpc_module = (PROTO_ROOT / "visionrpc/v1/inference_pb2_grpc.py").read_text()
    assert "from . import inference_pb2" in grpc_module
    assert "from visionrpc.v1" not in grpc_module


def test_messages_round_trip_through_the_wire_format() -> None:
    request = inference_pb2.PredictRequest(
        model="pets",
        images=[inference_pb2.Image(encoded=b"\xff\xd8")],
        options=inference_pb2.PredictionOptions(top_k=3, class_thresholds={"dog": 0.4}),
    )
    decoded = inference_pb2.PredictRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.options.HasField("top_k") and not decoded.options.HasField("threshold")


def test_client_side_imports_need_only_grpc_and_protobuf() -> None:
    blocked = ["numpy", "PIL", "onnxruntime", "torch", "yaml", "prometheus_client"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from visionrpc.protos import inference_pb2, inference_pb2_grpc\n"
        "print(inference_pb2.DESCRIPTOR.package)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "visionrpc.v1"


@pytest.mark.parametrize(
    ("task", "value"),
    [
        ("classification", inference_pb2.MODEL_TASK_CLASSIFICATION),
        ("multilabel", inference_pb2.MODEL_TASK_MULTILABEL),
        ("points", inference_pb2.MODEL_TASK_POINTS),
    ],
)
def test_task_names_map_to_the_model_task_enum_and_back(task: str, value: int) -> None:
    assert task_to_proto(task) == value
    assert task_from_proto(value) == task


def test_a_task_the_api_does_not_know_is_refused_on_the_way_out() -> None:
    with pytest.raises(ValueError, match="segmentation"):
        task_to_proto("segmentation")


def test_an_enum_value_from_a_newer_server_reads_as_unknown() -> None:
    # proto3 enums are open: the value survives the wire and must not break decoding.
    summary = inference_pb2.ModelSummary.FromString(
        inference_pb2.ModelSummary(name="m", task=42).SerializeToString()  # type: ignore[arg-type]
    )
    assert summary.task == 42
    assert task_from_proto(summary.task) == "unknown"
