"""``visionrpc quantize`` and ``train --quantize int8``: real models, real quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.helpers import images
from tests.helpers.onnx_models import OPSET, config_dict, write_model
from tests.helpers.server import server_in_thread
from visionrpc.cli import main
from visionrpc.client import Client
from visionrpc.training.datasets import Dataset, Item, read_dataset
from visionrpc.training.evaluate import evaluate_served
from visionrpc.training.quantize import QUANTIZATION_FILE, quantize_version
from visionrpc.training.synthetic import make_dataset

pytestmark = pytest.mark.slow

TRAIN_FLAGS = [
    "--arch", "tiny", "--weights", "none", "--size", "32", "--epochs", "1",
    "--bs", "8", "--lr", "0.01", "--quiet",
]  # fmt: skip


def op_types(model_file: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(model_file)).graph.node}


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset("pets", tmp_path_factory.mktemp("data") / "pets", breeds=3, per_breed=10)


def test_quantize_adds_an_int8_version_the_server_serves_with_the_metric_it_printed(
    pets: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    assert main(["train", "pets", "--data", str(pets), "--repository", str(repository),
                 *TRAIN_FLAGS]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["quantize", "--repository", str(repository), "--model", "pets"]) == 0
    printed = capsys.readouterr().out
    assert "validation error_rate" in printed and "float32" in printed and "int8" in printed
    int8_dir = repository / "pets" / "2"
    record = json.loads((int8_dir / QUANTIZATION_FILE).read_text())
    assert record["source_version"] == 1 and record["metric"] == "error_rate"
    assert f"{record['float']:.4f}" in printed and f"{record['int8']:.4f}" in printed
    # QDQ: the convolutions run between quantize and dequantize pairs.
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= op_types(int8_dir / "model.onnx")
    assert "QuantizeLinear" not in op_types(repository / "pets" / "1" / "model.onnx")
    with server_in_thread(repository) as server, Client(server.address) as client:
        info = client.model_info("pets")
        assert info.version == "2"  # the newest version: int8 serves by default
        run = evaluate_served(client, info, read_dataset("pets", pets), tta=False)
    assert run.failed == []
    assert run.metrics["error_rate"] == pytest.approx(record["int8"], abs=1e-6)


def test_train_with_quantize_int8_writes_the_float_and_the_int8_version(
    pets: Path, tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    argv = ["train", "pets", "--data", str(pets), "--repository", str(repository), *TRAIN_FLAGS]
    assert main([*argv, "--quantize", "int8", "--max-drop", "1.0"]) == 0
    assert not (repository / "pets" / "1" / QUANTIZATION_FILE).exists()
    assert (repository / "pets" / "2" / QUANTIZATION_FILE).is_file()


# --- a model int8 cannot represent ---------------------------------------------------------


def outlier_classifier() -> onnx.ModelProto:
    """Channel means, scaled small, beside one feature 10^4 times larger.

    Per-tensor uint8 activations of the matrix product cover the large feature's range,
    so the small class scores all round to the same level: int8 guesses, float is right.
    """
    weights = np.array([[0.01, 0, 0, 100], [0, 0.01, 0, 100], [0, 0, 0.01, 100]], dtype=np.float32)
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "axes"], ["means"], keepdims=0),
        helper.make_node("Mul", ["means", "to_unit"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weights"], ["features"]),
        helper.make_node("Relu", ["features"], ["positive"]),
        helper.make_node("Slice", ["positive", "starts", "ends", "slice_axes"], ["classes"]),
        helper.make_node("Mul", ["classes", "gain"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    constants: dict[str, np.ndarray] = {
        "axes": np.array([1, 2], dtype=np.int64),
        "to_unit": np.array(1 / 255.0, dtype=np.float32),
        "weights": weights,
        "starts": np.array([0], dtype=np.int64),
        "ends": np.array([3], dtype=np.int64),
        "slice_axes": np.array([1], dtype=np.int64),
        "gain": np.array(1000.0, dtype=np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 8, 8, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


def colour_dataset(root: Path) -> Dataset:
    """Nearly grey squares, each a little stronger in one channel: its class."""
    items: list[Item] = []
    root.mkdir(parents=True)
    for index in range(12):
        label = index % 3
        colour = [120, 120, 120]
        colour[label] += 30
        path = root / f"{index}.png"
        path.write_bytes(images.encode(Image.new("RGB", (8, 8), tuple(colour)), "PNG"))
        items.append(Item(path=path, target=label))
    return Dataset(
        kind="pets",
        task="classification",
        vocab=("red", "green", "blue"),
        train=items,
        valid=items,
        root=root,
        skipped=[],
    )


def test_an_int8_version_that_loses_too_much_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "models"
    config = config_dict("outlier", "classification", ("red", "green", "blue"), 8)
    write_model(repository, config, outlier_classifier())
    dataset = colour_dataset(tmp_path / "colours")

    refused = quantize_version(repository, "outlier", dataset=dataset)
    assert refused.float_value == 0.0 and refused.int8_value > 0.5
    assert refused.version_dir is None
    assert not (repository / "outlier" / "2").exists()
    assert "not published" in capsys.readouterr().err

    forced = quantize_version(repository, "outlier", dataset=dataset, force=True)
    assert forced.version_dir == repository / "outlier" / "2"
    assert json.loads((forced.version_dir / QUANTIZATION_FILE).read_text())["int8"] > 0.5
