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

import contextlib
import ctypes
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

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
    """The CPU time this process's cgroup may use, in CPUs; None without a limit.

    The tightest limit on the way from the process's own cgroup up to the root counts (a
    systemd slice can limit the services under it). Inside a container's cgroup namespace
    the own path is "/", so the root is the container's cgroup.
    """
    v2_dir, v1_dir, v1_mount = _own_cgroup_dirs(cgroup_root, proc_self_cgroup)
    v2 = [_parse_cpu_max(text) for text in _up_to(v2_dir, cgroup_root, "cpu.max")]
    if v2:
        return min((quota for quota in v2 if quota is not None), default=None)
    quotas = _up_to(v1_dir, v1_mount, "cpu.cfs_quota_us")
    periods = _up_to(v1_dir, v1_mount, "cpu.cfs_period_us")
    v1 = [_ratio(quota, period) for quota, period in zip(quotas, periods, strict=False)]
    return min((quota for quota in v1 if quota is not None), default=None)


def _up_to(folder: Path, root: Path, name: str) -> list[str]:
    """The contents of ``name`` in ``folder`` and each parent up to ``root``, where present."""
    found = []
    while True:
        text = _read(folder / name)
        if text is not None:
            found.append(text)
        if folder == root or root not in folder.parents:
            return found
        folder = folder.parent


def _own_cgroup_dirs(cgroup_root: Path, proc_self_cgroup: Path) -> tuple[Path, Path, Path]:
    """This process's v2 cgroup folder, v1 cpu cgroup folder and the v1 cpu mount."""
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
    own_v2, own_v1 = cgroup_root / v2.lstrip("/"), v1_mount / v1.lstrip("/")
    # A path from the host's view that this mount namespace does not show: use the root.
    return (
        own_v2 if own_v2.is_dir() else cgroup_root,
        own_v1 if own_v1.is_dir() else v1_mount,
        v1_mount,
    )


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
    cpus: int, *, on_gpu: bool = False, intra_op_threads: int = 0, preprocess_workers: int = 0
) -> ThreadPlan:
    """Fill the settings left at 0 from ``cpus``.

    onnxruntime gets every usable CPU: on a CPU the model is the work, and fewer threads
    leave cores idle whenever no decode is running. Decoding gets half of them (at least
    one thread): decoding a photo costs about a tenth of a ResNet-18 run, so that keeps up
    with the model, while each decode thread more is one more to preempt the model's
    (``bench/serve_bench.py --server-flag`` compares other splits). With the model on a
    GPU the CPUs have little else to do than decode, so decoding gets all of them.
    """
    return ThreadPlan(
        cpus=cpus,
        intra_op_threads=intra_op_threads or cpus,
        preprocess_workers=preprocess_workers or (cpus if on_gpu else max(1, cpus // 2)),
    )


# The OS-level names of the server's heavy threads (Linux allows 15 bytes). ``top -H``,
# ``ps -L``, py-spy and /proc show them, so a thread's CPU can be told from its name;
# threads a library starts (onnxruntime's intra-op pool) inherit their creator's.
MODEL_THREAD = "vrpc-model"
DECODE_THREAD = "vrpc-decode"
SMALL_DECODE_THREAD = "vrpc-decode-sm"
_PR_SET_NAME = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread ``name`` at the OS level (a no-op where prctl is missing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def lower_this_thread(niceness: int, name: str | None = None) -> None:
    """Raise the calling thread's nice value by ``niceness`` (Linux: nice is per thread),
    and give it ``name`` at the OS level.

    The server's heavy threads (decoding, the model runs and onnxruntime's pool) run a
    few steps below the event loop, so on a busy CPU the loop still answers at once:
    it accepts calls, refuses the ones that don't fit and hands batches over, all of
    which the heavy threads wait on. Raising one's nice value needs no privilege;
    where the OS refuses anyway the thread keeps its priority.
    """
    if name is not None:
        name_this_thread(name)
    if niceness <= 0:
        return
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)


def in_lowered_thread(niceness: int, work: Callable[[], T], name: str = MODEL_THREAD) -> T:
    """``work()`` run in a new thread named ``name`` and lowered by ``niceness``, its
    result or exception.

    Threads a library starts inherit their creator's nice value and name: onnxruntime's
    intra-op pool, made while its session is created, so comes out lowered and named too.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        lower_this_thread(niceness, name)
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller's thread as is
            failure.append(exc)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
