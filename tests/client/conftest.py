"""A repository of analytic models and real servers for the client tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.onnx_models import (
    channel_mean_graph,
    config_dict,
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
    write_model,
)
from tests.helpers.server import RunningServer, server_in_thread

# "colors" version 1 has temperature 10 (see write_channel_mean_classifier); the newest,
# version 2, has temperature 2, so a version option is visible in the scores.
NEWEST_TEMPERATURE = 2.0
OLD_TEMPERATURE = 10.0
COLORS_TTA_VIEWS = ["flip", "zoom_center"]


def write_test_models(repository: Path) -> Path:
    """colors (classification, 2 versions), channels (multilabel), centroid (points)."""
    write_channel_mean_classifier(repository, tta={"enabled": False, "views": COLORS_TTA_VIEWS})
    newest = config_dict(
        "colors",
        "classification",
        ("red", "green", "blue"),
        8,
        tta={"enabled": False, "views": COLORS_TTA_VIEWS},
        version_policy={"all": {}},
    )
    write_model(repository, newest, channel_mean_graph(NEWEST_TEMPERATURE, 8, softmax=True))
    write_channel_mean_multilabel(repository, threshold=0.5)
    write_centroid_points(repository, tta={"enabled": False, "views": ["flip"]})
    return repository


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_models(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    """One real server (own thread and loop) shared by a module's tests."""
    with server_in_thread(repository) as running:
        yield running


def random_images(count: int, seed: int = 0, size: int = 8) -> list[np.ndarray]:
    """Distinct uint8 RGB images of the models' input size (so geometry is the identity)."""
    generator = np.random.default_rng(seed)
    return [generator.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def solid(rgb: tuple[int, int, int], size: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (size, size, 3)).copy()
