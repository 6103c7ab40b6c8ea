"""Unary vs PredictStream throughput of predict_many against a `visionrpc serve` subprocess."""
import asyncio, io, statistics, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, "/work/main")
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import free_port
from visionrpc.client import AsyncClient, Client

repo = Path(tempfile.mkdtemp())
write_channel_mean_classifier(repo, name="tiny", size=8)
write_channel_mean_classifier(repo, name="photo", size=224, input={"height": 224, "width": 224, "resize_method": "crop"})
port = free_port()
server = subprocess.Popen([sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(repo), "--port", str(port), "--metrics-port", "0", "--log-level", "WARNING"])
address = f"127.0.0.1:{port}"
rng = np.random.default_rng(0)
def photo() -> bytes:
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([x * 0.5, y * 0.6, (x + y) * 0.3], axis=2) + rng.normal(0, 12, (375, 500, 3))
    buf = io.BytesIO(); Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85); return buf.getvalue()
workloads = {
    "tiny 8x8 raw": ("tiny", [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2048)]),
    "photo 500x375 jpeg": ("photo", [photo() for _ in range(256)]),
}
BATCH, IN_FLIGHT = 16, 4
def unary_sync(client, model, images):
    batches = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        return [r for rs in pool.map(lambda b: client.predict(model, b), batches) for r in rs]
async def unary_async(client, model, images):
    window = asyncio.Semaphore(IN_FLIGHT)
    async def one(b):
        async with window: return await client.predict(model, b)
    results = await asyncio.gather(*(one(images[i:i + BATCH]) for i in range(0, len(images), BATCH)))
    return [r for rs in results for r in rs]
async def stream_async(client, model, images):
    return await client.predict_many(model, images, batch_size=BATCH, max_in_flight=IN_FLIGHT)
try:
    with Client(address) as client:
        for _ in range(100):
            try:
                if client.health(): break
            except Exception: time.sleep(0.2)
        for name, (model, images) in workloads.items():
            rates = {k: [] for k in ("sync unary (4 threads)", "sync stream", "async unary (gather)", "async stream")}
            for rep in range(5):
                t = time.perf_counter(); unary_sync(client, model, images); rates["sync unary (4 threads)"].append(len(images) / (time.perf_counter() - t))
                t = time.perf_counter(); client.predict_many(model, images, batch_size=BATCH, max_in_flight=IN_FLIGHT); rates["sync stream"].append(len(images) / (time.perf_counter() - t))
                async def both():
                    async with AsyncClient(address) as ac:
                        t = time.perf_counter(); await unary_async(ac, model, images); a = len(images) / (time.perf_counter() - t)
                        t = time.perf_counter(); await stream_async(ac, model, images); b = len(images) / (time.perf_counter() - t)
                        return a, b
                a, b = asyncio.run(both())
                rates["async unary (gather)"].append(a); rates["async stream"].append(b)
            print(f"{name}: {len(images)} images, batch {BATCH}, {IN_FLIGHT} in flight (median of 5, images/s)")
            for k, v in rates.items():
                print(f"  {k:26s} {statistics.median(v):8.0f}   (min {min(v):.0f}, max {max(v):.0f})")
finally:
    server.terminate(); server.wait(10)
