"""Server throughput and latency against raw onnxruntime, with a ResNet-18 at 224x224.

    .venv/bin/python bench/serve_bench.py           # the README's table, about 4 minutes
    .venv/bin/python bench/serve_bench.py --int8    # plus int8 rows, about 8 minutes
    .venv/bin/python bench/serve_bench.py --quick   # a smoke run, under a minute

Builds a ResNet-18 (random weights: the speed is the same) that takes uint8 NHWC and
normalises inside the graph, exports it to ONNX with a dynamic batch axis into a
temporary repository (with ``--int8`` also a statically quantized copy, calibrated on
generated photos), then:

1. measures raw in-process onnxruntime at several batch sizes (no decoding, no gRPC): one
   session with onnxruntime's default threads, spinning on and off, and one
   single-thread session per usable CPU run side by side (as the server's lanes), and
   keeps the best: the server's ceiling;
2. starts ``visionrpc serve`` in a subprocess with its default settings (INFO access
   log to a file, metrics on) and drives C concurrent clients, each sending one
   single-image Predict after another, for each input: raw 224x224 pixels, a 224x224
   JPEG, a 500x375 JPEG (a typical web photo) and a 4000x3000 JPEG (a phone photo);
   completions are counted over a fixed window after a warm-up;
3. reads the server's ``visionrpc_batch_size`` histogram around each window, so the
   batch sizes each concurrency produced are printed beside its throughput, and
   ``visionrpc_inference_batch_seconds``: "model busy" is the seconds spent in
   onnxruntime runs per second of the row (lanes add up: up to one per lane) and
   "ms/row" a run's seconds per row, which tell an idle model from a slow one; and the
   CPU each stage of the server (model threads, event loop, decode threads, gRPC's
   threads: told apart by their OS-level names) and this load generator used over the
   row, in cores;
4. serves the same requests from a bare grpc.aio servicer in a process of its own (it
   parses each request and answers an empty response): its C=1 round trip, its and the
   load generator's CPU per call at raw's best rate, and the ceiling those leave any
   grpc.aio server on these CPUs, without and with the server's decode and resize;
5. measures raw onnxruntime again: on a shared machine the two raw figures show the
   noise. The summary's ratios are to the higher of the two raw bests (the rows printed
   while the bench runs, to the one measured before).

``--protocol v2`` drives the Open Inference Protocol's ModelInfer (a BYTES ``images``
tensor in ``raw_input_contents``, as tritonclient sends it) instead of Predict, for the
JPEG inputs; ``--protocol both`` runs the two side by side on one server, alternating
per row, and prints the v2/v1 ratio of each.

``--server-flag`` passes flags to ``visionrpc serve`` (e.g. ``--server-flag=--intra-op-
spinning=on``). ``--compare-flag`` starts a second server with those flags added and
alternates every row between the two (the idle one sleeps), then prints the second's
throughput over the first's per row: an A/B that a drifting machine load cannot skew.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from visionrpc.server.cpus import DECODE_THREAD, MODEL_THREAD, usable_cpus
from visionrpc.server.memory import tune_malloc
from visionrpc.server.model_config import (
    ModelConfig,
    model_config_from_dict,
    write_repository_entry,
)

SIZE = 224
MODEL = "resnet18"
# gRPC's retry design: a refused call may be retried after this many milliseconds.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
INT8_MODEL = "resnet18_int8"
INPUTS = ("raw 224x224", "JPEG 224x224", "JPEG 500x375", "JPEG 4000x3000")


def export_resnet18(repository: Path, name: str = MODEL) -> Path:
    """Write a uint8-NHWC ResNet-18 into ``repository``; returns its model.onnx."""
    import torch
    import torchvision

    class UInt8Resnet(torch.nn.Module):
        mean: torch.Tensor
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.net = torchvision.models.resnet18(weights=None).eval()
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float() / 255.0
            return torch.softmax(self.net((x - self.mean) / self.std), dim=1)

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports this plain CNN reliably.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.manual_seed(0)
        onnx_file = Path(scratch) / "model.onnx"
        torch.onnx.export(
            UInt8Resnet().eval(),
            (torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8),),
            str(onnx_file),
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
            dynamo=False,
        )
        return write_repository_entry(repository, model_config(name), onnx_file) / "model.onnx"


def freeze_collector() -> None:
    """Take what set-up left alive (torch, from the export) out of the collector's full
    passes. Walking it paused this process for 110-190 ms a pass (measured), and a load
    generator that pauses adds its own stalls to the latencies it measures."""
    gc.collect()
    gc.freeze()


def model_config(name: str) -> ModelConfig:
    return model_config_from_dict(
        {
            "name": name,
            "task": "classification",
            "labels": [f"class_{i}" for i in range(1000)],
            "input": {"height": SIZE, "width": SIZE, "resize_method": "crop"},
        }
    )


def export_int8(repository: Path, float_file: Path) -> Path:
    """The float model, statically quantized as ``visionrpc quantize`` does it."""
    from visionrpc.server.model_config import InputSpec
    from visionrpc.server.preprocess import decode_for_model, prepare
    from visionrpc.training.quantize import quantize_file

    spec = InputSpec(SIZE, SIZE, "crop")

    def calibration() -> Iterator[np.ndarray]:
        for seed in range(4):
            photos = [photo_jpeg(500, 375, seed * 8 + i) for i in range(8)]
            yield np.stack([prepare(decode_for_model(p, spec), spec)[0] for p in photos])

    with tempfile.TemporaryDirectory() as scratch:
        int8_file = Path(scratch) / "model.onnx"
        quantize_file(float_file, int8_file, calibration())
        config = model_config(INT8_MODEL)
        return write_repository_entry(repository, config, int8_file) / "model.onnx"


def photo_jpeg(width: int, height: int, seed: int = 1) -> bytes:
    """A photo-like JPEG: smooth shapes plus fine grain, so it compresses like a camera's."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def request_image(kind: str) -> pb.Image:
    if kind.startswith("raw"):
        pixels = np.asarray(Image.open(io.BytesIO(photo_jpeg(SIZE, SIZE))).convert("RGB"))
        raw = pb.RawImage(pixels=pixels.tobytes(), height=SIZE, width=SIZE, channels=3)
        return pb.Image(raw=raw)
    width, height = (int(side) for side in kind.split()[1].split("x"))
    return pb.Image(encoded=photo_jpeg(width, height))


# Raw onnxruntime set-ups: one session with its default threads, spinning on or off,
# and one single-thread session per usable CPU run side by side (the server's lanes).
RAW_SETUPS = ("spinning on", "spinning off", "lanes")


@dataclass(frozen=True)
class RawResult:
    # Images/s by (batch size, set-up) and batch-1 median latency by one-session set-up.
    images_per_second: dict[tuple[int, str], float]
    batch1_p50_ms: dict[str, float]

    @property
    def best(self) -> tuple[tuple[int, str], float]:
        return max(self.images_per_second.items(), key=lambda item: item[1])

    @property
    def best_batch1_p50_ms(self) -> float:
        return min(self.batch1_p50_ms.values())


def raw_onnxruntime(
    model_file: Path, batch_sizes: list[int], seconds: float, setups: Sequence[str]
) -> RawResult:
    """onnxruntime alone on random uint8 batches (no decoding, no gRPC), per set-up."""
    rates: dict[tuple[int, str], float] = {}
    batch1: dict[str, float] = {}
    for setup in setups:
        lanes = usable_cpus() if setup == "lanes" else 0
        sessions = []
        for _ in range(max(1, lanes)):
            options = ort.SessionOptions()
            if lanes:
                options.intra_op_num_threads = 1
            spinning = "0" if setup == "spinning off" else "1"
            options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
            sessions.append(
                ort.InferenceSession(
                    str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
                )
            )
        for batch_size in batch_sizes:
            batch = np.random.default_rng(0).integers(
                0, 256, (batch_size, SIZE, SIZE, 3), dtype=np.uint8
            )
            measured = side_by_side(sessions, batch, seconds)
            rates[(batch_size, setup)] = sum(rate for rate, _ in measured)
            if batch_size == 1 and not lanes:
                batch1[setup] = 1000 * statistics.median(measured[0][1])
    return RawResult(rates, batch1)


def run_for(
    session: ort.InferenceSession, batch: np.ndarray, seconds: float
) -> tuple[float, list[float]]:
    """Images/s of one session running ``batch`` over and over, and each run's seconds."""
    session.run(None, {"image": batch})
    latencies: list[float] = []
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        sent = time.perf_counter()
        session.run(None, {"image": batch})
        latencies.append(time.perf_counter() - sent)
        images += len(batch)
    return images / (time.perf_counter() - started), latencies


def side_by_side(
    sessions: list[ort.InferenceSession], batch: np.ndarray, seconds: float
) -> list[tuple[float, list[float]]]:
    """``run_for`` of every session at once, each in a thread of its own (one session:
    the same as calling it here)."""
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        return list(pool.map(lambda session: run_for(session, batch, seconds), sessions))


@dataclass(frozen=True)
class LoadResult:
    model: str
    input: str
    protocol: str
    # "A" for the server with --server-flag, "B" for the one with --compare-flag added.
    server: str
    concurrency: int
    images_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    # Batches run during the window, by histogram bucket ("<=1", "<=2", ...).
    batch_sizes: dict[str, int]
    mean_batch: float
    # Share of the row's wall time (warm-up included) that batches spent in onnxruntime,
    # and onnxruntime's time per row: idle model time and slower inference, told apart.
    model_busy: float
    model_ms_per_row: float
    # Cores each of the server's stages and this load generator kept busy over the row
    # (run time from /proc, warm-up included), by STAGES name.
    cores: dict[str, float]


# The server's threads by stage: the event loop is the main thread, the heavy threads carry
# their OS-level names (server/cpus.py), and gRPC's own threads are the rest.
STAGES = ("model", "event loop", "decode", "gRPC and other", "load generator")


def stage_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds each stage of process ``pid`` has run so far (schedstat, in ns)."""
    found = dict.fromkeys(STAGES[:-1], 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ran = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
        if task.name == str(pid):
            stage = "event loop"
        elif name.startswith(MODEL_THREAD):
            stage = "model"
        elif name.startswith(DECODE_THREAD):
            stage = "decode"
        else:
            stage = "gRPC and other"
        found[stage] += ran
    return found


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def sender(
    channel: grpc.aio.Channel, model: str, image: pb.Image, protocol: str
) -> Callable[[], Awaitable[object]]:
    """One single-image call of ``protocol`` (v1 Predict or v2 ModelInfer)."""
    if protocol == "v1":
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.PredictRequest(model=model, images=[image])
        return lambda: stub.Predict(request, timeout=60)
    v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
    infer = v2.ModelInferRequest(model_name=model)
    infer.inputs.add(name="images", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(struct.pack("<I", len(image.encoded)) + image.encoded)
    return lambda: v2_stub.ModelInfer(infer, timeout=60)


async def drive(
    address: str,
    model: str,
    image: pb.Image,
    protocol: str,
    concurrency: int,
    warmup: float,
    seconds: float,
    pause: float = 0.0,
) -> tuple[float, list[float], int]:
    """C clients, each sending one request after another (``pause`` seconds apart), for a
    window after a warm-up.

    The throughput is each client's completions per second between its first and last
    completion in the window, summed over the clients: a count of completions in a fixed
    window would move in steps of a whole batch (16 rows, 3% of an 8 s window at C=32).
    """
    latencies: list[float] = []
    rates: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        send = sender(channel, model, image, protocol)
        await send()
        window_start = time.perf_counter() + warmup
        window_end = window_start + seconds

        async def client() -> None:
            nonlocal errors
            completions: list[float] = []
            while time.perf_counter() < window_end:
                sent = time.perf_counter()
                try:
                    await send()
                except grpc.aio.AioRpcError as error:
                    errors += 1
                    # A refusal's retry hint is obeyed, as a gRPC client with retries does.
                    trailing: Any = error.trailing_metadata() or ()
                    hints = [value for key, value in trailing if key == PUSHBACK_KEY]
                    if hints:
                        await asyncio.sleep(int(str(hints[0])) / 1000)
                    continue
                done = time.perf_counter()
                if window_start <= done <= window_end:
                    latencies.append(done - sent)
                    completions.append(done)
                if pause:
                    await asyncio.sleep(pause)
            if len(completions) >= 2:
                rates.append((len(completions) - 1) / (completions[-1] - completions[0]))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return sum(rates), sorted(latencies), errors


def batch_histogram(metrics_port: int, model: str) -> dict[str, float]:
    """Cumulative ``visionrpc_batch_size`` buckets of ``model``, plus ``sum`` and ``count``,
    and as ``model_seconds`` the time its batches spent in onnxruntime."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if family.name == "visionrpc_inference_batch_seconds":
                if sample.name.endswith("_sum"):
                    found["model_seconds"] = sample.value
                continue
            if family.name != "visionrpc_batch_size":
                continue
            if sample.name.endswith("_bucket"):
                found["<=" + sample.labels["le"].removesuffix(".0")] = sample.value
            elif sample.name.endswith("_sum"):
                found["sum"] = sample.value
            elif sample.name.endswith("_count"):
                found["count"] = sample.value
    return found


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean rows per batch between two readings of the server's batch-size histogram."""
    batches = after.get("count", 0.0) - before.get("count", 0.0)
    return (after.get("sum", 0.0) - before.get("sum", 0.0)) / batches if batches else 0.0


def measure(
    address: str,
    pid: int,
    metrics_port: int,
    model: str,
    kind: str,
    protocol: str,
    concurrency: int,
    args: argparse.Namespace,
    server: str = "A",
) -> LoadResult:
    before = batch_histogram(metrics_port, model)
    cpu_before, own_before = stage_cpu_seconds(pid), own_cpu_seconds()
    started = time.perf_counter()
    rate, latencies, errors = asyncio.run(
        drive(
            address, model, request_image(kind), protocol, concurrency, args.warmup, args.duration
        )
    )
    elapsed = time.perf_counter() - started
    cpu_after, own_after = stage_cpu_seconds(pid), own_cpu_seconds()
    cores = {stage: (cpu_after[stage] - cpu_before[stage]) / elapsed for stage in cpu_after}
    cores["load generator"] = (own_after - own_before) / elapsed
    after = batch_histogram(metrics_port, model)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    buckets = [key for key in after if key.startswith("<=")]
    per_bucket: dict[str, int] = {}
    below = 0.0
    for key in buckets:
        if delta[key] - below > 0:
            per_bucket[key] = int(delta[key] - below)
        below = delta[key]
    return LoadResult(
        model=model,
        input=kind,
        protocol=protocol,
        server=server,
        concurrency=concurrency,
        images_per_second=rate,
        p50_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
        errors=errors,
        batch_sizes=per_bucket,
        mean_batch=mean_batch(before, after),
        model_busy=delta.get("model_seconds", 0.0) / elapsed,
        model_ms_per_row=1000 * delta.get("model_seconds", 0.0) / delta["sum"]
        if delta.get("sum")
        else float("nan"),
        cores=cores,
    )


@dataclass(frozen=True)
class TransportFloor:
    """A bare grpc.aio servicer that parses the request and answers an empty response."""

    input: str
    # Back-to-back single calls.
    p50_ms: float
    # At raw onnxruntime's best rate (8 callers): CPU per call of that server and of this
    # load generator, and the share of the usable cores they leave to a model.
    server_cpu_ms: float
    load_generator_cpu_ms: float
    ceiling: float
    # The server's own decode and resize of the image (in this process, one thread), and
    # the ceiling once the CPUs it takes at that rate are left out too.
    decode_ms: float
    ceiling_with_decode: float


def decode_ms(kind: str) -> float:
    """Median milliseconds of the server's decode-and-resize of ``kind``'s image."""
    from visionrpc.server.pipeline import decode_and_prepare
    from visionrpc.server.postprocess import PredictionOptions, resolve_options
    from visionrpc.server.preprocess import ImageLimits
    from visionrpc.server.service import image_from_proto

    config = model_config(MODEL)
    views = resolve_options(config, PredictionOptions()).views
    image = image_from_proto(request_image(kind))
    limits = ImageLimits(max_bytes=64 << 20, max_pixels=40_000_000)
    times = []
    for _ in range(40):
        started = time.perf_counter()
        decode_and_prepare(image, config.input, views, limits)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[5:])


class BareServicer(pb_grpc.InferenceServiceServicer):
    """Predict parses the request (gRPC does, with the generated code) and answers empty."""

    async def Predict(self, request: pb.PredictRequest, context: object) -> pb.PredictResponse:
        return pb.PredictResponse()


async def serve_bare(port: int) -> None:
    """The bare servicer, in a process of its own (``--bare-server PORT``)."""
    # The same malloc as visionrpc serve, so the floor is not paying page faults it would not.
    tune_malloc()
    server = grpc.aio.server()
    # Only Predict is measured; the other methods answer UNIMPLEMENTED from the base.
    bare = BareServicer()  # type: ignore[abstract]
    pb_grpc.add_InferenceServiceServicer_to_server(bare, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def transport_floors(kinds: Sequence[str], rate: float, seconds: float) -> list[TransportFloor]:
    """What gRPC alone costs each input's requests here: no server can do with less."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port)])
    floors = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        for kind in kinds:
            image, address = request_image(kind), f"127.0.0.1:{port}"
            _, latencies, _ = asyncio.run(drive(address, MODEL, image, "v1", 1, 0.5, seconds))
            server_before = stage_cpu_seconds(process.pid)
            own_before, started = own_cpu_seconds(), time.perf_counter()
            paced, _, _ = asyncio.run(drive(address, MODEL, image, "v1", 8, 0.5, seconds, 8 / rate))
            # The calls over the whole measured time, warm-up included, as the CPU is.
            calls = paced * (time.perf_counter() - started)
            server_cpu = sum(stage_cpu_seconds(process.pid).values()) - sum(server_before.values())
            own_cpu = own_cpu_seconds() - own_before
            # At a ratio x of raw's rate R, calls costing c CPU-seconds each leave the model
            # N - x R c of the N CPUs, so x = (N - x R c) / N: x = 1 / (1 + R c / N).
            per_call = (server_cpu + own_cpu) / calls
            decoding = decode_ms(kind)
            with_decode = per_call + decoding / 1000
            floors.append(
                TransportFloor(
                    input=kind,
                    p50_ms=1000 * statistics.median(latencies),
                    server_cpu_ms=1000 * server_cpu / calls,
                    load_generator_cpu_ms=1000 * own_cpu / calls,
                    ceiling=1 / (1 + rate * per_call / usable_cpus()),
                    decode_ms=decoding,
                    ceiling_with_decode=1 / (1 + rate * with_decode / usable_cpus()),
                )
            )
    finally:
        process.terminate()
        process.wait(timeout=30)
    return floors


def start_server(
    repository: Path, port: int, metrics_port: int, log: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(repository),
        "--port", str(port), "--metrics-port", str(metrics_port), *extra,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become SERVING in 180 s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_name() -> str:
    """The CPU model and the vector extensions that matter to onnxruntime's kernels."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line),
        "unknown CPU",
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    features = [
        name for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if name in flags
    ]
    return f"{model} ({', '.join(features) or 'no AVX2'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds counted per row")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before each window")
    parser.add_argument("--raw-duration", type=float, default=4.0, help="seconds per batch size")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--raw-batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--int8", action="store_true", help="add rows for an int8 ResNet-18")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 s windows, C = 1 and 32"
    )
    parser.add_argument("--server-flag", action="append", default=[], help="extra serve flag")
    parser.add_argument(
        "--compare-flag", action="append", default=[],
        help="serve flag of a second server measured row by row beside the first",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=("v1", "v2", "both"), default="v1",
        help="visionrpc.v1 Predict, Open Inference Protocol ModelInfer (JPEG rows), or both",
    )  # fmt: skip
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        asyncio.run(serve_bare(args.bare_server))
        return 0
    if args.quick:
        args.duration, args.warmup, args.raw_duration = 2.0, 0.5, 1.0
        args.concurrency, args.raw_batch_sizes = [1, 32], [1, 8]

    print(f"cpu: {cpu_name()}; {os.cpu_count()} CPUs, {usable_cpus()} usable by this process")
    print(
        f"onnxruntime {ort.__version__}; server flags: {' '.join(args.server_flag) or 'defaults'}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "models"
        models = {MODEL: export_resnet18(repository)}
        if args.int8:
            models[INT8_MODEL] = export_int8(repository, models[MODEL])
        freeze_collector()
        raw_before = {
            name: raw_onnxruntime(path, args.raw_batch_sizes, args.raw_duration, RAW_SETUPS)
            for name, path in models.items()
        }
        for name, raw in raw_before.items():
            for (batch, setup), rate in raw.images_per_second.items():
                print(f"raw {name} batch {batch:>2}, {setup:<12}: {rate:6.1f} images/s")
            print(f"raw {name} batch-1 p50: {raw.best_batch1_p50_ms:.1f} ms")
        servers = {"A": args.server_flag}
        if args.compare_flag:
            servers["B"] = [*args.server_flag, *args.compare_flag]
        running: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
        log = Path(scratch) / "server-A.log"
        results: list[LoadResult] = []
        try:
            for label, flags in servers.items():
                port, metrics_port = free_port(), free_port()
                server_log = Path(scratch) / f"server-{label}.log"
                process = start_server(repository, port, metrics_port, server_log, flags)
                running[label] = (process, port, metrics_port)
            protocols = ["v1", "v2"] if args.protocol == "both" else [args.protocol]
            rows = [
                (name, kind, concurrency, protocol)
                for name in models
                for kind in args.inputs
                for concurrency in args.concurrency
                for protocol in protocols
                # The v2 rows send encoded files only.
                if not (protocol == "v2" and kind.startswith("raw"))
            ]
            for name, kind, concurrency, protocol in rows:
                for label, (process, port, metrics_port) in running.items():
                    address = f"127.0.0.1:{port}"
                    result = measure(
                        address, process.pid, metrics_port, name, kind, protocol, concurrency,
                        args, label,
                    )  # fmt: skip
                    results.append(result)
                    print(format_row(result, raw_before[name].best[1]), flush=True)
        finally:
            for process, _, _ in running.values():
                process.terminate()
                process.wait(timeout=60)
        startup = [
            line for line in log.read_text(errors="replace").splitlines() if "usable CPUs" in line
        ]
        floors = transport_floors(args.inputs, raw_before[MODEL].best[1], min(args.duration, 4.0))
        raw_after = {
            name: raw_onnxruntime(path, [raw_before[name].best[0][0]], args.raw_duration, (setup,))
            for name, path in models.items()
            for setup in [raw_before[name].best[0][1]]
        }
    print_summary(
        [r for r in results if r.server == "A"], raw_before, raw_after, args.concurrency, startup
    )
    print_floors(floors, [r for r in results if r.server == "A" and r.model == MODEL])
    if args.compare_flag:
        print_comparison(results, " ".join(args.compare_flag))
    return 0


def print_comparison(results: list[LoadResult], flags: str) -> None:
    """B (with the compared flags) over A, row by row: images/s and p50."""
    first = {(r.model, r.input, r.protocol, r.concurrency): r for r in results if r.server == "A"}
    print(f"\nB ({flags}) against A, same rows alternating: images/s B/A, p50 ms A -> B")
    for second in (r for r in results if r.server == "B"):
        base = first[(second.model, second.input, second.protocol, second.concurrency)]
        print(
            f"{second.model} {second.protocol} {second.input} C={second.concurrency}: "
            f"{base.images_per_second:.1f} -> {second.images_per_second:.1f} "
            f"({second.images_per_second / base.images_per_second:.2f}), "
            f"p50 {base.p50_ms:.1f} -> {second.p50_ms:.1f}"
        )


def print_floors(floors: list[TransportFloor], results: list[LoadResult]) -> None:
    """What gRPC alone costs, beside where the server's rows spent the CPUs."""
    print(
        f"\nA bare grpc.aio servicer (parses the request, answers an empty response), the same "
        f"load generator, {usable_cpus()} usable CPUs: C=1 p50; CPU per call at raw's best "
        "rate (8 callers); the share of the CPUs that leaves to a model (ceiling), and what "
        "is left once the server's decode and resize of the image at that rate is taken too"
    )
    for floor in floors:
        print(
            f"{floor.input}: p50 {floor.p50_ms:.2f} ms; server {floor.server_cpu_ms:.2f} + load "
            f"generator {floor.load_generator_cpu_ms:.2f} ms CPU per call; ceiling "
            f"{floor.ceiling:.3f}; decode and resize {floor.decode_ms:.2f} ms, ceiling with it "
            f"{floor.ceiling_with_decode:.3f}"
        )
    print("\nWhere the CPUs went (cores, warm-up included):")
    print("| input | C | " + " | ".join(STAGES) + " |")
    print("|---|---|" + "---|" * len(STAGES))
    for result in results:
        if result.protocol == "v1":
            cells = " | ".join(f"{result.cores[stage]:.2f}" for stage in STAGES)
            print(f"| {result.input} | {result.concurrency} | {cells} |")


def format_row(result: LoadResult, raw_best: float) -> str:
    sizes = " ".join(f"{key}:{count}" for key, count in result.batch_sizes.items())
    return (
        f"{result.server} {result.model:<14} {result.protocol} {result.input:<15} "
        f"C={result.concurrency:<3} "
        f"{result.images_per_second:7.1f} img/s ({result.images_per_second / raw_best:4.2f})  "
        f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  errors {result.errors}  "
        f"model busy {result.model_busy:4.2f}, {result.model_ms_per_row:5.2f} ms/row  "
        f"mean batch {result.mean_batch:4.1f}  batches {sizes}  cores: {format_cores(result)}"
    )


def format_cores(result: LoadResult) -> str:
    return ", ".join(f"{stage} {result.cores[stage]:.2f}" for stage in STAGES)


def print_summary(
    results: list[LoadResult],
    raw_before: dict[str, RawResult],
    raw_after: dict[str, RawResult],
    levels: list[int],
    startup: list[str],
) -> None:
    for line in startup:
        print("server: " + line.split("visionrpc.server.app", 1)[-1].strip(" :-"))
    for name, raw in raw_before.items():
        (batch, setup), before = raw.best
        (after_batch, after_setup), after = raw_after[name].best
        # The higher of the two: a machine that sped up during the run must not flatter
        # the server's rows.
        if after > before:
            batch, setup = after_batch, after_setup
        best = max(before, after)
        print(f"\n{name}: images/s (ratio to raw onnxruntime's best, {best:.1f} images/s)")
        print(
            f"raw best at batch {batch}, {setup}: {before:.1f} images/s before, {after:.1f} after"
        )
        print("| input | " + " | ".join(f"C={c}" for c in levels) + " |")
        print("|---|" + "---|" * len(levels))
        rows: dict[str, dict[int, LoadResult]] = {}
        for result in results:
            if result.model == name:
                label = result.input if result.protocol == "v1" else f"{result.input} (v2)"
                rows.setdefault(label, {})[result.concurrency] = result
        for kind, by_level in rows.items():
            cells = [
                f"{by_level[c].images_per_second:.1f} ({by_level[c].images_per_second / best:.2f})"
                for c in levels
                if c in by_level
            ]
            print(f"| {kind} | " + " | ".join(cells) + " |")
        for kind, by_level in rows.items():
            if 1 in by_level:
                p50 = by_level[1].p50_ms
                print(
                    f"{kind}: p50 at C=1 {p50:.1f} ms, raw batch-1 p50 "
                    f"{raw.best_batch1_p50_ms:.1f} ms ({p50 - raw.best_batch1_p50_ms:+.1f} ms)"
                )
    v1 = {(r.model, r.input, r.concurrency): r for r in results if r.protocol == "v1"}
    pairs = [
        (v1[(r.model, r.input, r.concurrency)], r)
        for r in results
        if r.protocol == "v2" and (r.model, r.input, r.concurrency) in v1
    ]
    if pairs:
        print("\nv2/v1 images/s: model, input, C, v1, v2, v2/v1")
    for first, second in pairs:
        print(
            f"{first.model} {first.input} C={first.concurrency}: {first.images_per_second:.1f} "
            f"{second.images_per_second:.1f} "
            f"{second.images_per_second / first.images_per_second:.3f}"
        )
    if INT8_MODEL in raw_before and MODEL in raw_before:
        speedup = raw_before[INT8_MODEL].best[1] / raw_before[MODEL].best[1]
        print(f"\nraw int8 / float throughput: {speedup:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
