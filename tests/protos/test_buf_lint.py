"""`buf lint` (STANDARD) passes on the protos and still catches what it should.

buf comes from npm (`@bufbuild/buf`, pinned in package-lock.json; `make lint` installs it
and runs it too). The exceptions sit as comments on the RPCs they excuse, so the same
rules still hold for anything new in the same file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.container.engine import missing_or_skip

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "node_modules" / ".bin" / "buf"


def _buf_lint(root: Path) -> subprocess.CompletedProcess[str]:
    missing_or_skip([] if BUF.exists() else ["buf is not installed (make node-deps)"])
    return subprocess.run(
        [str(BUF), "lint", "--error-format", "text"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy_of_protos(tmp_path: Path) -> Path:
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(
        REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi")
    )
    return tmp_path


def test_the_committed_protos_are_lint_clean() -> None:
    result = _buf_lint(REPO)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_a_new_rpc_beside_the_excused_ones_is_still_checked(copy_of_protos: Path) -> None:
    proto = copy_of_protos / "protos/visionrpc/v1/inference.proto"
    text = proto.read_text()
    proto.write_text(
        text.replace(
            "service InferenceService {",
            "service InferenceService {\n  rpc Describe(GetModelInfoRequest) returns (ModelInfo);",
        )
    )
    result = _buf_lint(copy_of_protos)
    assert result.returncode != 0
    assert 'RPC request type "GetModelInfoRequest" should be named' in result.stdout
    assert 'RPC response type "ModelInfo" should be named' in result.stdout


def test_a_name_outside_the_style_fails_the_lint(copy_of_protos: Path) -> None:
    proto = copy_of_protos / "protos/visionrpc/v1/inference.proto"
    proto.write_text(proto.read_text() + "\nenum Colour {\n  RED = 0;\n}\n")
    result = _buf_lint(copy_of_protos)
    assert result.returncode != 0
    assert 'Enum zero value name "RED" should be suffixed with "_UNSPECIFIED"' in result.stdout
