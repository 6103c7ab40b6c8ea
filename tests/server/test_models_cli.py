"""``visionrpc models --all`` and ``visionrpc models load|unload|reload NAME`` against a real
server, as a subprocess each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier, write_channel_mean_multilabel
from tests.helpers.server import RunningServer, server_in_thread


def visionrpc(*args: str, server: RunningServer) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VISIONRPC_SERVER": server.address}
    env.pop("VISIONRPC_MODEL_CONTROL_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "visionrpc.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    write_channel_mean_multilabel(root)
    with server_in_thread(
        root,
        model_control="explicit",
        load_model=("colors",),
        model_control_api="on",
        auth_token="inference-secret",
        model_control_token="control-secret",
    ) as running:
        yield running


def test_models_all_shows_every_model_and_version_state(server: RunningServer) -> None:
    done = visionrpc("models", "--all", "--control-token", "control-secret", server=server)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[0] == ["MODEL", "VERSION", "STATE", "REASON"]
    assert ["channels", "UNAVAILABLE", "not", "loaded"] in lines
    assert ["colors", "READY"] in lines and ["1", "READY"] in lines


def test_load_unload_and_reload_change_what_serves(server: RunningServer) -> None:
    token = ("--control-token", "control-secret")
    loaded = visionrpc("models", "load", "channels", "--json", *token, server=server)
    assert loaded.returncode == 0, loaded.stderr
    (channels,) = json.loads(loaded.stdout)
    assert channels["state"] == "READY"
    assert channels["versions"] == [{"version": "1", "state": "READY", "reason": ""}]
    assert server.repository.versions("channels") == [1]

    unloaded = visionrpc("models", "unload", "colors", *token, server=server)
    assert unloaded.returncode == 0, unloaded.stderr
    assert "unloaded" in unloaded.stdout
    assert server.repository.versions("colors") == []

    reloaded = visionrpc("models", "reload", "colors", *token, server=server)
    assert reloaded.returncode == 0, reloaded.stderr
    assert server.repository.versions("colors") == [1]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["models", "load", "nosuch", "--control-token", "control-secret"], 3, "nosuch"),
        (["models", "load", "colors"], 1, "UNAUTHENTICATED"),
        (["models", "load", "colors", "--control-token", "inference-secret"], 1, "token"),
        (["models", "load", "--control-token", "control-secret"], 2, "load|unload|reload NAME"),
        (["models", "--all", "unload", "colors"], 2, "load|unload|reload NAME, or --all"),
    ],
)
def test_model_control_failures_exit_with_a_reason(
    server: RunningServer, args: list[str], code: int, message: str
) -> None:
    done = visionrpc(*args, server=server)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
