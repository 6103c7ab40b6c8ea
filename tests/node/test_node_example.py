"""examples/node/predict.js (@grpc/grpc-js + @grpc/proto-loader) against a real server.

The server holds pets, voc and biwi as analytic stand-ins (channel means and a
centroid), so every answer is known from the pixels; the server's own counters show
what reached it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.node import run_node
from tests.helpers.onnx_models import write_demo_stand_ins
from tests.helpers.server import RunningServer, server_in_thread


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("demo")
    write_demo_stand_ins(repository)
    with server_in_thread(repository) as running:
        yield running


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    """A green image, an orange one, a black one with one white pixel, and a broken file."""
    green, orange = tmp_path / "green.png", tmp_path / "orange.png"
    Image.new("RGB", (8, 8), (10, 240, 10)).save(green)
    Image.new("RGB", (8, 8), (200, 80, 10)).save(orange)
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[2, 5] = 255
    frame = tmp_path / "frame.png"
    Image.fromarray(pixels).save(frame)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    return [green, orange, frame, broken]


def _count(server: RunningServer, name: str, model: str, code: str) -> float:
    labels = {"model": model, "version": "1", "code": code}
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_predicts_all_three_models_with_predict_and_predict_stream(
    demo_server: RunningServer, photos: list[Path]
) -> None:
    green, orange, frame, broken = photos
    done = run_node("predict.js", *map(str, photos), "--server", demo_server.address)
    lines = done.stdout.splitlines()
    assert (
        lines[0]
        == f"pets v1 MODEL_TASK_CLASSIFICATION {green}: beagle 1.00, abyssinian 0.00, pug 0.00"
    )
    assert lines[5] == f"voc v1 MODEL_TASK_MULTILABEL {orange}: person 0.78, dog 0.31"
    assert lines[6] == f"voc v1 MODEL_TASK_MULTILABEL {frame}: no label"
    assert lines[10] == f"biwi v1 MODEL_TASK_POINTS {frame}: head_center at (5.5, 2.5)"
    # The broken file fails alone, with its own status, in every model's answer.
    failed = [lines[3], lines[7], lines[11]]
    assert [line.split(" ", 1)[0] for line in failed] == ["pets", "voc", "biwi"]
    for line in failed:
        assert f" {broken}: error INVALID_ARGUMENT: image 3: not an image" in line
    assert lines[12] == "PredictStream: 12 answers to 12 requests, 0 differing from Predict"
    assert len(lines) == 13
    assert done.returncode == 1, done.stderr
    for model in ("pets", "voc", "biwi"):
        # One unary request for four images, then four streamed requests of one image.
        assert _count(demo_server, "visionrpc_requests_total", model, "OK") == 5
        assert _count(demo_server, "visionrpc_images_total", model, "OK") == 6
        assert _count(demo_server, "visionrpc_images_total", model, "INVALID_ARGUMENT") == 2


def test_every_image_answered_exits_0(demo_server: RunningServer, photos: list[Path]) -> None:
    done = run_node(
        "predict.js", str(photos[0]), "--models", "pets", "--server", demo_server.address
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "PredictStream: 1 answers to 1 requests, 0 differing from Predict"
    )


def test_an_unknown_model_fails_the_call_in_one_line(
    demo_server: RunningServer, photos: list[Path]
) -> None:
    done = run_node(
        "predict.js", str(photos[0]), "--models", "cats", "--server", demo_server.address
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("predict: NOT_FOUND: ")
    assert "cats" in line


def test_no_image_is_a_usage_mistake() -> None:
    done = run_node("predict.js", "--server", "127.0.0.1:1")
    assert (done.returncode, done.stderr.strip()) == (2, "predict: name at least one image file")
