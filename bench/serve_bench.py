"""Server throughput against raw onnxruntime, with a ResNet-18 at 224x224.

    .venv/bin/python bench/serve_bench.py                  # full run, about 2 minutes
    .venv/bin/python bench/serve_bench.py --duration 3 --raw-duration 2 --concurrency 1 32

Builds a ResNet-18 (random weights: the speed is the same) that takes uint8 NHWC and
normalises inside the graph, exports it to ONNX with a dynamic batch axis into a
temporary repository, then:

1. measures raw in-process onnxruntime throughput at several batch sizes and keeps
   the best (no decoding, no gRPC: the ceiling for the server);
2. starts ``visionrpc serve`` in a subprocess (so client and server do not share a
   GIL) and drives C concurrent single-image Predict calls for a fixed time each,
   printing images/s, p50/p99 latency and the ratio to raw;
3. repeats one concurrency with ``--max-batch-size 1`` to show what batching does.

``--protocol v2`` drives the Open Inference Protocol's ModelInfer (a BYTES ``images``
tensor in ``raw_input_contents``, as tritonclient sends it) instead of Predict;
``--protocol both`` runs the two side by side on one server, alternating per
concurrency, and prints the v2/v1 ratio of each.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from visionrpc.server.model_config import model_config_from_dict, write_repository_entry

SIZE = 224
MODEL = "resnet18"


def export_resnet18(repository: Path) -> Path:
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
        config = model_config_from_dict(
            {
                "name": MODEL,
                "task": "classification",
                "labels": [f"class_{i}" for i in range(1000)],
                "input": {"height": SIZE, "width": SIZE, "resize_method": "crop"},
            }
        )
        return write_repository_entry(repository, config, onnx_file) / "model.onnx"


def raw_throughput(model_file: Path, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rates = {}
    for batch_size in batch_sizes:
        batch = np.random.default_rng(0).integers(
            0, 256, (batch_size, SIZE, SIZE, 3), dtype=np.uint8
        )
        session.run(None, {"image": batch})
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, {"image": batch})
            images += batch_size
        rates[batch_size] = images / (time.perf_counter() - started)
    return rates


def test_image(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    images_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def sender(
    channel: grpc.aio.Channel, image: bytes, protocol: str
) -> Callable[[float | None], Awaitable[object]]:
    """One single-image call of ``protocol`` (v1 Predict or v2 ModelInfer), given a timeout."""
    if protocol == "v1":
        stub = pb_grpc.InferenceStub(channel)
        request = pb.PredictRequest(model=MODEL, images=[pb.Image(encoded=image)])
        return lambda timeout: stub.Predict(request, timeout=timeout)
    v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
    infer = v2.ModelInferRequest(model_name=MODEL)
    infer.inputs.add(name="images", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(struct.pack("<I", len(image)) + image)
    return lambda timeout: v2_stub.ModelInfer(infer, timeout=timeout)


async def drive(
    address: str, image: bytes, concurrency: int, seconds: float, protocol: str = "v1"
) -> LoadResult:
    """C clients, each sending one single-image request after another for ``seconds``."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        send = sender(channel, image, protocol)
        await send(None)
        started = time.perf_counter()
        stop_at = started + seconds

        async def client() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                try:
                    await send(60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return LoadResult(
        concurrency=concurrency,
        images_per_second=len(latencies) / elapsed,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        errors=errors,
    )


def start_server(repository: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(repository),
        "--port", str(port), "--metrics-port", "0", "--providers", "CPUExecutionProvider",
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=MODEL), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return process
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become SERVING in 120 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=60)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    parser.add_argument("--raw-duration", type=float, default=5.0, help="seconds per batch size")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--unbatched-concurrency", type=int, default=32)
    parser.add_argument("--raw-batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=[SIZE, SIZE], metavar=("W", "H"),
        help="size of the JPEG the clients send (default: the model's, 224 224)",
    )  # fmt: skip
    parser.add_argument("--server-flag", action="append", default=[], help="extra serve flag")
    parser.add_argument(
        "--protocol", choices=("v1", "v2", "both"), default="v1",
        help="visionrpc.v1 Predict, Open Inference Protocol ModelInfer, or both side by side",
    )  # fmt: skip
    args = parser.parse_args()

    print(f"cpus: {os.cpu_count()}, onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "models"
        model_file = export_resnet18(repository)
        raw = raw_throughput(model_file, args.raw_batch_sizes, args.raw_duration)
        for batch_size, rate in raw.items():
            print(f"raw onnxruntime  batch {batch_size:>3}: {rate:7.1f} images/s")
        best_batch, best_raw = max(raw.items(), key=lambda item: item[1])
        print(f"raw best: {best_raw:.1f} images/s at batch {best_batch}")

        image = test_image(*args.image_size)
        print(f"client image: {args.image_size[0]}x{args.image_size[1]} JPEG, {len(image)} B")
        runs: list[tuple[str, LoadResult]] = []
        protocols = ["v1", "v2"] if args.protocol == "both" else [args.protocol]
        for label, extra, levels in (
            ("batched", args.server_flag, args.concurrency),
            ("max_batch_size=1", [*args.server_flag, "--max-batch-size", "1"],
             [args.unbatched_concurrency]),
        ):  # fmt: skip
            port = free_port()
            process = start_server(repository, port, extra)
            try:
                for concurrency in levels:
                    for protocol in protocols:
                        result = asyncio.run(
                            drive(f"127.0.0.1:{port}", image, concurrency, args.duration, protocol)
                        )
                        named = label if protocol == "v1" else f"{label} v2"
                        runs.append((named, result))
                        print(format_row(named, result, best_raw), flush=True)
            finally:
                stop_server(process)
        # On a shared machine other load skews everything; a second raw figure shows it.
        raw_after = raw_throughput(model_file, [best_batch], args.raw_duration)[best_batch]
    print("\nserver                C   images/s   p50 ms   p99 ms  errors  server/raw")
    for label, result in runs:
        print(format_row(label, result, best_raw))
    print(f"raw at batch {best_batch}: {best_raw:.1f} images/s before, {raw_after:.1f} after")
    if args.protocol == "both":
        print_protocol_ratios(runs)
    return 0


def print_protocol_ratios(runs: list[tuple[str, LoadResult]]) -> None:
    """Open Inference Protocol against visionrpc.v1, per server setting and concurrency."""
    by_run = {(label, result.concurrency): result for label, result in runs}
    print("\nv2/v1 images/s        C   v1 img/s   v2 img/s   v2/v1")
    for (label, concurrency), v2_result in by_run.items():
        if not label.endswith(" v2"):
            continue
        v1_result = by_run[(label.removesuffix(" v2"), concurrency)]
        print(
            f"{label.removesuffix(' v2'):<18} {concurrency:>4} "
            f"{v1_result.images_per_second:>10.1f} {v2_result.images_per_second:>10.1f} "
            f"{v2_result.images_per_second / v1_result.images_per_second:>7.3f}"
        )


def format_row(label: str, result: LoadResult, best_raw: float) -> str:
    return (
        f"{label:<18} {result.concurrency:>4} {result.images_per_second:>10.1f} "
        f"{result.p50_ms:>8.1f} {result.p99_ms:>8.1f} {result.errors:>7} "
        f"{result.images_per_second / best_raw:>10.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
