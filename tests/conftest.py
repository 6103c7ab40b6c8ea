"""Fixtures shared by every test area: a repository of analytic models, test certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.onnx_models import (
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
)
from tests.helpers.tls import Certificates, make_certificates


@pytest.fixture
def analytic_repository(tmp_path: Path) -> Path:
    """``colors`` (classification), ``channels`` (multilabel), ``centroid`` (points), 8x8."""
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    write_channel_mean_multilabel(root)
    write_centroid_points(root)
    return root


@pytest.fixture(scope="module")
def pki() -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    return make_certificates()
