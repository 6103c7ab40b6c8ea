"""The Dockerfile installs the dependencies from pyproject.toml alone, before the code."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker" / "requirements.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_requirements", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stages() -> dict[str, tuple[str, list[str]]]:
    """Each stage's name: (the stage it starts from, its instructions)."""
    found: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    # Continuation lines joined, comments dropped.
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM (\S+) AS (\S+)", line)
        if match:
            current = []
            found[match.group(2)] = (match.group(1), current)
        else:
            current.append(line)
    return found


def test_the_script_lists_the_dependencies_and_the_extras_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "server-cpu"], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert lines == project["dependencies"] + project["optional-dependencies"]["server-cpu"]
    train = load_script().requirements(ROOT / "pyproject.toml", ["train"])
    assert set(train) == set(project["dependencies"] + project["optional-dependencies"]["train"])
    with pytest.raises(SystemExit, match="unknown extra"):
        load_script().requirements(ROOT / "pyproject.toml", ["nonsense"])


def test_dependencies_are_installed_in_a_layer_that_sees_only_pyproject() -> None:
    found = stages()
    base, steps = found["dependencies"]
    assert base == "python"
    copies = [step for step in steps if step.startswith("COPY")]
    assert copies == [
        "COPY pyproject.toml ./",
        "COPY deploy/docker/requirements.py deploy/docker/",
    ]
    assert any("pip install -r" in step for step in steps if step.startswith("RUN"))
    assert found["train-dependencies"][0] == "dependencies"
    # The code comes after, into stages on top of the dependencies, installed without them.
    for stage, parent in (("builder", "dependencies"), ("train-builder", "train-dependencies")):
        start, steps = found[stage]
        assert start == parent
        assert steps[0] == "COPY . ."
        assert "pip install --no-deps ." in " ".join(steps)
