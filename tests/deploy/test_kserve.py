"""The KServe manifests, checked in a process of their own.

The kserve SDK registers the Open Inference Protocol's messages (package ``inference``)
in protobuf's default pool, as tritonclient does; one process cannot import both. So the
checks in ``kserve_manifests.py`` run under their own pytest, and this test fails with
theirs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CHECKS = Path(__file__).with_name("kserve_manifests.py")
ROOT = Path(__file__).resolve().parents[2]


def test_the_kserve_manifests_pass_their_checks_in_a_process_of_their_own() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed is not None and int(passed.group(1)) >= 11, run.stdout[-2000:]
