"""``visionrpc evaluate`` against a real server, on datasets whose right answers are known."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.onnx_models import write_channel_mean_classifier, write_channel_mean_multilabel
from tests.helpers.server import RunningServer, server_in_thread
from tests.semantics.asymmetric_models import write_fixed_point_model
from visionrpc.client import Client
from visionrpc.training.datasets import Item, read_biwi, read_pets, read_voc
from visionrpc.training.evaluate import EvaluationError, evaluate_served, register
from visionrpc.training.synthetic import make_biwi

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def pets_layout(root: Path) -> dict[str, str]:
    """Solid-colour pets files; every third one is named for another colour than it has."""
    (root / "images").mkdir(parents=True)
    shown: dict[str, str] = {}
    names = list(COLOURS)
    for n in range(30):
        named, drawn = names[n % 3], names[(n + (n % 3 == 0)) % 3]
        file_name = f"{named}_{n}.jpg"
        Image.new("RGB", (40, 30), COLOURS[drawn]).save(root / "images" / file_name, quality=95)
        shown[file_name] = drawn
    return shown


def voc_layout(root: Path) -> None:
    """Every image is one RGB level; its labels are the channels above 128 (is_valid all)."""
    (root / "train").mkdir(parents=True)
    rows = ["fname,labels,is_valid"]
    levels = [(200, 10, 10), (200, 200, 10), (10, 10, 200), (120, 140, 10), (10, 10, 10)]
    for n, level in enumerate([*levels, (250, 250, 250)]):
        Image.new("RGB", (24, 24), level).save(root / "train" / f"{n}.png")
        labels = " ".join(name for name, v in zip(COLOURS, level, strict=True) if v > 128)
        valid = n < len(levels)
        rows.append(f"{n}.png,{labels or 'red'},{valid}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")


def point_of(item: Item) -> tuple[float, float]:
    assert isinstance(item.target, tuple)
    x, y = item.target
    return float(x), float(y)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("repository")
    write_channel_mean_classifier(repository, "colors", labels=tuple(COLOURS))
    write_channel_mean_multilabel(repository, "channels", labels=tuple(COLOURS), threshold=0.5)
    write_fixed_point_model(
        repository,
        "centre",
        (0.5, 0.0),
        24,
        32,
        "squish",
        tta={"enabled": False, "views": ["flip"]},
    )
    with server_in_thread(repository) as server:
        yield server


def test_error_rate_counts_the_wrong_top_1_labels(served: RunningServer, tmp_path: Path) -> None:
    shown = pets_layout(tmp_path)
    dataset = read_pets(tmp_path, seed=1, valid_pct=0.5)
    expected = sum(
        shown[item.path.name] != item.path.name.split("_")[0] for item in dataset.valid
    ) / len(dataset.valid)
    assert 0 < expected < 1
    with Client(served.address) as client:
        info = client.model_info("colors")
        run = evaluate_served(client, info, dataset, tta=False, batch_size=4, in_flight=2)
    assert run.metrics == {"error_rate": pytest.approx(expected)}
    assert (run.images, run.failed, run.views) == (15, [], 1)


def test_accuracy_multi_scores_the_served_threshold_decisions(
    served: RunningServer, tmp_path: Path
) -> None:
    voc_layout(tmp_path)
    dataset = read_voc(tmp_path)
    # Served at 0.5 (128/255): (120, 140, 10) says green, and its csv row says green:
    # every decision is right except the all-dark image, whose csv row claims red.
    with Client(served.address) as client:
        run = evaluate_served(client, client.model_info("channels"), dataset, tta=False)
    assert run.metrics == {"accuracy_multi": pytest.approx(14 / 15)}


def test_point_error_is_in_original_pixels_with_and_without_tta(
    served: RunningServer, tmp_path: Path
) -> None:
    make_biwi(tmp_path, people=2, frames_per_person=3, seed=3)
    dataset = read_biwi(tmp_path)
    # (0.5, 0) of a squished 640x480 frame is (480, 240); the flipped view puts it at
    # (160, 240), and 0.75 * 160 + 0.25 * 480 = 240.
    expected = {
        False: np.mean([math.dist((480, 240), point_of(item)) for item in dataset.valid]),
        True: np.mean([math.dist((240, 240), point_of(item)) for item in dataset.valid]),
    }
    with Client(served.address) as client:
        info = client.model_info("centre")
        for tta in (False, True):
            run = evaluate_served(client, info, dataset, tta=tta)
            assert run.metrics == {"point_error_px": pytest.approx(expected[tta], abs=1e-3)}
            assert run.views == (2 if tta else 1)


def test_a_model_that_does_not_fit_the_dataset_is_refused(
    served: RunningServer, tmp_path: Path
) -> None:
    voc_layout(tmp_path)
    with Client(served.address) as client:
        info = client.model_info("colors")
        with pytest.raises(EvaluationError, match="classification model; the voc dataset"):
            evaluate_served(client, info, read_voc(tmp_path), tta=False)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="visionrpc")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


def test_the_command_runs_with_and_without_tta(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_biwi(tmp_path, people=2, frames_per_person=2, seed=4)
    argv = ["evaluate", "--server", served.address, "--model", "centre", "--data", str(tmp_path)]
    assert run_cli([*argv, "--dataset", "biwi", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(run["tta"], run["views"], run["images"]) for run in runs] == [
        (False, 1, 2),
        (True, 2, 2),
    ]
    assert run_cli([*argv, "--dataset", "biwi", "--no-tta"]) == 0
    table = capsys.readouterr().out
    assert "served, no TTA" in table and "served, TTA" not in table
    assert "point_error_px" in table


def test_the_command_reports_an_unknown_model(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--server", served.address, "--model", "nope", "--data", str(tmp_path)]
    assert run_cli(argv) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_the_command_needs_only_the_validation_persons_folder(
    served: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_biwi(tmp_path, people=2, frames_per_person=2, seed=5)
    for person in tmp_path.iterdir():
        if person.name != "13":
            shutil.rmtree(person)
    argv = ["evaluate", "--server", served.address, "--model", "centre", "--data", str(tmp_path)]
    assert run_cli([*argv, "--dataset", "biwi", "--valid-person", "13", "--no-tta"]) == 0
    table = capsys.readouterr().out
    assert f"(person 13 of {tmp_path}): 2 images" in table
    assert "served, no TTA" in table and "this one" in table
    assert run_cli([*argv, "--dataset", "biwi", "--valid-person", "4"]) == 1
    error = capsys.readouterr().err
    assert "person folders found: 13" in error and "--valid-person" in error
