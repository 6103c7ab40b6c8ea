"""The KServe Python SDK's gRPC client (kserve 0.21) against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
from PIL import Image

from tests.helpers import images
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import server_in_thread
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

SCRIPT = Path(__file__).with_name("kserve_client.py")


def test_kserve_grpc_client_gets_visionrpc_v1s_answers(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    write_channel_mean_classifier(repository)
    files = []
    for index, colour in enumerate([(200, 30, 40), (30, 40, 220)]):
        files.append(tmp_path / f"{index}.png")
        files[-1].write_bytes(images.encode(Image.new("RGB", (8, 8), colour), "PNG"))
    with server_in_thread(repository) as server:
        run = subprocess.run(
            [sys.executable, str(SCRIPT), server.address, "colors", *map(str, files)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        with grpc.insecure_channel(server.address) as channel:
            expected = pb_grpc.InferenceServiceStub(channel).Predict(
                pb.PredictRequest(
                    model="colors",
                    images=[pb.Image(encoded=path.read_bytes()) for path in files],
                    options=pb.PredictionOptions(top_k=2),
                )
            )
    answer = json.loads(run.stdout)
    assert answer["live"] and answer["ready"] and answer["model_ready"]
    outputs = answer["outputs"]
    assert outputs["labels"] == [
        [item.label for item in result.classification.top] for result in expected.results
    ]
    assert outputs["scores"] == [
        [item.score for item in result.classification.top] for result in expected.results
    ]
    assert outputs["error"] == ["", ""]
