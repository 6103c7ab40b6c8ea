"""End to end: ``visionrpc train ... --repository DIR`` into the repository a running
``visionrpc serve --model-control poll`` watches publishes a version served without restart."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers.serve_process import serving
from visionrpc.client import Classification, Client
from visionrpc.client.errors import VisionRPCError
from visionrpc.training.synthetic import make_pets

TINY = ["--arch", "tiny", "--weights", "none", "--bs", "16", "--size", "32", "--epochs", "1"]


def train(data: Path, repository: Path) -> None:
    command = [sys.executable, "-m", "visionrpc.cli", "train", "pets", "--data", str(data)]
    subprocess.run(
        [*command, "--repository", str(repository), *TINY, "--lr", "1e-2", "--quiet"],
        check=True,
        capture_output=True,
        timeout=600,
    )


def test_a_trained_version_is_served_by_the_polling_server_without_a_restart(
    tmp_path: Path,
) -> None:
    data, repository = make_pets(tmp_path / "pets", breeds=3, per_breed=8), tmp_path / "models"
    train(data, repository)
    image = next((data / "images").glob("*.jpg"))
    flags = ("--model-control", "poll", "--poll-interval-seconds", "0.5")
    with serving(repository, tmp_path, *flags, ready_model="pets") as server:
        answered: list[str] = []
        failed: list[VisionRPCError] = []
        stop = threading.Event()

        def call_meanwhile() -> None:
            with Client(server.address, retries=None, timeout=20) as client:
                while not stop.is_set():
                    try:
                        result = client.predict("pets", image)
                    except VisionRPCError as error:
                        failed.append(error)
                        continue
                    assert isinstance(result, Classification)
                    answered.append(result.version)
                    if result.version == "2":
                        stop.set()

        caller = threading.Thread(target=call_meanwhile)
        caller.start()
        try:
            train(data, repository)
            caller.join(timeout=60)
        finally:
            stop.set()
            caller.join()
        assert failed == []
        assert answered[0] == "1" and answered[-1] == "2"
        with Client(server.address) as client:
            (pets,) = client.models()
            assert pets.versions == ("2",)
            assert server.process.poll() is None
