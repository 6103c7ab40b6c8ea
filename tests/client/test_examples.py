"""The example scripts run against a server whose pets/voc/biwi are analytic stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import solid
from tests.helpers.onnx_models import write_demo_stand_ins
from tests.helpers.server import RunningServer, free_port, server_in_thread

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("demo")
    write_demo_stand_ins(repository)
    with server_in_thread(repository) as running:
        yield running


def example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_example(name: str, *args: str) -> str:
    done = example(name, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_classify_pets_reports_a_broken_photo_and_exits_1(
    demo_server: RunningServer, tmp_path: Path
) -> None:
    Image.fromarray(solid((10, 240, 10))).save(tmp_path / "dog.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    done = example("classify_pets.py", str(tmp_path), "--server", demo_server.address)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("pets v1: 3 breeds")
    assert lines[1].startswith(f"{tmp_path / 'dog.png'}: beagle  [beagle ")
    assert done.stderr.startswith(f"{tmp_path / 'broken.png'}: could not be classified: image 0")
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("name", ["classify_pets.py", "multilabel_voc.py", "head_points_biwi.py"])
def test_examples_say_in_one_line_that_the_server_is_down(name: str, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    Image.fromarray(solid((10, 240, 10))).save(image)
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), str(image)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VISIONRPC_SERVER": address, "GRPC_VERBOSITY": "NONE"},
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"{name.removesuffix('.py')}: UNAVAILABLE")


def test_multilabel_voc(demo_server: RunningServer, tmp_path: Path) -> None:
    image = tmp_path / "scene.png"
    Image.fromarray(solid((200, 80, 10))).save(image)
    out = run_example(
        "multilabel_voc.py", str(image), "--all-scores", "--server", demo_server.address
    )
    lines = out.splitlines()
    assert lines[0] == "voc v1: default threshold 0.50; dog 0.20"
    assert lines[1] == f"{image}: person 0.78 (>= 0.50), dog 0.31 (>= 0.20)"
    assert [line.split()[0] for line in lines[2:]] == ["person", "dog", "car"]


def test_head_points_biwi_draws_the_point(demo_server: RunningServer, tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[2, 5] = 255
    image = tmp_path / "frame.png"
    Image.fromarray(pixels).save(image)
    drawn = tmp_path / "drawn"
    out = run_example(
        "head_points_biwi.py", str(image), "--draw", str(drawn), "--server", demo_server.address
    )
    assert f"{image} (8x8): head_center at (5.5, 2.5)" in out
    with Image.open(drawn / "frame_points.png") as marked:
        assert marked.getpixel((5, 2)) == (255, 0, 0)
