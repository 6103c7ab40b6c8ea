"""A model that is slow to warm up, so a test can watch the server while it loads.

Its scores are the channel means of the image (like ``write_channel_mean_multilabel``);
a chain of matrix products that depends on the input, added in times zero, makes every
run, warm-up included, take a while without changing an answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import OPSET, config_dict, write_model

SIZE = 8
MATRIX = 1024


def write_slow_model(
    repository: Path, name: str = "slow", products: int = 100, max_batch_size: int = 1
) -> None:
    """``products`` matrix products of ``MATRIX`` squared per run set how slow it is; a
    run takes as long for a whole batch as for one image."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "spatial_axes"], ["means"], keepdims=0),
        helper.make_node("Mul", ["means", "scale"], ["scaled"]),
        helper.make_node("ReduceMean", ["scaled"], ["level"], keepdims=0),
        helper.make_node("Mul", ["weights", "level"], ["work_0"]),
    ]
    for step in range(products):
        nodes.append(helper.make_node("MatMul", [f"work_{step}", "weights"], [f"product_{step}"]))
        nodes.append(helper.make_node("Tanh", [f"product_{step}"], [f"work_{step + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"work_{products}"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["scaled", "nothing"], ["scores"]),
    ]
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "spatial_axes"),
        numpy_helper.from_array(np.array(1 / 255.0, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(
            (rng.standard_normal((MATRIX, MATRIX)) / np.sqrt(MATRIX)).astype(np.float32),
            "weights",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    # With batches of 1, the warm-up is one slow run.
    config = config_dict(
        name,
        "multilabel",
        ("red", "green", "blue"),
        SIZE,
        batching={"max_batch_size": max_batch_size},
    )
    write_model(repository, config, model)
