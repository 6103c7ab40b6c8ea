"""Analytic ONNX models that are NOT mirror-symmetric, so a TTA flip changes their answer.

``sides``: scores from the mean brightness of the left and right halves of the input,
so a flipped view swaps them. ``fixed_point``: always the same [-1, 1] point, so each
view's answer lands somewhere else in the original image and the blend is computable
by hand from the views' geometry alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_models import analytic_model, write_model
from visionrpc.server.model_config import ModelConfig, model_config_from_dict

OPSET = 18


def write_sides_model(
    repository: Path,
    name: str,
    task: str,
    size: int,
    temperature: float,
    **config_fields: Any,
) -> ModelConfig:
    """Two labels, ``left`` and ``right``; m = mean brightness of that half / 255 in [0, 1].

    classification: softmax(temperature * m); multilabel: m itself (temperature ignored).
    """
    if size % 2:
        raise ValueError("the halves need an even input width")
    half = size // 2
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Slice", ["pixels", "left_start", "left_end", "width_axis"], ["left"]),
        helper.make_node("Slice", ["pixels", "right_start", "right_end", "width_axis"], ["right"]),
        helper.make_node("ReduceMean", ["left", "all_but_batch"], ["left_mean"], keepdims=1),
        helper.make_node("ReduceMean", ["right", "all_but_batch"], ["right_mean"], keepdims=1),
        helper.make_node("Concat", ["left_mean", "right_mean"], ["means"], axis=1),
        helper.make_node("Reshape", ["means", "batch_by_two"], ["flat_means"]),
    ]
    if task == "classification":
        scale = temperature / 255.0
        nodes.append(helper.make_node("Mul", ["flat_means", "scale"], ["logits"]))
        nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    else:
        scale = 1.0 / 255.0
        nodes.append(helper.make_node("Mul", ["flat_means", "scale"], ["scores"]))
    initializers = [
        _ints("left_start", [0]),
        _ints("left_end", [half]),
        _ints("right_start", [half]),
        _ints("right_end", [size]),
        _ints("width_axis", [2]),
        _ints("all_but_batch", [1, 2, 3]),
        _ints("batch_by_two", [-1, 2]),
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
    ]
    config = _config(name, task, ["left", "right"], size, config_fields)
    write_model(repository, config, analytic_model(nodes, initializers, size, size, output_width=2))
    return model_config_from_dict(config)


def sides_scores(image: np.ndarray, task: str, temperature: float) -> np.ndarray:
    """Reference of ``write_sides_model`` for one uint8 HWC input."""
    half = image.shape[1] // 2
    means = np.array([image[:, :half].mean(), image[:, half:].mean()]) / 255.0
    if task != "classification":
        return means
    exp = np.exp(temperature * means - (temperature * means).max())
    scores: np.ndarray = exp / exp.sum()
    return scores


def write_fixed_point_model(
    repository: Path,
    name: str,
    point: tuple[float, float],
    input_height: int,
    input_width: int,
    resize_method: str,
    **config_fields: Any,
) -> ModelConfig:
    """One point, ``head``, always at ``point`` in the model's [-1, 1] coordinates."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        # Anything times zero, so the output still has the batch's rows.
        helper.make_node("ReduceMean", ["pixels", "all_but_batch"], ["mean"], keepdims=1),
        helper.make_node("Reshape", ["mean", "batch_by_one"], ["column"]),
        helper.make_node("Mul", ["column", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "point"], ["scores"]),
    ]
    initializers = [
        _ints("all_but_batch", [1, 2, 3]),
        _ints("batch_by_one", [-1, 1]),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([point], dtype=np.float32), "point"),
    ]
    config = _config(name, "points", ["head"], input_height, config_fields)
    config["input"] = {"height": input_height, "width": input_width, "resize_method": resize_method}
    write_model(
        repository,
        config,
        analytic_model(nodes, initializers, input_height, input_width, output_width=2),
    )
    return model_config_from_dict(config)


def _config(
    name: str, task: str, labels: list[str], size: int, fields: dict[str, Any]
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": name,
        "task": task,
        "labels": labels,
        "input": {"height": size, "width": size, "resize_method": "squish"},
    }
    config.update(fields)
    return config


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)
