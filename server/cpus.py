"""How many CPUs this process may use, and how the server splits them.

``os.cpu_count()`` counts the machine's cores; a Kubernetes pod with ``limits.cpu: 2``
on a 64-core node sees 64 of them but gets 2 cores' worth of time from its cgroup
quota, and a process pinned with ``taskset`` may run on fewer. onnxruntime sizes its
thread pool from the machine's cores too, so without this a pod runs 64 intra-op
threads that the quota throttles. The usable count is the smallest of the affinity
mask and the cgroup CPU quota (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``), rounded up: a quota of 1.5 CPUs still lets two threads run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The CPUs this process may keep busy: affinity mask and cgroup quota, at least 1."""
    count = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The CPU time this process's cgroup may use, in CPUs; None without a limit."""
    v2_dir, v1_dir = _own_cgroup_dirs(cgroup_root, proc_self_cgroup)
    # Inside a container's cgroup namespace the own path is "/", so the root holds the
    # limit; on a host the process's own cgroup does. Look in both, own first.
    for folder in (v2_dir, cgroup_root):
        text = _read(folder / "cpu.max")
        if text is not None:
            return _parse_cpu_max(text)
    for folder in (v1_dir, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _own_cgroup_dirs(cgroup_root: Path, proc_self_cgroup: Path) -> tuple[Path, Path]:
    """The folders of this process's v2 cgroup and v1 cpu cgroup (``/proc/self/cgroup``)."""
    v2, v1 = "/", "/"
    for line in (_read(proc_self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    v1_mount = next(
        (cgroup_root / name for name in ("cpu", "cpu,cpuacct") if (cgroup_root / name).is_dir()),
        cgroup_root / "cpu",
    )
    return cgroup_root / v2.lstrip("/"), v1_mount / v1.lstrip("/")


def _parse_cpu_max(text: str) -> float | None:
    """``cpu.max`` holds ``"$QUOTA $PERIOD"``, the quota ``max`` when unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return _ratio(parts[0], parts[1])


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    # v1 writes -1 for "no limit".
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class ThreadPlan:
    """The server's threads, for ``cpus`` usable CPUs (``plan_threads``)."""

    cpus: int
    intra_op_threads: int
    preprocess_workers: int


def plan_threads(
    cpus: int, *, intra_op_threads: int = 0, preprocess_workers: int = 0
) -> ThreadPlan:
    """Fill the settings left at 0 from ``cpus``.

    onnxruntime gets every usable CPU: on a CPU the model is the work, and its parallel
    regions wait for their slowest thread, so fewer threads only idle cores. Decoding
    gets half of them (at least one thread): a decode costs a tenth of a ResNet-18 run,
    so that keeps up with the model at any concurrency, and more threads than that only
    preempt the model's (measured in bench/serve_bench.py, see the README).
    """
    return ThreadPlan(
        cpus=cpus,
        intra_op_threads=intra_op_threads or cpus,
        preprocess_workers=preprocess_workers or max(1, cpus // 2),
    )
