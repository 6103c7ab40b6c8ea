"""The wheel and the sdist, built from the tracked files as pip would build them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def distributions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist) of a copy of the tracked files, so no build output lands in the tree."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        origin, target = ROOT / name, source / name
        if not origin.exists() and not origin.is_symlink():
            continue  # deleted in the working tree, not yet committed
        target.parent.mkdir(parents=True, exist_ok=True)
        # The visionrpc/<part> links stay links, as in a checkout.
        shutil.copy2(origin, target, follow_symlinks=False)
    out = tmp_path_factory.mktemp("dist")
    build = (
        "import sys; from setuptools import build_meta as b; "
        # build_meta rewrites sys.argv while it builds: read the folder first.
        "out = sys.argv[1]; b.build_wheel(out); b.build_sdist(out)"
    )
    result = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def test_the_wheel_ships_the_license_and_the_typing_markers(
    distributions: tuple[Path, Path],
) -> None:
    wheel, _ = distributions
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert "Apache License" in archive.read(license_name).decode()
        metadata = archive.read(license_name.split("/")[0] + "/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    for marker in (
        "visionrpc/py.typed",
        "visionrpc/client/py.typed",
        "visionrpc/training/py.typed",
    ):
        assert marker in names
    # The symlinked parts arrive as real files.
    assert "visionrpc/training/train.py" in names and "visionrpc/server/app.py" in names


def test_the_sdist_ships_the_license(distributions: tuple[Path, Path]) -> None:
    _, sdist = distributions
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "pyproject.toml", "visionrpc/py.typed"} <= names
