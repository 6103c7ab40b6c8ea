"""Running the Node.js example (examples/node) the way a user would: `node script.js ...`.

Its packages come from its lockfile (`npm ci`, which `make node-deps` runs); node and
npm from Debian through `.ci/system-deps`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def run_node(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node is not None, "node is missing: run `make system-deps`"
    assert (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "the Node example's packages are missing: run `make node-deps`"
    )
    return subprocess.run(
        [node, script, *args],
        cwd=NODE_EXAMPLE,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
