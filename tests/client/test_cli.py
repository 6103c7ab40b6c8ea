"""``visionrpc predict/models/info/health`` in a subprocess, against a real server."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import NEWEST_TEMPERATURE, solid
from tests.client.scripted_server import MetadataRecorder, inference_server
from tests.helpers.onnx_models import channel_mean_scores, write_channel_mean_classifier
from tests.helpers.server import RunningServer, free_port, running_server
from tests.helpers.tls import make_certificates

COLOURS = {"red": (250, 10, 10), "green": (10, 250, 10), "blue": (10, 10, 250)}


# Runs the console script's main() with tqdm made unimportable, as if not installed.
_WITHOUT_TQDM = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tqdm":
            raise ImportError("tqdm is blocked for this test")
sys.meta_path.insert(0, Block())
from visionrpc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def visionrpc(
    *args: str,
    server: str | None = None,
    stderr: int | None = subprocess.PIPE,
    without_tqdm: bool = False,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if server is not None:
        env["VISIONRPC_SERVER"] = server
    entry = ["-c", _WITHOUT_TQDM] if without_tqdm else ["-m", "visionrpc.cli"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nested folders of solid-colour PNGs, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    for index, (name, rgb) in enumerate(COLOURS.items()):
        target = root / ("nested" if index == 2 else ".") / f"{index}_{name}.png"
        target.parent.mkdir(exist_ok=True)
        Image.fromarray(solid(rgb)).save(target)
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root


def test_predict_prints_a_table_of_folder_images(server: RunningServer, folder: Path) -> None:
    done = visionrpc("predict", "colors", str(folder), "--top-k", "1", server=server.address)
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["PATH", "RESULT"]
    assert [row.split()[0] for row in rows] == [
        str(folder / "0_red.png"),
        str(folder / "1_green.png"),
        str(folder / "nested" / "2_blue.png"),
    ]
    expected = channel_mean_scores(np.stack([solid(rgb) for rgb in COLOURS.values()]), 2.0)
    for row, name, scores in zip(rows, COLOURS, expected, strict=True):
        assert row.split()[1:] == [name, f"{scores.max():.3f}"]
    assert done.stderr == (
        "visionrpc predict: skipped 1 files not in a format the server accepts: "
        f"{folder / 'notes.txt'}\n"
    )


def test_predict_json_lines(server: RunningServer, folder: Path) -> None:
    image = folder / "0_red.png"
    done = visionrpc(
        "predict", "colors", str(image), str(image), "--json", "--server", server.address
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 2
    assert lines[0]["path"] == str(image)
    assert lines[0]["type"] == "Classification"
    assert lines[0]["top"][0]["label"] == "red"
    expected = channel_mean_scores(solid(COLOURS["red"])[None], NEWEST_TEMPERATURE)[0]
    assert lines[0]["top"][0]["score"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_predict_passes_every_option(server: RunningServer, folder: Path) -> None:
    done = visionrpc(
        "predict",
        "channels",
        str(folder / "0_red.png"),
        "--threshold",
        "0.01",
        "--class-threshold",
        "green=0.9",
        "--all-scores",
        "--tta",
        "--tta-views",
        "1",
        "--batch-size",
        "1",
        "--timeout",
        "10",
        "--json",
        server=server.address,
    )
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(text) for text in done.stdout.splitlines()]
    assert [entry["label"] for entry in line["labels"]] == ["red", "blue"]
    assert len(line["all_scores"]) == 3
    assert (line["tta_applied"], line["tta_views"]) == (True, 2)


def test_min_confidence_and_model_version(server: RunningServer, folder: Path) -> None:
    # Red scores 0.9998 with version 1 (temperature 10) but 0.77 with version 2.
    lines = []
    for version in ("1", "2"):
        done = visionrpc(
            "predict",
            "colors",
            str(folder / "0_red.png"),
            "--min-confidence",
            "0.99",
            "--model-version",
            version,
            "--no-tta",
            "--json",
            server=server.address,
        )
        assert done.returncode == 0, done.stderr
        lines.append(json.loads(done.stdout))
    assert [line["version"] for line in lines] == ["1", "2"]
    assert [line["below_min_confidence"] for line in lines] == [False, True]


def test_a_broken_image_exits_1_and_reports_it(
    server: RunningServer, folder: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    done = visionrpc(
        "predict", "colors", str(folder / "0_red.png"), str(broken), server=server.address
    )
    assert done.returncode == 1
    assert "ERROR INVALID_ARGUMENT" in done.stdout.splitlines()[2]
    assert done.stderr.splitlines() == [
        f"visionrpc predict: INVALID_ARGUMENT: image 1 ({broken}): the PNG data cannot be "
        "decoded (Truncated File Read); the file may be truncated or damaged",
        "visionrpc predict: 1 of 2 images failed",
    ]


def test_a_missing_file_fails_alone_and_its_neighbours_are_printed(
    server: RunningServer, folder: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.png"
    done = visionrpc(
        "predict", "colors", str(folder / "0_red.png"), str(missing), server=server.address
    )
    assert done.returncode == 1
    assert "red" in done.stdout.splitlines()[1]
    assert f"ERROR INVALID_ARGUMENT: image 1 ({missing})" in done.stdout.splitlines()[2]
    stderr = done.stderr.splitlines()
    assert len(stderr) == 2
    assert stderr[0].startswith(f"visionrpc predict: INVALID_ARGUMENT: image 1 ({missing}): ")
    assert stderr[1] == "visionrpc predict: 1 of 2 images failed"


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["predict", "nope", "{image}"], 3, "NOT_FOUND"),
        (["predict", "channels", "{image}", "--threshold", "2"], 2, "INVALID_ARGUMENT"),
        (["predict", "colors", "{empty}"], 2, "no image files found"),
        (["info", "nope"], 3, "NOT_FOUND"),
        (["health", "nope"], 3, "no health for 'nope'"),
        (["predict", "colors", "{image}", "--cert", "{image}"], 2, "--cert and --key"),
    ],
)
def test_failures_exit_with_their_code_and_one_line(
    server: RunningServer,
    folder: Path,
    tmp_path: Path,
    args: list[str],
    code: int,
    reason: str,
) -> None:
    values = {"image": str(folder / "0_red.png"), "empty": str(tmp_path)}
    done = visionrpc(*(arg.format(**values) for arg in args), server=server.address)
    assert done.returncode == code
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert reason in done.stderr


def test_a_malformed_class_threshold_is_a_usage_error(server: RunningServer) -> None:
    done = visionrpc(
        "predict", "channels", "x.png", "--class-threshold", "red", server=server.address
    )
    assert done.returncode == 2
    assert "LABEL=THRESHOLD" in done.stderr


def test_no_server_exits_4(folder: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    for args in (["predict", "colors", str(folder)], ["models"], ["health"]):
        # Retries go on until the deadline, so either reason may end the call.
        done = visionrpc(*args, "--timeout", "1", server=address)
        assert done.returncode == 4, args
        assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr


def test_models_info_and_health(server: RunningServer) -> None:
    listed = visionrpc("models", server=server.address)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "MODEL",
        "centroid",
        "channels",
        "colors",
    ]
    as_json = json.loads(visionrpc("models", "--json", server=server.address).stdout)
    assert as_json[2] == {
        "name": "colors",
        "task": "classification",
        "versions": ["1", "2"],
        "provider": "CPUExecutionProvider",
    }
    info = visionrpc("info", "colors", "--model-version", "1", "--json", server=server.address)
    assert info.returncode == 0
    assert json.loads(info.stdout)["labels"] == ["red", "green", "blue"]
    readable = visionrpc("info", "channels", server=server.address)
    assert "channels v1 (multilabel)" in readable.stdout
    healthy = visionrpc("health", "colors", server=server.address)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "SERVING")


def read_all(terminal: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_no_progress_bar_when_stderr_is_not_a_terminal(server: RunningServer, folder: Path) -> None:
    many = [str(folder / "0_red.png")] * 5
    piped = visionrpc("predict", "colors", *many, "--batch-size", "2", server=server.address)
    assert piped.returncode == 0
    assert piped.stderr == ""


@pytest.mark.parametrize("without_tqdm", [False, True])
def test_progress_bar_on_a_terminal(
    server: RunningServer, folder: Path, without_tqdm: bool
) -> None:
    many = [str(folder / "0_red.png")] * 5
    terminal, child_side = os.openpty()
    # A fresh pseudo-terminal is 0 columns wide, in which a bar has no room at all.
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        on_tty = visionrpc(
            "predict",
            "colors",
            *many,
            "--batch-size",
            "2",
            server=server.address,
            stderr=child_side,
            without_tqdm=without_tqdm,
        )
        os.close(child_side)
        shown = read_all(terminal)
    finally:
        os.close(terminal)
    assert on_tty.returncode == 0
    assert "5/5" in shown
    assert ("predict: 5/5 images (100%)" in shown) == without_tqdm


async def test_tls_and_token_flags(tmp_path: Path) -> None:
    certificates = make_certificates()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certificates.ca.certificate)
    write_channel_mean_classifier(tmp_path / "models")
    recorder = MetadataRecorder()
    credentials = grpc.ssl_server_credentials(
        [(certificates.server.private_key, certificates.server.certificate)]
    )
    async with (
        running_server(tmp_path / "models") as app,
        inference_server(app, credentials=credentials, interceptors=[recorder]) as port,
    ):
        done = await asyncio.to_thread(
            visionrpc, "models", "--ca", str(ca), "--token", "abc", "--server", f"localhost:{port}"
        )
    assert done.returncode == 0, done.stderr
    assert "colors" in done.stdout
    assert recorder.calls[0][1]["authorization"] == "Bearer abc"
