"""Fixtures shared by the training tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty torch hub cache, so no test sees (or fills) the machine's real one."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)
