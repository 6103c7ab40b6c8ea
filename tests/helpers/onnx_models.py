"""Tiny analytic ONNX models whose exact outputs numpy can compute.

Each builder writes a real repository entry (config + ``<version>/model.onnx``) through
``write_repository_entry``, with the serving contract's input (uint8 NHWC, dynamic
batch) and output (float32 ``[batch, n]``). Each has a numpy reference next to it, so
tests compare the server's answers numerically instead of trusting a trained model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from visionrpc.server.model_config import (
    ModelConfig,
    model_config_from_dict,
    write_repository_entry,
)

OPSET = 18
# ReduceMean over H and W of an NHWC batch leaves one mean per channel.
_SPATIAL_AXES = np.array([1, 2], dtype=np.int64)


def config_dict(
    name: str, task: str, labels: Sequence[str], size: int, **overrides: Any
) -> dict[str, Any]:
    """A repository config; ``overrides`` replace or add top-level fields."""
    data: dict[str, Any] = {
        "name": name,
        "task": task,
        "labels": list(labels),
        "input": {"height": size, "width": size, "resize_method": "squish"},
    }
    data.update(overrides)
    return data


def write_model(repository: Path, config: dict[str, Any], model: onnx.ModelProto) -> Path:
    """Write one new version of a model; returns its version folder."""
    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        onnx.save(model, onnx_file)
        return write_repository_entry(repository, model_config_from_dict(config), onnx_file)


def write_corrupt_onnx(repository: Path, config: dict[str, Any]) -> Path:
    """A model whose ``model.onnx`` is not an ONNX file at all."""
    version_dir = write_model(repository, config, channel_mean_graph(1.0, 8, softmax=False))
    (version_dir / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf graph \xff\xfe")
    return version_dir


def write_wrong_width(repository: Path, config: dict[str, Any]) -> Path:
    """A model that returns three numbers per image whatever its config's labels say."""
    return write_model(
        repository, config, channel_mean_graph(1.0, config_size(config), softmax=False)
    )


def config_size(config: dict[str, Any]) -> int:
    return int(config["input"]["height"])


# --- classification: softmax over the channel means -------------------------------------


def write_channel_mean_classifier(
    repository: Path,
    name: str = "colors",
    size: int = 8,
    labels: Sequence[str] = ("red", "green", "blue"),
    temperature: float = 10.0,
    **config_overrides: Any,
) -> ModelConfig:
    """softmax(temperature * channel_mean / 255): a pure red image scores ``red`` highest."""
    if len(labels) != 3:
        raise ValueError("one label per RGB channel")
    config = config_dict(name, "classification", labels, size, **config_overrides)
    write_model(repository, config, channel_mean_graph(temperature, size, softmax=True))
    return model_config_from_dict(config)


def channel_mean_scores(batch: np.ndarray, temperature: float = 10.0) -> np.ndarray:
    """Reference of ``write_channel_mean_classifier`` for a uint8 ``[N, H, W, 3]`` batch."""
    logits = channel_means(batch) * temperature
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    scores: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return scores


# --- multilabel: the channel means themselves --------------------------------------------


def write_channel_mean_multilabel(
    repository: Path,
    name: str = "channels",
    size: int = 8,
    labels: Sequence[str] = ("red", "green", "blue"),
    **config_overrides: Any,
) -> ModelConfig:
    """Score of each label = mean of its channel / 255, so pixel value v scores v / 255."""
    if len(labels) != 3:
        raise ValueError("one label per RGB channel")
    config = config_dict(name, "multilabel", labels, size, **config_overrides)
    write_model(repository, config, channel_mean_graph(1.0, size, softmax=False))
    return model_config_from_dict(config)


def channel_means(batch: np.ndarray) -> np.ndarray:
    """Reference of ``write_channel_mean_multilabel``: float32 ``[N, 3]`` in [0, 1]."""
    means: np.ndarray = (batch.astype(np.float64).mean(axis=(1, 2)) / 255.0).astype(np.float32)
    return means


def channel_mean_graph(temperature: float, size: int, *, softmax: bool) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "spatial_axes"], ["means"], keepdims=0),
        helper.make_node("Mul", ["means", "scale"], ["scaled"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scaled"], ["scores"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["scaled"], ["scores"]))
    initializers = [
        numpy_helper.from_array(_SPATIAL_AXES, "spatial_axes"),
        numpy_helper.from_array(np.array(temperature / 255.0, dtype=np.float32), "scale"),
    ]
    return analytic_model(nodes, initializers, size, size, output_width=3)


# --- points: the brightness-weighted centroid --------------------------------------------


def write_centroid_points(
    repository: Path,
    name: str = "centroid",
    size: int = 8,
    labels: Sequence[str] = ("bright",),
    **config_overrides: Any,
) -> ModelConfig:
    """One point: the centroid of the image weighted by R+G+B, in [-1, 1] coordinates.

    Pixel column ``j`` sits at ``(j + 0.5) / W * 2 - 1``; a black image gives (0, 0).
    """
    if len(labels) != 1:
        raise ValueError("the centroid model predicts one point")
    config = config_dict(name, "points", labels, size, **config_overrides)
    write_model(repository, config, centroid_graph(size))
    return model_config_from_dict(config)


def write_demo_stand_ins(repository: Path) -> None:
    """Tiny analytic models named and labelled like the three demo models (pets, voc with a
    per-class threshold, biwi), for the examples that call all three."""
    write_channel_mean_classifier(repository, name="pets", labels=("abyssinian", "beagle", "pug"))
    write_channel_mean_multilabel(
        repository, name="voc", labels=("person", "dog", "car"), class_thresholds={"dog": 0.2}
    )
    write_centroid_points(repository, name="biwi", labels=("head_center",))


def centroid_points(batch: np.ndarray) -> np.ndarray:
    """Reference of ``write_centroid_points``: float32 ``[N, 2]`` as (x, y)."""
    weights = batch.astype(np.float64).sum(axis=3)
    height, width = weights.shape[1:]
    xs = (np.arange(width) + 0.5) / width * 2.0 - 1.0
    ys = (np.arange(height) + 0.5) / height * 2.0 - 1.0
    total = weights.sum(axis=(1, 2)) + _CENTROID_EPSILON
    x = (weights.sum(axis=1) @ xs) / total
    y = (weights.sum(axis=2) @ ys) / total
    return np.stack([x, y], axis=1).astype(np.float32)


# Keeps a black image at (0, 0) instead of 0 / 0; far below one pixel's weight of 1.
_CENTROID_EPSILON = 1e-6


def centroid_graph(size: int) -> onnx.ModelProto:
    coords = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32).reshape(size, 1)
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["pixels", "channel_axis"], ["weights"], keepdims=0),
        helper.make_node("ReduceSum", ["weights", "row_axis"], ["column_weights"], keepdims=0),
        helper.make_node("ReduceSum", ["weights", "column_axis"], ["row_weights"], keepdims=0),
        helper.make_node("MatMul", ["column_weights", "coords"], ["x_moment"]),
        helper.make_node("MatMul", ["row_weights", "coords"], ["y_moment"]),
        helper.make_node("Concat", ["x_moment", "y_moment"], ["moments"], axis=1),
        helper.make_node("ReduceSum", ["column_weights", "row_axis"], ["total"], keepdims=1),
        helper.make_node("Add", ["total", "epsilon"], ["safe_total"]),
        helper.make_node("Div", ["moments", "safe_total"], ["scores"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([3], dtype=np.int64), "channel_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "row_axis"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "column_axis"),
        numpy_helper.from_array(coords, "coords"),
        numpy_helper.from_array(np.array(_CENTROID_EPSILON, dtype=np.float32), "epsilon"),
    ]
    return analytic_model(nodes, initializers, size, size, output_width=2)


# --- shared -------------------------------------------------------------------------------


def analytic_model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    height: int,
    width: int,
    *,
    output_width: int,
) -> onnx.ModelProto:
    """Wrap nodes into a checked model: uint8 ``image[batch, H, W, 3]`` to float ``scores``."""
    graph = helper.make_graph(
        nodes,
        "analytic",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", height, width, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", output_width])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # the newest IR that every onnxruntime >= 1.16 reads
    onnx.checker.check_model(model, full_check=True)
    return model
