"""Print the requirements of visionrpc's dependencies and the named extras, one a line.

    python3 deploy/docker/requirements.py server > requirements.txt

The Dockerfile installs these from pyproject.toml alone, in a layer of their own, so an
edit to the code reuses it and only a change to pyproject.toml reinstalls them. Standard
library only: it runs on the bare base image.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import tomllib


def requirements(pyproject: Path, extras: Sequence[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(
            f"unknown extra(s) {', '.join(unknown)}; pyproject has {', '.join(optional)}"
        )
    lines = list(project["dependencies"])
    for extra in extras:
        lines.extend(line for line in optional[extra] if line not in lines)
    return lines


if __name__ == "__main__":
    print(
        "\n".join(
            requirements(Path(__file__).resolve().parents[2] / "pyproject.toml", sys.argv[1:])
        )
    )
