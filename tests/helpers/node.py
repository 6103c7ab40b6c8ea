"""Running the Node.js example (examples/node) the way a user would: `node script.js ...`.

Its packages come from its lockfile (`npm ci`, which `make node-deps` runs); node and
npm from Debian through `.ci/system-deps`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.container.engine import missing_or_skip

NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def run_node(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    missing_or_skip([] if node else ["node is not installed"])
    missing_or_skip(
        []
        if (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir()
        else ["examples/node's packages are not installed (make node-deps)"]
    )
    assert node is not None
    return subprocess.run(
        [node, script, *args],
        cwd=NODE_EXAMPLE,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
