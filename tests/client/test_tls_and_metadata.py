"""TLS (server-authenticated and mutual) with generated certificates, and metadata on every call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.client.conftest import solid
from tests.client.scripted_server import MetadataRecorder, inference_server
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import RunningServer, running_server
from tests.helpers.tls import Certificates, make_certificates
from visionrpc.client import (
    AsyncClient,
    Classification,
    Client,
    TLSConfig,
    UnavailableError,
)

IMAGE = solid((0, 255, 0))


@pytest.fixture(scope="module")
def pki() -> Certificates:
    return make_certificates()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[RunningServer]:
    write_channel_mean_classifier(tmp_path)
    async with running_server(tmp_path) as running:
        yield running


def server_credentials(
    pki: Certificates, *, require_client_certificate: bool
) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.server.private_key, pki.server.certificate)],
        root_certificates=pki.ca.certificate if require_client_certificate else None,
        require_client_auth=require_client_certificate,
    )


async def test_tls_with_the_test_ca(app: RunningServer, pki: Certificates) -> None:
    credentials = server_credentials(pki, require_client_certificate=False)
    async with inference_server(app, credentials=credentials) as port:
        tls = TLSConfig(root_certificates=pki.ca.certificate)
        async with AsyncClient(f"localhost:{port}", tls=tls, retries=None) as client:
            result = await client.predict("colors", IMAGE)
        with Client(f"127.0.0.1:{port}", tls=tls, retries=None) as sync_client:
            sync_result = await asyncio.to_thread(sync_client.predict, "colors", IMAGE)
    assert isinstance(result, Classification)
    assert result.label == "green"
    assert isinstance(sync_result, Classification)


async def test_server_name_override_checks_the_certificate_name(
    app: RunningServer, pki: Certificates
) -> None:
    credentials = server_credentials(pki, require_client_certificate=False)
    async with inference_server(app, credentials=credentials) as port:
        right = TLSConfig(root_certificates=pki.ca.certificate, server_name="localhost")
        async with AsyncClient(f"127.0.0.1:{port}", tls=right, retries=None) as client:
            assert isinstance(await client.predict("colors", IMAGE), Classification)
        wrong = TLSConfig(root_certificates=pki.ca.certificate, server_name="elsewhere")
        async with AsyncClient(f"127.0.0.1:{port}", tls=wrong, retries=None) as client:
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE, timeout=5)


async def test_an_untrusted_server_certificate_is_unavailable(
    app: RunningServer, pki: Certificates
) -> None:
    other_ca = make_certificates().ca.certificate
    credentials = server_credentials(pki, require_client_certificate=False)
    async with inference_server(app, credentials=credentials) as port:
        tls = TLSConfig(root_certificates=other_ca)
        async with AsyncClient(f"localhost:{port}", tls=tls, retries=None) as client:
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE, timeout=5)


async def test_a_plaintext_client_cannot_talk_to_a_tls_server(
    app: RunningServer, pki: Certificates
) -> None:
    credentials = server_credentials(pki, require_client_certificate=False)
    async with (
        inference_server(app, credentials=credentials) as port,
        AsyncClient(f"localhost:{port}", retries=None) as client,
    ):
        with pytest.raises(UnavailableError):
            await client.predict("colors", IMAGE, timeout=5)


async def test_mutual_tls_needs_the_client_certificate(
    app: RunningServer, pki: Certificates
) -> None:
    credentials = server_credentials(pki, require_client_certificate=True)
    async with inference_server(app, credentials=credentials) as port:
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
    assert methods == ["Predict", "PredictStream", "ListModels", "GetModelInfo", "ListModels"]
    for _, metadata in recorder.calls:
        assert metadata["authorization"] == "Bearer secret-token"
    assert recorder.calls[0][1]["x-request-tag"] == "one"
    assert "x-request-tag" not in recorder.calls[1][1]
