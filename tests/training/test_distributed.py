"""Two CPU processes under torchrun train one model; the first writes the repository entry."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from visionrpc.server.model_config import load_model_config, model_versions
from visionrpc.server.preprocess import decode_for_model, prepare
from visionrpc.training.datasets import read_dataset
from visionrpc.training.synthetic import make_dataset


def torchrun() -> list[str]:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def test_two_processes_train_and_only_the_first_prints_and_exports(tmp_path: Path) -> None:
    data = make_dataset("biwi", tmp_path / "biwi", people=3, frames_per_person=9)
    repository = tmp_path / "repo"
    command = [
        *torchrun(), "--standalone", "--nproc_per_node", "2",
        "-m", "visionrpc.training.distributed", "biwi",
        "--data", str(data), "--repository", str(repository),
        "--arch", "tiny", "--weights", "none", "--size", "24x32",
        "--epochs", "2", "--lr", "1e-2", "--bs", "4", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("validation:") == 1
    assert result.stdout.count("train_loss") == 1
    assert model_versions(repository / "biwi") == [1]

    # The sharded validation came back in dataset order: the metric recorded in the config
    # is what the exported model scores on the validation files, each with its own geometry.
    config = load_model_config(repository / "biwi" / "config.json")
    session = ort.InferenceSession(
        str(repository / "biwi" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    errors = []
    for item in read_dataset("biwi", data).valid:
        assert isinstance(item.target, tuple)
        pixels, geometry = prepare(
            decode_for_model(item.path.read_bytes(), config.input), config.input
        )
        (outputs,) = session.run(None, {"images": pixels[None]})
        x, y = geometry.normalized_to_original(float(outputs[0, 0]), float(outputs[0, 1]))
        errors.append(math.dist((x, y), (float(item.target[0]), float(item.target[1]))))
    assert float(np.mean(errors)) == pytest.approx(
        config.training.metrics["point_error_px"], abs=1e-3
    )
