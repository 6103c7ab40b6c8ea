"""The client over the server's own TLS (server-authenticated and mutual) and bearer-token
check, with generated certificates; and metadata on every call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.conftest import solid
from tests.client.scripted_server import MetadataRecorder, inference_server
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import RunningServer, running_server, tls_settings
from tests.helpers.tls import Certificates, make_certificates
from visionrpc.client import (
    AsyncClient,
    Classification,
    Client,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)

IMAGE = solid((0, 255, 0))


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    return root


@pytest.fixture
async def app(repository: Path) -> AsyncIterator[RunningServer]:
    async with running_server(repository) as running:
        yield running


@contextlib.asynccontextmanager
async def tls_server(
    repository: Path, pki: Certificates, *, mutual: bool, **settings: Any
) -> AsyncIterator[int]:
    """A real server whose port speaks TLS with the test CA's certificate; yields the port."""
    tls = tls_settings(repository.parent, pki, mutual=mutual)
    async with running_server(repository, **tls, **settings) as server:
        yield int(server.address.rsplit(":", 1)[1])


async def test_tls_with_the_test_ca(repository: Path, pki: Certificates) -> None:
    async with tls_server(repository, pki, mutual=False) as port:
        tls = TLSConfig(root_certificates=pki.ca.certificate)
        async with AsyncClient(f"localhost:{port}", tls=tls, retries=None) as client:
            result = await client.predict("colors", IMAGE)
        with Client(f"127.0.0.1:{port}", tls=tls, retries=None) as sync_client:
            sync_result = await asyncio.to_thread(sync_client.predict, "colors", IMAGE)
    assert isinstance(result, Classification)
    assert result.label == "green"
    assert isinstance(sync_result, Classification)


async def test_server_name_override_checks_the_certificate_name(
    repository: Path, pki: Certificates
) -> None:
    async with tls_server(repository, pki, mutual=False) as port:
        right = TLSConfig(root_certificates=pki.ca.certificate, server_name="localhost")
        async with AsyncClient(f"127.0.0.1:{port}", tls=right, retries=None) as client:
            assert isinstance(await client.predict("colors", IMAGE), Classification)
        wrong = TLSConfig(root_certificates=pki.ca.certificate, server_name="elsewhere")
        async with AsyncClient(f"127.0.0.1:{port}", tls=wrong, retries=None) as client:
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE, timeout=5)


async def test_an_untrusted_server_certificate_is_unavailable(
    repository: Path, pki: Certificates
) -> None:
    other_ca = make_certificates().ca.certificate
    async with tls_server(repository, pki, mutual=False) as port:
        tls = TLSConfig(root_certificates=other_ca)
        async with AsyncClient(f"localhost:{port}", tls=tls, retries=None) as client:
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE, timeout=5)


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(
    repository: Path, pki: Certificates
) -> None:
    async with (
        tls_server(repository, pki, mutual=False) as port,
        AsyncClient(f"localhost:{port}", retries=None) as client,
    ):
        with pytest.raises(UnavailableError):
            await client.predict("colors", IMAGE, timeout=5)


async def test_mutual_tls_needs_the_client_certificate(repository: Path, pki: Certificates) -> None:
    async with tls_server(repository, pki, mutual=True) as port:
        mutual = TLSConfig(
            root_certificates=pki.ca.certificate,
            certificate_chain=pki.client.certificate,
            private_key=pki.client.private_key,
        )
        async with AsyncClient(f"localhost:{port}", tls=mutual, retries=None) as client:
            assert isinstance(await client.predict("colors", IMAGE), Classification)
        server_only = TLSConfig(root_certificates=pki.ca.certificate)
        async with AsyncClient(f"localhost:{port}", tls=server_only, retries=None) as client:
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE, timeout=5)


async def test_the_token_in_client_metadata_passes_the_servers_check(
    repository: Path, pki: Certificates
) -> None:
    async with tls_server(repository, pki, mutual=False, auth_token="secret-token") as port:
        tls = TLSConfig(root_certificates=pki.ca.certificate)
        token = (("authorization", "Bearer secret-token"),)
        async with AsyncClient(f"localhost:{port}", tls=tls, metadata=token) as client:
            assert isinstance(await client.predict("colors", IMAGE), Classification)
            assert len(await client.predict_many("colors", [IMAGE] * 3, batch_size=2)) == 3
            assert [model.name for model in await client.models()] == ["colors"]
        async with AsyncClient(f"localhost:{port}", tls=tls, retries=None) as client:
            with pytest.raises(UnauthenticatedError) as refused:
                await client.predict("colors", IMAGE)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_client_and_call_metadata_reach_every_method(app: RunningServer) -> None:
    recorder = MetadataRecorder()
    async with inference_server(app, interceptors=[recorder]) as port:
        token = (("authorization", "Bearer secret-token"),)
        async with AsyncClient(f"127.0.0.1:{port}", metadata=token) as client:
            await client.predict("colors", IMAGE, metadata=[("x-request-tag", "one")])
            await client.predict_many("colors", [IMAGE] * 3, batch_size=2)
            await client.models()
            await client.model_info("colors")
        with Client(f"127.0.0.1:{port}", metadata=token) as sync_client:
            await asyncio.to_thread(sync_client.models)
    methods = [method.rsplit("/", 1)[1] for method, _ in recorder.calls]
    # predict_many of several images first asks for the model's max images per request.
    assert methods == [
        "Predict",
        "GetModelInfo",
        "PredictStream",
        "ListModels",
        "GetModelInfo",
        "ListModels",
    ]
    for _, metadata in recorder.calls:
        assert metadata["authorization"] == "Bearer secret-token"
    assert recorder.calls[0][1]["x-request-tag"] == "one"
    assert "x-request-tag" not in recorder.calls[1][1]
