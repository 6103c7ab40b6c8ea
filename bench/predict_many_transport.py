"""predict_many over unary Predict calls against one PredictStream, through the client.

    .venv/bin/python bench/predict_many_transport.py          # defaults, under a minute
    .venv/bin/python bench/predict_many_transport.py --tiny-images 256 --photos 32 --repeats 3

Starts ``visionrpc serve`` in a subprocess (so client and server do not share a GIL)
on a temporary repository of two channel-mean classifiers built with onnx.helper:
``tiny`` (8x8, fed raw pixels: the transport dominates) and ``photo`` (224x224, fed
500x375 JPEGs: decoding dominates). Each workload is sent in batches of
``--batch-size`` with ``--in-flight`` batches outstanding, four ways: sync unary
calls from a thread pool, sync ``predict_many`` (one stream), async unary calls
under a semaphore, async ``predict_many``. Prints the median images/s of the repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from visionrpc.client import AsyncClient, Client
from visionrpc.server.model_config import model_config_from_dict, write_repository_entry


def channel_mean_classifier(size: int) -> onnx.ModelProto:
    """softmax(10 * channel means / 255) of uint8 NHWC images: cheap, so the transport shows."""
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "axes"], ["means"], keepdims=0),
        helper.make_node("Mul", ["means", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "channel_mean",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(10.0 / 255.0, dtype=np.float32), "scale"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def write_model(repository: Path, name: str, size: int, resize_method: str) -> None:
    config = model_config_from_dict(
        {
            "name": name,
            "task": "classification",
            "labels": ["red", "green", "blue"],
            "input": {"height": size, "width": size, "resize_method": resize_method},
        }
    )
    onnx_file = repository / f"{name}.onnx"
    onnx.save(channel_mean_classifier(size), onnx_file)
    write_repository_entry(repository, config, onnx_file)
    onnx_file.unlink()


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with smooth gradients plus noise, so it compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 0.5, y * 0.6, (x + y) * 0.3], axis=2) + rng.normal(
        0, 12, (height, width, 3)
    )
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(repository: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(repository),
        "--port", str(port), "--metrics-port", "0", "--providers", "CPUExecutionProvider",
        "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command)
    with Client(f"127.0.0.1:{port}", retries=None) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if client.health(timeout=1):
                    return process
            except Exception:  # not listening yet
                time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become SERVING in 120 s")


class Transports:
    """The four ways of sending ``images`` to ``model``; each returns the result count."""

    def __init__(self, address: str, batch_size: int, in_flight: int) -> None:
        self.address = address
        self.batch_size = batch_size
        self.in_flight = in_flight

    def batches(self, images: list[Any]) -> list[list[Any]]:
        return [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]

    def sync_unary(self, client: Client, model: str, images: list[Any]) -> int:
        with ThreadPoolExecutor(self.in_flight) as pool:
            answers = pool.map(lambda batch: client.predict(model, batch), self.batches(images))
            return sum(len(answer) for answer in answers)

    def sync_stream(self, client: Client, model: str, images: list[Any]) -> int:
        return len(
            client.predict_many(
                model, images, batch_size=self.batch_size, max_in_flight=self.in_flight
            )
        )

    async def async_unary(self, client: AsyncClient, model: str, images: list[Any]) -> int:
        window = asyncio.Semaphore(self.in_flight)

        async def one(batch: list[Any]) -> int:
            async with window:
                return len(await client.predict(model, batch))

        return sum(await asyncio.gather(*(one(batch) for batch in self.batches(images))))

    async def async_stream(self, client: AsyncClient, model: str, images: list[Any]) -> int:
        answers = await client.predict_many(
            model, images, batch_size=self.batch_size, max_in_flight=self.in_flight
        )
        return len(answers)


def rate(send: Callable[[], int]) -> float:
    started = time.perf_counter()
    count = send()
    return count / (time.perf_counter() - started)


async def async_rate(send: Callable[[], Awaitable[int]]) -> float:
    started = time.perf_counter()
    count = await send()
    return count / (time.perf_counter() - started)


def measure(
    transports: Transports, model: str, images: list[Any], repeats: int
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {
        "sync unary (threads)": [],
        "sync predict_many": [],
        "async unary (gather)": [],
        "async predict_many": [],
    }

    async def both_async() -> tuple[float, float]:
        async with AsyncClient(transports.address) as client:
            unary = await async_rate(lambda: transports.async_unary(client, model, images))
            stream = await async_rate(lambda: transports.async_stream(client, model, images))
            return unary, stream

    with Client(transports.address) as client:
        transports.sync_unary(client, model, images[: transports.batch_size])  # warm the channel
        for _ in range(repeats):
            rates["sync unary (threads)"].append(
                rate(lambda: transports.sync_unary(client, model, images))
            )
            rates["sync predict_many"].append(
                rate(lambda: transports.sync_stream(client, model, images))
            )
            async_unary, async_stream = asyncio.run(both_async())
            rates["async unary (gather)"].append(async_unary)
            rates["async predict_many"].append(async_stream)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-images", type=int, default=2048, help="8x8 raw images")
    parser.add_argument("--photos", type=int, default=256, help="500x375 JPEGs")
    parser.add_argument("--batch-size", type=int, default=16, help="images per request")
    parser.add_argument("--in-flight", type=int, default=4, help="requests outstanding")
    parser.add_argument("--repeats", type=int, default=5, help="runs per way; the median shows")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    workloads: dict[str, tuple[str, list[Any]]] = {
        f"tiny 8x8 raw, {args.tiny_images} images": (
            "tiny",
            [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(args.tiny_images)],
        ),
        f"photo 500x375 JPEG, {args.photos} images": (
            "photo",
            [photo(rng, 500, 375) for _ in range(args.photos)],
        ),
    }
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch)
        write_model(repository, "tiny", 8, "squish")
        write_model(repository, "photo", 224, "crop")
        port = free_port()
        server = start_server(repository, port)
        try:
            transports = Transports(f"127.0.0.1:{port}", args.batch_size, args.in_flight)
            for title, (model, images) in workloads.items():
                rates = measure(transports, model, images, args.repeats)
                print(
                    f"{title}; batch {args.batch_size}, {args.in_flight} in flight "
                    f"(images/s, median of {args.repeats})"
                )
                for way, values in rates.items():
                    print(
                        f"  {way:22s} {statistics.median(values):8.0f}"
                        f"   (min {min(values):.0f}, max {max(values):.0f})"
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
