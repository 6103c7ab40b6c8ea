"""ONNX export: the repository contract, parity with PyTorch, and a broken export caught."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from visionrpc.server.model_config import find_config_file, load_model_config
from visionrpc.training.data import DataLoaders, make_loaders
from visionrpc.training.datasets import read_dataset
from visionrpc.training.export import (
    ExportParityError,
    build_config,
    check_parity,
    export_onnx,
    export_to_repository,
    serving_model,
)
from visionrpc.training.learner import Learner
from visionrpc.training.models import ServingModel, create_model
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task


def trained_serving(loaders: DataLoaders) -> ServingModel:
    """One epoch, so BatchNorm carries real running statistics into the export."""
    torch.manual_seed(0)
    task = get_task(loaders.task)
    model = create_model("tiny", task.n_outputs(len(loaders.vocab)), None)
    Learner(model, loaders, task, device=torch.device("cpu")).fit_one_cycle(1, 1e-2)
    return serving_model(model, task)


def valid_batches(loaders: DataLoaders) -> list[torch.Tensor]:
    return [images for images, _ in itertools.islice(loaders.valid, 2)]


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> DataLoaders:
    root = make_dataset("pets", tmp_path_factory.mktemp("pets"), breeds=4, per_breed=10)
    return make_loaders(read_dataset("pets", root), size=(32, 40), bs=8)


@pytest.fixture(scope="module")
def exported(
    pets: DataLoaders, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, ServingModel]:
    serving = trained_serving(pets)
    path = export_onnx(serving, pets.spec, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return path, serving


def test_export_takes_uint8_nhwc_with_any_batch_size_and_returns_probabilities(
    exported: tuple[Path, ServingModel],
) -> None:
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.type == "tensor(uint8)"
    assert model_input.shape[1:] == [32, 40, 3]
    for batch in (1, 5):
        images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 40, 3), np.uint8)
        (outputs,) = session.run(None, {model_input.name: images})
        assert outputs.shape == (batch, 4)
        assert outputs.dtype == np.float32
        np.testing.assert_allclose(outputs.sum(axis=1), 1.0, rtol=1e-5)


def test_export_matches_pytorch_on_real_validation_batches(
    exported: tuple[Path, ServingModel], pets: DataLoaders
) -> None:
    path, serving = exported
    worst = check_parity(path, serving, valid_batches(pets))
    assert 0.0 <= worst <= 1e-4


def test_a_broken_export_is_caught_with_the_size_of_the_difference(
    exported: tuple[Path, ServingModel], pets: DataLoaders, tmp_path: Path
) -> None:
    path, serving = exported
    graph = onnx.load(str(path))
    last_linear = max(
        (init for init in graph.graph.initializer if len(init.dims) == 2), key=lambda i: i.name
    )
    weights = numpy_helper.to_array(last_linear) * 1.5
    last_linear.CopyFrom(numpy_helper.from_array(weights.astype(np.float32), last_linear.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    with pytest.raises(ExportParityError, match="differs from PyTorch by up to"):
        check_parity(broken, serving, valid_batches(pets))


def test_points_export_returns_coordinates_within_minus_one_to_one(tmp_path: Path) -> None:
    root = make_dataset("biwi", tmp_path / "biwi", people=2, frames_per_person=6)
    loaders = make_loaders(read_dataset("biwi", root), size=(24, 32), bs=4)
    serving = trained_serving(loaders)
    path = export_onnx(serving, loaders.spec, tmp_path / "points.onnx")
    check_parity(path, serving, valid_batches(loaders))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (outputs,) = session.run(None, {"images": next(iter(loaders.valid))[0].numpy()})
    assert outputs.shape[1] == 2
    assert np.all(np.abs(outputs) <= 1.0)


def test_repository_entry_loads_with_the_servers_config_reader(
    exported: tuple[Path, ServingModel], pets: DataLoaders, tmp_path: Path
) -> None:
    _, serving = exported
    config = build_config(
        name="pets",
        task=get_task("classification"),
        labels=pets.vocab,
        spec=pets.spec,
        threshold=0.5,
        metrics={"error_rate": 0.25},
        dataset="/data/pets",
        dataset_kind="pets",
        dataset_options={"valid_pct": 0.2, "seed": 42},
        arch="tiny",
    )
    version_dir = export_to_repository(
        tmp_path / "repo", config, serving, valid_batches(pets), tmp_path / "work"
    )
    assert version_dir == tmp_path / "repo" / "pets" / "1"
    config_file = find_config_file(tmp_path / "repo" / "pets")
    assert config_file is not None
    loaded = load_model_config(config_file)
    assert loaded.labels == pets.vocab
    assert (loaded.input.height, loaded.input.width) == (32, 40)
    assert loaded.training.metrics == {"error_rate": 0.25}
    assert (loaded.training.dataset, loaded.training.dataset_kind) == ("/data/pets", "pets")
    assert loaded.training.dataset_options == {"valid_pct": 0.2, "seed": 42}
    assert loaded.tta.views == ("flip",) and not loaded.tta.enabled
    assert (version_dir / "model.onnx").is_file()
