"""``visionrpc serve`` as a real process drains Open Inference Protocol calls like v1's."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.helpers import images
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import free_port


def red_images() -> triton.InferInput:
    tensor = triton.InferInput("images", [1], "BYTES")
    data = images.encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def test_sigterm_finishes_the_model_infer_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    root = tmp_path / "models"
    # Each request waits 1.5 s in the queue, long enough to still be in flight at SIGTERM.
    write_channel_mean_classifier(
        root, batching={"max_queue_delay_ms": 1500, "wait_when_idle": True}
    )
    port = free_port()
    command = [
        sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(root),
        "--port", str(port), "--metrics-port", "0", "--providers", "CPUExecutionProvider",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with triton.InferenceServerClient(url=f"127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 60
            while not _ready(client):
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.1)
            outcome: dict[str, object] = {}

            def call() -> None:
                try:
                    outcome["labels"] = client.infer(
                        "colors", [red_images()], client_timeout=30
                    ).as_numpy("labels")
                except InferenceServerException as exc:
                    outcome["error"] = exc

            in_flight = threading.Thread(target=call)
            in_flight.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with (
                triton.InferenceServerClient(url=f"127.0.0.1:{port}") as late,
                pytest.raises(InferenceServerException) as refused,
            ):
                late.infer("colors", [red_images()], client_timeout=5)
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            in_flight.join(timeout=30)
        assert "error" not in outcome, outcome.get("error")
        labels = outcome["labels"]
        assert isinstance(labels, np.ndarray) and labels[0, 0] == b"red"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _ready(client: triton.InferenceServerClient) -> bool:
    try:
        return bool(client.is_model_ready("colors"))
    except InferenceServerException:
        return False
