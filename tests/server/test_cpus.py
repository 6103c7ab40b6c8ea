"""Thread defaults from the CPUs the process may use, with cgroup files as a pod has them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.serve_process import serving
from tests.helpers.server import free_port
from tests.server.support import png, solid
from tests.server.test_serve_command import wait_until_serving
from visionrpc.client import Client
from visionrpc.server.cpus import (
    MODEL_THREAD,
    SMALL_DECODE_THREAD,
    cgroup_cpu_quota,
    plan_threads,
    usable_cpus,
)
from visionrpc.server.settings import ServerSettings, SettingsError

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(tmp_path: Path, cpu_max: str, own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    folder = root / own.lstrip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def cgroup_v1(tmp_path: Path, quota: int, period: int, own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / own.lstrip("/")
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"4:memory:{own}\n3:cpu,cpuacct:{own}\n1:name=systemd:/\n")
    return root, proc


def test_a_pod_limit_of_one_and_a_half_cpus_allows_two_threads(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "150000 100000")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    assert usable_cpus(root, proc) == min(AFFINITY, 2)


def test_a_v2_limit_in_the_process_own_cgroup_is_found(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "50000 100000", own="/kubepods/pod1/app")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(0.5)
    assert usable_cpus(root, proc) == 1


def test_an_unlimited_cgroup_leaves_the_affinity_mask(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "max 100000")
    assert cgroup_cpu_quota(root, proc) is None
    assert usable_cpus(root, proc) == AFFINITY


def test_a_cgroup_v1_cfs_quota_limits_the_cpus(tmp_path: Path) -> None:
    root, proc = cgroup_v1(tmp_path, quota=100000, period=100000, own="/docker/abc")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.0)
    assert usable_cpus(root, proc) == 1


def test_a_cgroup_v1_quota_of_minus_one_is_no_limit(tmp_path: Path) -> None:
    root, proc = cgroup_v1(tmp_path, quota=-1, period=100000)
    assert cgroup_cpu_quota(root, proc) is None


def test_no_cgroup_files_at_all_leaves_the_affinity_mask(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path / "absent", tmp_path / "absent_proc") == AFFINITY


def test_a_limit_above_the_affinity_mask_does_not_raise_the_count(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, f"{(AFFINITY + 8) * 100000} 100000")
    assert usable_cpus(root, proc) == AFFINITY


def test_thread_defaults_follow_the_cpus_and_explicit_settings_win(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "400000 100000")
    plan = plan_threads(usable_cpus(root, proc))
    assert plan.intra_op_threads == plan.cpus == min(AFFINITY, 4)
    assert plan.preprocess_workers == max(1, plan.cpus // 2)
    one_cpu = plan_threads(1)
    assert (one_cpu.intra_op_threads, one_cpu.preprocess_workers) == (1, 1)
    # With the model on a GPU, decoding is the CPUs' work.
    assert plan_threads(8, on_gpu=True).preprocess_workers == 8
    explicit = plan_threads(8, on_gpu=True, intra_op_threads=3, preprocess_workers=5)
    assert (explicit.intra_op_threads, explicit.preprocess_workers) == (3, 5)


def test_spinning_is_on_by_default_and_takes_only_on_or_off() -> None:
    assert ServerSettings().intra_op_spinning == "on"
    assert ServerSettings(intra_op_spinning="off").intra_op_spinning == "off"
    with pytest.raises(SettingsError, match="intra_op_spinning"):
        ServerSettings(intra_op_spinning="yes")


def test_a_limit_on_a_parent_cgroup_applies_to_the_process_below_it(tmp_path: Path) -> None:
    root, proc = cgroup_v2(tmp_path, "max 100000", own="/system.slice/app.service")
    (root / "system.slice" / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.0)
    assert usable_cpus(root, proc) == 1


def test_a_cgroup_path_this_namespace_does_not_show_falls_back_to_the_root(
    tmp_path: Path,
) -> None:
    root, proc = cgroup_v2(tmp_path, "200000 100000")
    proc.write_text("0::/kubepods/hidden/from/here\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.0)


def test_a_server_pinned_to_one_cpu_plans_one_thread_of_each(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    port = free_port()
    one_cpu = {min(os.sched_getaffinity(0))}
    command = [
        sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(root),
        "--port", str(port), "--metrics-port", "0", "--log-format", "json",
    ]  # fmt: skip
    # As `taskset -c N visionrpc serve`: the child inherits the one-CPU affinity mask.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, one_cpu),
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}")
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    messages = [json.loads(line).get("message", "") for line in output.splitlines() if line]
    plan = [m for m in messages if "usable CPUs" in m]
    assert plan == [
        "1 usable CPUs: 1 onnxruntime intra-op threads (spinning on; no lanes), 1 decode threads "
        "(and one for small images)"
    ]


class OsThread(NamedTuple):
    name: str
    nice: int


def os_threads(pid: int) -> dict[int, OsThread]:
    """Every thread of a process: its OS-level name and nice value, from
    /proc/PID/task/TID/stat ("TID (name) state ...", the nice value is field 19)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            stat = (task / "stat").read_text()
            head, rest = stat.rsplit(")", 1)
            threads[int(task.name)] = OsThread(head.split("(", 1)[1], int(rest.split()[16]))
    return threads


@pytest.mark.parametrize(("decode", "model", "lanes"), [(4, 7, "off"), (4, 7, "on"), (0, 0, "on")])
def test_decoding_then_the_model_run_below_the_event_loop(
    tmp_path: Path, decode: int, model: int, lanes: str
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    intra_op_threads = 3
    flags = [
        "--intra-op-threads", str(intra_op_threads), "--cpu-lanes", lanes,
        "--decode-niceness", str(decode), "--model-niceness", str(model),
    ]  # fmt: skip
    with serving(root, tmp_path, *flags, ready_model="colors") as server:
        with Client(server.address) as client:
            # Decoding and a model run start the threads that pools make on first use
            # (with lanes: four images run on two or three lanes).
            client.predict("colors", [png(solid(250, 0, 0))] * 4)
        values = {tid: thread.nice for tid, thread in os_threads(server.process.pid).items()}
    base = values[server.process.pid]  # the main thread runs the event loop
    if decode == model == 0:
        assert set(values.values()) == {base}
        return
    by_offset = collections.Counter(value - base for value in values.values())
    # One decode thread per plan; the model's run threads and the intra-op pool's other
    # threads, which onnxruntime starts as the session is made, inherit its nice value.
    assert by_offset[decode] == plan_threads(usable_cpus()).preprocess_workers, values
    if lanes == "off":
        assert by_offset[model] == 1 + (intra_op_threads - 1), values
    else:
        # The all-thread session's pool, and a run thread for each lane that ran.
        assert intra_op_threads - 1 + 2 <= by_offset[model] <= intra_op_threads - 1 + 3, values
    assert set(by_offset) == {0, decode, model}, values


@pytest.mark.parametrize("niceness", [0, 6])
def test_the_model_and_decode_threads_carry_their_stage_names_at_the_os_level(
    tmp_path: Path, niceness: int
) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    intra_op_threads = 3
    flags = [
        "--intra-op-threads", str(intra_op_threads), "--cpu-lanes", "off",
        "--decode-niceness", str(niceness), "--model-niceness", str(niceness),
    ]  # fmt: skip
    with serving(root, tmp_path, *flags, ready_model="colors") as server:
        with Client(server.address) as client:
            client.predict("colors", [png(solid(250, 0, 0))])
        threads = os_threads(server.process.pid)
    names = {tid: thread.name for tid, thread in threads.items()}
    nice = {tid: thread.nice for tid, thread in threads.items()}
    by_name = collections.Counter(names.values())
    # The session's pool threads (made by onnxruntime, inheriting the name of the thread
    # that created the session) and the thread that ran the batch.
    assert by_name[MODEL_THREAD] == intra_op_threads - 1 + 1, names
    # The image was small: the small-image thread decoded it.
    assert by_name[SMALL_DECODE_THREAD] == 1, names
    base = nice[server.process.pid]
    named = {tid: name for tid, name in names.items() if name.startswith("vrpc-")}
    assert all(nice[tid] == base + niceness for tid in named), (names, nice)
    assert all(nice[tid] == base for tid in nice if tid not in named), (names, nice)
