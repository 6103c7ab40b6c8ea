"""Defects found in review, each shown through a real server and real onnxruntime sessions."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import (
    OPSET,
    config_dict,
    write_channel_mean_classifier,
    write_model,
)
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.batching import Batcher, BatchSettings
from visionrpc.server.errors import ErrorKind, VisionRPCError

SIZE = 8
LABELS = ("red", "green", "blue")


def _graph(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "review",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _channel_means() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes giving ``means``: each channel's mean / 255, float32 ``[batch, 3]``."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "spatial_axes"], ["sums"], keepdims=0),
        helper.make_node("Mul", ["sums", "scale"], ["means"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "spatial_axes"),
        numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), "scale"),
    ]
    return nodes, initializers


def write_sqrt_multilabel(repository: Path, name: str) -> None:
    """sqrt(channel mean - 0.5): finite for bright channels, NaN for dark ones."""
    nodes, initializers = _channel_means()
    nodes += [
        helper.make_node("Sub", ["means", "half"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["scores"]),
    ]
    initializers.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"))
    config = config_dict(name, "multilabel", LABELS, SIZE)
    write_model(repository, config, _graph(nodes, initializers))


def write_fixed_batch_model(repository: Path, name: str) -> None:
    """Declares a dynamic batch axis but reshapes to a batch of one inside the graph.

    A common export mistake: batch 1 runs, any larger batch fails in onnxruntime.
    """
    nodes, initializers = _channel_means()
    nodes.append(helper.make_node("Reshape", ["means", "one_row"], ["scores"]))
    initializers.append(numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "one_row"))
    config = config_dict(name, "multilabel", LABELS, SIZE)
    write_model(repository, config, _graph(nodes, initializers))


async def test_non_finite_model_outputs_fail_only_their_image(tmp_path: Path) -> None:
    write_sqrt_multilabel(tmp_path, "sqrt")
    bright, dark = png(solid(255, 255, 255)), png(solid(0, 0, 0))
    async with (
        running_server(tmp_path) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        request = encoded_request(
            "sqrt", bright, dark, options=pb.PredictionOptions(all_scores=True)
        )
        response = await stub.Predict(request)
    good, bad = response.results
    assert [item.score for item in good.multilabel.all_scores] == pytest.approx([np.sqrt(0.5)] * 3)
    assert bad.WhichOneof("result") == "error"
    assert bad.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "image 1" in bad.error.message and "not finite" in bad.error.message


async def test_a_model_failing_its_warm_up_is_skipped_not_fatal(tmp_path: Path) -> None:
    write_fixed_batch_model(tmp_path, "fixedbatch")
    write_channel_mean_classifier(tmp_path, "colors")
    async with (
        running_server(tmp_path) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        assert [failure.model for failure in server.repository.failures] == ["fixedbatch"]
        stub = pb_grpc.InferenceServiceStub(channel)
        response = await stub.Predict(encoded_request("colors", png(solid(250, 0, 0))))
        assert response.results[0].classification.top[0].label == "red"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Predict(encoded_request("fixedbatch", png(solid(250, 0, 0))))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", ["\u00b2", "\u2460"])
async def test_a_version_of_non_ascii_digits_is_not_found(tmp_path: Path, version: str) -> None:
    write_channel_mean_classifier(tmp_path, "colors")
    async with (
        running_server(tmp_path) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        for call in (
            stub.GetModelInfo(pb.GetModelInfoRequest(model="colors", version=version)),
            stub.Predict(encoded_request("colors", png(solid(1, 2, 3)), version=version)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND


# Python, numpy and Pillow fit well under this; a 400 M-pixel letterbox (1.6 GB) does not.
_ADDRESS_SPACE_LIMIT = 1_500_000_000

_PAD_A_WIDE_IMAGE = f"""
import resource
resource.setrlimit(resource.RLIMIT_AS, ({_ADDRESS_SPACE_LIMIT}, {_ADDRESS_SPACE_LIMIT}))
from PIL import Image
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import prepare
# 16 M pixels, within the default ImageLimits; its square letterbox is 400 M pixels.
image = Image.new("RGB", (20000, 800), (250, 0, 0))
array, geometry = prepare(image, InputSpec(100, 100, "pad"))
print(*array[50, 50], *array[10, 50], *geometry.normalized_to_original(-1.0, 0.0),
      *geometry.normalized_to_original(1.0, 1.0))
"""


def test_padding_a_very_wide_image_needs_bounded_memory() -> None:
    finished = subprocess.run(
        [sys.executable, "-c", _PAD_A_WIDE_IMAGE],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    values = [float(value) for value in finished.stdout.split()]
    centre, border = values[0:3], values[3:6]
    # The image is a band across the middle of the input; the letterbox above it is black.
    assert centre[0] >= 245 and centre[1:] == [0, 0]
    assert border == [0, 0, 0]
    # The input's left edge at mid-height, and its bottom-right corner, in original pixels.
    assert values[6:] == pytest.approx([0.0, 400.0, 20000.0, 10400.0], abs=1e-6)


async def test_rows_that_cannot_be_stacked_fail_their_callers_instead_of_hanging() -> None:
    batching = BatchSettings(
        max_batch_size=2, max_queue_delay_ms=0.0, max_queue_size=8, instances=1
    )
    batcher = Batcher(lambda batch: batch * 2.0, batching, name="shapes")
    try:
        mismatched = [np.zeros((2, 2, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)]
        answers = await asyncio.wait_for(
            asyncio.gather(*batcher.submit(mismatched), return_exceptions=True), timeout=30
        )
        for answer in answers:
            assert isinstance(answer, VisionRPCError) and answer.kind is ErrorKind.INTERNAL
        # The batcher still serves the rows that come next.
        (doubled,) = await asyncio.wait_for(
            asyncio.gather(*batcher.submit([np.ones(3, np.float32)])), timeout=30
        )
        assert doubled.tolist() == [2.0, 2.0, 2.0]
    finally:
        await batcher.close()
