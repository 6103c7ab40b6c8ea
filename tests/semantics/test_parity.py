"""Models trained and exported by the training module answer the same served as offline.

Tiny models are trained on synthetic data (a few seconds each on a CPU); the offline
answer is training's validation path, the PyTorch serving model on
``prepare(decode_for_model(bytes, spec), spec)``, and the served one comes through a
real server. Phone-sized JPEGs, which both decode at a reduced scale, are among the files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.helpers import images
from tests.helpers.server import server_in_thread
from visionrpc.client import Client
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.model_config import (
    ModelConfig,
    TTAConfig,
    find_config_file,
    load_model_config,
    write_repository_entry,
)
from visionrpc.server.preprocess import Geometry, decode_for_model, prepare
from visionrpc.training.config import TrainConfig
from visionrpc.training.datasets import Dataset, read_dataset
from visionrpc.training.evaluate import evaluate_served, register
from visionrpc.training.export import serving_model
from visionrpc.training.models import ServingModel, model_from_checkpoint
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task
from visionrpc.training.train import train

pytestmark = pytest.mark.slow

SCORE_TOLERANCE = 1e-4
POINT_TOLERANCE_PX = 0.5
# A phone photo's size: the 32x32 models make it decode at 1/8 scale.
PHOTO_SIZE = (4000, 3000)
SYNTHETIC_SIZES = {
    "pets": {"breeds": 3, "per_breed": 8},
    "voc": {"images": 24},
    "biwi": {"people": 2, "frames_per_person": 8},
}


@dataclass(frozen=True)
class Trained:
    config: ModelConfig
    serving: ServingModel
    dataset: Dataset


@dataclass(frozen=True)
class Served:
    address: str
    stub: pb_grpc.InferenceServiceStub
    models: dict[str, Trained]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("parity")
    repository = root / "repository"
    models: dict[str, Trained] = {}
    for kind, sizes in SYNTHETIC_SIZES.items():
        data = make_dataset(kind, root / kind, **sizes)
        result = train(
            TrainConfig(
                kind=kind,
                data=data,
                repository=repository,
                arch="tiny",
                weights="none",
                size=(32, 32),
                bs=8,
                epochs=1,
                lr=1e-2,
                device="cpu",
                quiet=True,
                valid_pct=0.25 if kind == "pets" else None,
            )
        )
        assert result.version_dir is not None
        checkpoint = torch.load(result.version_dir / "checkpoint.pt", weights_only=False)
        config_file = find_config_file(result.version_dir.parent)
        assert config_file is not None
        config = load_model_config(config_file)
        serving = serving_model(model_from_checkpoint(checkpoint), get_task(config.task))
        options = {"valid_pct": 0.25} if kind == "pets" else {}
        models[kind] = Trained(config, serving, read_dataset(kind, data, **options))
    # The biwi model again, with a flip TTA whose beta 0.5 makes it mirror-symmetric.
    biwi = models["biwi"].config
    symmetric = dataclasses.replace(
        biwi, name="biwi_symmetric", tta=TTAConfig(enabled=True, views=("flip",), beta=0.5)
    )
    write_repository_entry(repository, symmetric, repository / "biwi" / "1" / "model.onnx")
    with (
        server_in_thread(repository) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield Served(server.address, pb_grpc.InferenceServiceStub(channel), models)


def offline(trained: Trained, data: bytes) -> tuple[np.ndarray, Geometry]:
    """Training's validation path for one file: its scores (or points) and geometry."""
    spec = trained.config.input
    pixels, geometry = prepare(decode_for_model(data, spec), spec)
    with torch.no_grad():
        outputs = trained.serving(torch.from_numpy(pixels.copy())[None]).numpy()[0]
    return outputs, geometry


def served_results(served: Served, trained: Trained, files: list[bytes]) -> list[pb.ImageResult]:
    """Every score of every file, without TTA: the options of the model's own task."""
    options = {
        "classification": pb.PredictionOptions(tta=False, top_k=1000),
        "multilabel": pb.PredictionOptions(tta=False, threshold=0.0, all_scores=True),
        "points": pb.PredictionOptions(tta=False),
    }[trained.config.task]
    request = pb.PredictRequest(
        model=trained.config.name,
        images=[pb.Image(encoded=data) for data in files],
        options=options,
    )
    results = list(served.stub.Predict(request, timeout=120).results)
    errors = [r.error.message for r in results if r.WhichOneof("result") == "error"]
    assert errors == []
    return results


def odd_files(trained: Trained) -> dict[str, bytes]:
    """Two validation images in every awkward encoding, and one blown up to a phone photo."""
    files: dict[str, bytes] = {}
    for item in trained.dataset.valid[:2]:
        with Image.open(item.path) as picture:
            for name, data in images.odd_encodings(picture).items():
                files[f"{item.path.name}:{name}"] = data
    with Image.open(trained.dataset.valid[0].path) as picture:
        photo = picture.convert("RGB").resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
    large = {
        "large-jpeg": images.encode(photo, "JPEG", quality=90),
        "large-jpeg-exif-rotated": images.exif_jpeg(photo, 6),
        "large-jpeg-progressive": images.progressive_jpeg(photo),
        "large-jpeg-cmyk": images.encode(photo.convert("CMYK"), "JPEG", quality=90),
    }
    for name, data in large.items():
        # Parity must hold where the reduced-scale decode is in play, not beside it.
        assert decode_for_model(data, trained.config.input).scale == 8, name
        files[name] = data
    return files


def served_scores(result: pb.ImageResult, labels: tuple[str, ...]) -> np.ndarray:
    if result.WhichOneof("result") == "classification":
        by_label = {s.label: s.score for s in result.classification.top}
    else:
        by_label = {s.label: s.score for s in result.multilabel.all_scores}
    return np.array([by_label[label] for label in labels])


@pytest.mark.parametrize("kind", ["pets", "voc"])
def test_served_scores_equal_the_validation_path(served: Served, kind: str) -> None:
    trained = served.models[kind]
    files = odd_files(trained)
    results = served_results(served, trained, list(files.values()))
    worst = {
        name: float(
            np.abs(served_scores(result, trained.config.labels) - offline(trained, data)[0]).max()
        )
        for (name, data), result in zip(files.items(), results, strict=True)
    }
    assert max(worst.values()) <= SCORE_TOLERANCE, worst


def test_served_points_equal_the_validation_path_in_original_pixels(served: Served) -> None:
    trained = served.models["biwi"]
    files = odd_files(trained)
    results = served_results(served, trained, list(files.values()))
    for (name, data), result in zip(files.items(), results, strict=True):
        (u, v), geometry = offline(trained, data)
        (point,) = result.points.points
        expected = geometry.normalized_to_original(float(u), float(v))
        assert (point.x, point.y) == pytest.approx(expected, abs=POINT_TOLERANCE_PX), name
        assert (point.x_normalized, point.y_normalized) == pytest.approx(
            (u, v), abs=SCORE_TOLERANCE
        ), name
        assert (result.original_width, result.original_height) == (
            geometry.original_width,
            geometry.original_height,
        ), name


@pytest.mark.parametrize(("kind", "tolerance"), [("pets", 1e-6), ("voc", 1e-6), ("biwi", 0.05)])
def test_served_metric_without_tta_equals_the_one_training_recorded(
    served: Served, kind: str, tolerance: float
) -> None:
    trained = served.models[kind]
    with Client(served.address) as client:
        info = client.model_info(trained.config.name)
        run = evaluate_served(client, info, trained.dataset, tta=False)
    (name, value), *_ = run.metrics.items()
    assert run.failed == []
    assert value == pytest.approx(trained.config.training.metrics[name], abs=tolerance)


@pytest.mark.parametrize(("kind", "tolerance"), [("pets", 1e-6), ("voc", 1e-6), ("biwi", 0.05)])
def test_served_metric_with_tta_equals_trainings_tta_metric(
    served: Served, kind: str, tolerance: float
) -> None:
    trained = served.models[kind]
    with Client(served.address) as client:
        info = client.model_info(trained.config.name)
        run = evaluate_served(client, info, trained.dataset, tta=True)
    (name, value), *_ = run.metrics.items()
    assert run.failed == [] and run.views == 2
    assert value == pytest.approx(trained.config.training.metrics[f"{name}_tta"], abs=tolerance)


def test_evaluate_finds_the_dataset_kind_in_the_training_summary(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = served.models["voc"]
    parser = argparse.ArgumentParser(prog="visionrpc")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["--server", served.address, "--model", "voc", "--data", str(trained.dataset.root)]
    args = parser.parse_args(["evaluate", *argv, "--no-tta", "--json"])
    assert args.handler(args) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert run["images"] == len(trained.dataset.valid)
    expected = trained.config.training.metrics["accuracy_multi"]
    assert run["metrics"]["accuracy_multi"] == pytest.approx(expected, abs=1e-6)


def test_a_flip_tta_with_beta_half_makes_points_mirror_exactly(served: Served) -> None:
    trained = served.models["biwi"]
    originals, mirrored = [], []
    for item in trained.dataset.valid[:4]:
        with Image.open(item.path) as picture:
            originals.append(images.encode(picture, "PNG"))
            mirrored.append(images.encode(ImageOps.mirror(picture), "PNG"))
    request = pb.PredictRequest(
        model="biwi_symmetric", images=[pb.Image(encoded=d) for d in originals + mirrored]
    )
    results = served.stub.Predict(request, timeout=120).results
    half = len(originals)
    for plain, flipped in zip(results[:half], results[half:], strict=True):
        (p,), (q,) = plain.points.points, flipped.points.points
        width = plain.original_width
        assert (q.x, q.y) == pytest.approx((width - p.x, p.y), abs=0.05)
        assert plain.tta_applied and plain.tta_views == 2


def test_evaluate_says_whether_trainings_figure_comes_from_the_same_split(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = served.models["pets"]
    parser = argparse.ArgumentParser(prog="visionrpc")
    register(parser.add_subparsers(dest="command", required=True))
    argv = ["--server", served.address, "--model", "pets", "--data", str(trained.dataset.root)]
    args = parser.parse_args(["evaluate", *argv, "--no-tta"])
    assert args.handler(args) == 0
    same = capsys.readouterr().out
    assert "random 25% (seed 42)" in same
    assert same.splitlines()[-1].endswith("the same")
    args = parser.parse_args(["evaluate", *argv, "--no-tta", "--seed", "7"])
    assert args.handler(args) == 0
    other = capsys.readouterr().out
    assert "random 25% (seed 7)" in other
    assert "seed=42" in other.splitlines()[-1] and "a different one" in other.splitlines()[-1]
