"""What users of a client expect: environment defaults, ``token=``, request ids on errors,
partial results when a server dies, TLS mistakes named, every default shown by ``info``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.conftest import random_images, solid, write_test_models
from tests.client.scripted_server import MetadataRecorder, inference_server, scripted_server
from tests.client.test_cli import visionrpc
from tests.helpers.server import RunningServer, free_port, running_server, tls_settings
from tests.helpers.tls import Certificates, make_certificates
from visionrpc.client import (
    AsyncClient,
    Classification,
    Client,
    ImageError,
    InvalidInputError,
    ModelNotFoundError,
    RetryPolicy,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from visionrpc.protos import inference_pb2 as pb

IMAGE = solid((0, 200, 0))
SERVE = [
    sys.executable, "-m", "visionrpc.cli", "serve",
    "--metrics-port", "0", "--providers", "CPUExecutionProvider", "--log-format", "json",
]  # fmt: skip


def test_client_reads_the_server_address_from_the_environment(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIONRPC_SERVER", server.address)
    with Client() as client:
        assert client.address == server.address
        assert isinstance(client.predict("colors", IMAGE), Classification)


async def test_the_token_comes_from_token_or_the_environment_with_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server(write_test_models(tmp_path), auth_token="s3cret") as app:
        with Client(app.address, token="s3cret", retries=None) as given:
            assert isinstance(
                await asyncio.to_thread(given.predict, "colors", IMAGE), Classification
            )
        monkeypatch.setenv("VISIONRPC_SERVER", app.address)
        monkeypatch.setenv("VISIONRPC_TOKEN", "s3cret")
        with Client(retries=None) as from_environment:
            answer = await asyncio.to_thread(from_environment.predict, "colors", IMAGE)
            assert isinstance(answer, Classification)
        # A token meant for the configured server is not sent to one named in code.
        with Client(app.address, retries=None) as named, pytest.raises(UnauthenticatedError):
            await asyncio.to_thread(named.predict, "colors", IMAGE)


async def test_every_error_carries_the_request_id_the_server_received(
    tmp_path: Path,
) -> None:
    recorder = MetadataRecorder()
    async with (
        running_server(write_test_models(tmp_path)) as app,
        inference_server(app, interceptors=[recorder]) as port,
    ):
        with Client(f"127.0.0.1:{port}", retries=None) as client:
            with pytest.raises(ModelNotFoundError) as unknown:
                await asyncio.to_thread(client.predict, "nope", IMAGE)
            with pytest.raises(InvalidInputError) as foreign:
                await asyncio.to_thread(client.predict_many, "colors", [IMAGE] * 3, threshold=0.5)
            mine = [("x-request-id", "caller-chosen-id")]
            with pytest.raises(ModelNotFoundError) as chosen:
                await asyncio.to_thread(client.model_info, "nope")
            with pytest.raises(ModelNotFoundError) as given:
                await asyncio.to_thread(client.predict, "nope", IMAGE, metadata=mine)
    received = [str(metadata["x-request-id"]) for _, metadata in recorder.calls]
    assert unknown.value.request_id == received[0]
    # predict_many asks for the model's limits, then streams, under one request id.
    assert foreign.value.request_id == received[1] == received[2]
    assert chosen.value.request_id == received[3]
    assert given.value.request_id == "caller-chosen-id" == received[4]
    assert len(set(received[:2] + received[3:4])) == 3
    assert f"(request {unknown.value.request_id})" in str(unknown.value)


def test_metadata_too_large_for_servers_is_refused_before_any_call(server: RunningServer) -> None:
    with pytest.raises(InvalidInputError, match="metadata is 20"):
        Client(server.address, metadata=(("x-huge", "a" * 20_000),))
    with Client(server.address) as client, pytest.raises(InvalidInputError, match="metadata is"):
        client.predict("colors", IMAGE, metadata=(("x-huge", "a" * 20_000),))


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[tuple[list[str], str]]:
    """A ``visionrpc serve`` command line on a free port; the test starts and stops it."""
    port = free_port()
    command = [*SERVE, "--repository", str(write_test_models(tmp_path)), "--port", str(port)]
    yield command, f"127.0.0.1:{port}"


def start_serving(command: list[str], address: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(address, timeout=60) as probe:
        # The default retry policy keeps calling until the server listens.
        for _ in range(100):
            try:
                if probe.health("colors"):
                    return process
            except UnavailableError:
                pass
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the server never became SERVING")


def test_predict_many_keeps_its_results_when_the_server_dies(
    serve_process: tuple[list[str], str],
) -> None:
    command, address = serve_process
    process = start_serving(command, address)
    images = random_images(40)

    def kill_after_the_first_answer(done: int, total: int) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    try:
        with Client(address, retries=None, timeout=20) as client:
            results = client.predict_many(
                "colors",
                images,
                batch_size=4,
                max_in_flight=1,
                progress=kill_after_the_first_answer,
            )
    finally:
        process.kill()
        process.wait(timeout=10)
    answered = [result for result in results if isinstance(result, Classification)]
    lost = [result for result in results if isinstance(result, ImageError)]
    assert len(results) == 40
    assert 4 <= len(answered) < 40
    assert results[: len(answered)] == answered
    assert {error.code for error in lost} == {"UNAVAILABLE"}
    assert [error.index for error in lost] == list(range(len(answered), 40))


async def test_the_async_client_keeps_its_results_when_the_server_dies(
    serve_process: tuple[list[str], str],
) -> None:
    command, address = serve_process
    process = await asyncio.to_thread(start_serving, command, address)

    def kill_after_the_first_answer(done: int, total: int) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    try:
        async with AsyncClient(address, retries=None, timeout=20) as client:
            results = await client.predict_many(
                "colors",
                random_images(40),
                batch_size=4,
                max_in_flight=1,
                progress=kill_after_the_first_answer,
            )
    finally:
        process.kill()
        process.wait(timeout=10)
    answered = sum(isinstance(result, Classification) for result in results)
    assert 4 <= answered < 40
    lost = results[answered:]
    assert all(isinstance(error, ImageError) and error.code == "UNAVAILABLE" for error in lost), [
        (type(error).__name__, getattr(error, "code", None), str(error)[:120]) for error in lost[:3]
    ]


def test_predict_many_resumes_on_a_new_stream_after_a_restart(
    serve_process: tuple[list[str], str],
) -> None:
    command, address = serve_process
    processes = [start_serving(command, address)]

    def restart_after_the_first_answer(done: int, total: int) -> None:
        if len(processes) == 1:
            processes[0].send_signal(signal.SIGKILL)
            processes[0].wait(timeout=10)
            processes.append(start_serving(command, address))

    policy = RetryPolicy(max_attempts=5, initial_backoff=0.2, max_backoff=1.0)
    try:
        with Client(address, retries=policy, timeout=20) as client:
            results = client.predict_many(
                "colors",
                random_images(40),
                batch_size=4,
                max_in_flight=1,
                progress=restart_after_the_first_answer,
            )
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)
    assert len(processes) == 2
    assert all(isinstance(result, Classification) for result in results)


async def test_tls_mistakes_are_named_and_local_ones_exit_2(
    tmp_path: Path, pki: Certificates
) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a" + bytes(64))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.certificate)
    repository = write_test_models(tmp_path / "models")
    async with running_server(repository) as plain:
        local = await asyncio.to_thread(
            visionrpc, "models", "--ca", str(not_pem), server=plain.address
        )
        to_plaintext = await asyncio.to_thread(
            # Retries end well inside the default deadline, with the transport's reason.
            visionrpc,
            "models",
            "--ca",
            str(ca),
            server=plain.address,
        )
    tls = tls_settings(tmp_path, pki, mutual=False)
    async with running_server(repository, **tls) as secure:
        with (
            Client(secure.address, retries=None) as plaintext_client,
            pytest.raises(UnavailableError) as plaintext,
        ):
            await asyncio.to_thread(plaintext_client.models, timeout=3)
        other_ca = TLSConfig(root_certificates=make_certificates().ca.certificate)
        with (
            Client(secure.address, tls=other_ca, retries=None) as untrusting_client,
            pytest.raises(UnavailableError) as untrusted,
        ):
            await asyncio.to_thread(untrusting_client.models, timeout=3)
    assert (local.returncode, local.stdout) == (2, "")
    assert local.stderr.splitlines() == [
        "visionrpc models: INVALID_ARGUMENT: TLS: root_certificates is not a PEM certificate "
        "(no '-----BEGIN ...CERTIFICATE-----' line); convert DER files with openssl"
    ]
    assert to_plaintext.returncode == 4
    (line,) = to_plaintext.stderr.splitlines()
    assert "TLS handshake failed: the server does not speak TLS" in line
    assert "if it expects TLS, connect with TLS" in plaintext.value.message
    assert "certificate is not signed by the trusted CA" in untrusted.value.message


def test_a_flag_that_wants_a_number_says_so(server: RunningServer) -> None:
    done = visionrpc("predict", "colors", "x.png", "--tta-views", "flip", server=server.address)
    assert done.returncode == 2
    assert "expected a whole number of at least 1, got 'flip'" in done.stderr
    assert "_positive_int" not in done.stderr


def test_info_shows_every_default_in_force_in_height_by_width(server: RunningServer) -> None:
    with Client(server.address) as client:
        info = client.model_info("colors")
    assert info.top_k == info.config["top_k"]
    assert info.tta_zoom == pytest.approx(info.config["tta"]["zoom"])
    done = visionrpc("info", "colors", server=server.address)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "input: 8x8 (HxW), squish" in lines
    assert f"top_k: {info.top_k}" in lines
    assert f"tta: off (flip, zoom_center; beta {info.tta_beta:g}; zoom {info.tta_zoom:g})" in lines
    limit = info.max_images_per_request or "no limit"
    assert f"max images per request: {limit}" in lines
    assert "accepted formats: JPEG, MPO, PNG, WEBP, BMP, GIF" in lines


async def test_an_answer_with_oversized_metadata_is_not_reported_as_overload() -> None:
    async def predict(request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no model named " + "x" * 20_000)
        raise AssertionError("abort returns only by raising")

    async with scripted_server(predict) as address, AsyncClient(address) as client:
        with pytest.raises(InvalidInputError, match="metadata too large") as caught:
            await client.predict("colors", IMAGE)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
