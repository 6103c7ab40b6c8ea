"""glibc's malloc as visionrpc serve sets it: image-block-sized buffers leave the process
when freed, and request-sized ones are reused without faulting fresh pages in."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.serve_log import ServeProcess, serve_process
from tests.helpers.serve_process import rss_bytes_of
from visionrpc.client import AsyncClient

# Frees a block and then allocates, fills and frees one of the same size again: prints the
# RSS the second one left behind and the page faults filling it took, for a block above
# the mmap threshold (16 MiB, a Pillow image block) and one below it (4 MiB, a photo).
PROBE = """
import json, resource, sys
from visionrpc.server.memory import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tuned" else {}
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = {"applied": applied}
for name, size in (("image block", 16 << 20), ("request", 4 << 20)):
    first = b"\\x01" * size
    del first
    base, before = rss(), faults()
    second = b"\\x01" * size
    filled = faults() - before
    del second
    out[name] = {"retained": rss() - base, "faults": filled}
print(json.dumps(out))
"""

glibc_only = pytest.mark.skipif(
    not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's malloc is what this tunes"
)
GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")
PAGES_OF_4_MIB = (4 << 20) // os.sysconf("SC_PAGE_SIZE")


def probe(mode: str, **environ: str) -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_VARIABLES} | environ
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, dict[str, int]] = json.loads(done.stdout)
    return result


@glibc_only
def test_a_freed_image_block_is_returned_to_the_os() -> None:
    # Without the tuning glibc's dynamic threshold serves the second block from the heap,
    # where it stays resident: the probe tells the two apart.
    assert probe("untuned")["image block"]["retained"] >= 4 << 20
    assert probe("tuned")["image block"]["retained"] < 1 << 20


@glibc_only
def test_a_request_sized_buffer_reuses_freed_memory_instead_of_faulting_pages_in() -> None:
    # Where every such block is its own mapping (as when the mmap threshold sat at 1 MiB),
    # filling it again faults each of its pages in; the tuned heap keeps the freed space.
    returned = probe("untuned", MALLOC_MMAP_THRESHOLD_=str(1 << 20))["request"]
    assert returned["faults"] >= PAGES_OF_4_MIB * 0.9
    tuned = probe("tuned")
    assert tuned["applied"] == {
        "mmap threshold": 8 << 20,
        "trim threshold": 32 << 20,
        "arenas": 4,
    }
    assert tuned["request"]["faults"] < PAGES_OF_4_MIB * 0.1


@glibc_only
def test_the_users_own_malloc_settings_are_left_alone() -> None:
    applied = probe("tuned", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")["applied"]
    assert applied == {"trim threshold": 32 << 20}


@glibc_only
def test_visionrpc_serve_tunes_malloc_before_it_serves_and_zero_leaves_it_to_glibc(
    tmp_path: Path,
) -> None:
    write_channel_mean_classifier(tmp_path, "colors")
    with serve_process(tmp_path) as server:
        server.wait_until_serving()
        server.sigterm()
        assert server.exit_code() == 0
    assert "malloc: mmap threshold 8192 KiB, trim threshold 32768 KiB, arenas 4" in (
        server.log_text()
    )
    with serve_process(tmp_path, "--malloc-trim-threshold-bytes", "0") as server:
        server.wait_until_serving()
        server.sigterm()
        assert server.exit_code() == 0
    assert '"message": "malloc: mmap threshold 8192 KiB"' in server.log_text()


def noisy_jpeg(width: int, height: int) -> bytes:
    """Noise compresses badly: a JPEG of several megabytes, like a camera's largest."""
    pixels = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


TRIMMED = "free heap memory handed back to the OS"


def trims(server: ServeProcess) -> int:
    return sum(TRIMMED in line for line in list(server.lines))


@glibc_only
@pytest.mark.parametrize("idle_trim", ["0.5", "0"])
async def test_the_heaps_hand_a_bursts_memory_back_once_calls_stop(
    tmp_path: Path, idle_trim: str
) -> None:
    # free() leaves the space between blocks still in use resident: after a burst of
    # photos the heaps held what the burst needed, with nothing in flight.
    write_channel_mean_classifier(tmp_path, "colors")
    photo = noisy_jpeg(2000, 1500)
    # An 8 MiB trim threshold: what the heaps may keep by design (4 x it) stays well under
    # what the burst leaves, whose size varies with how many calls were refused unread.
    flags = ("--malloc-idle-trim-seconds", idle_trim, "--malloc-trim-threshold-bytes", str(8 << 20))
    with serve_process(tmp_path, *flags) as server:
        server.wait_until_serving()
        loaded = rss_bytes_of(server.process.pid)
        async with AsyncClient(server.address, retries=None, timeout=60) as client:
            for _ in range(3):
                answers = await asyncio.gather(
                    *(client.predict("colors", [photo]) for _ in range(64)),
                    return_exceptions=True,
                )
                assert any(not isinstance(answer, BaseException) for answer in answers)
        grown = rss_bytes_of(server.process.pid) - loaded
        # Twice what the heaps may keep, which the trimmer leaves alone.
        assert grown > 64 << 20, grown >> 20
        if idle_trim == "0":
            await asyncio.sleep(3.0)
            assert trims(server) == 0
            kept = rss_bytes_of(server.process.pid) - loaded
            assert kept > grown / 2, (grown >> 20, kept >> 20)
        else:
            # Calls kept arriving until now: the trim comes after them, not between rounds.
            assert trims(server) == 0
            await asyncio.to_thread(server.wait_for, TRIMMED, 30)
            kept = rss_bytes_of(server.process.pid) - loaded
            assert kept < grown / 3, (grown >> 20, kept >> 20)
        server.sigterm()
        assert server.exit_code() == 0
