"""The server's own TLS (server-authenticated and mutual) and its bearer-token check."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import running_server, tls_settings
from tests.helpers.tls import Certificates, make_certificates
from tests.server.support import encoded_request, png, solid
from visionrpc.cli import build_parser
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server import cli as server_cli
from visionrpc.server.logging_setup import ACCESS_LOGGER
from visionrpc.server.settings import ServerSettings, SettingsError, load_settings

TOKEN = "s3cret-token_42"
RED = png(solid(250, 10, 10))


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    return root


@pytest.fixture
def pem_files(tmp_path: Path, pki: Certificates) -> dict[str, Any]:
    """The settings that turn on mutual TLS, as files."""
    return tls_settings(tmp_path, pki, mutual=True)


def tls_channel(port: int, pki: Certificates, *, client_certificate: bool) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.certificate,
        private_key=pki.client.private_key if client_certificate else None,
        certificate_chain=pki.client.certificate if client_certificate else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


async def predict_top_label(channel: grpc.aio.Channel, **call: Any) -> str:
    response = await pb_grpc.InferenceServiceStub(channel).Predict(
        encoded_request("colors", RED), timeout=10, **call
    )
    return response.results[0].classification.top[0].label


async def test_a_tls_port_serves_clients_that_trust_its_ca(
    repository: Path, pki: Certificates, tmp_path: Path
) -> None:
    async with running_server(repository, **tls_settings(tmp_path, pki, mutual=False)) as server:
        port = port_of(server.address)
        async with tls_channel(port, pki, client_certificate=False) as channel:
            assert await predict_top_label(channel) == "red"
        async with grpc.aio.insecure_channel(server.address) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await predict_top_label(plaintext)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(
    repository: Path, pki: Certificates, pem_files: dict[str, Any]
) -> None:
    async with running_server(repository, **pem_files) as server:
        port = port_of(server.address)
        async with tls_channel(port, pki, client_certificate=True) as channel:
            assert await predict_top_label(channel) == "red"
        async with tls_channel(port, pki, client_certificate=False) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await predict_top_label(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (("tls_cert",), "tls_cert and tls_key go together"),
        (("tls_key",), "tls_cert and tls_key go together"),
        (("tls_client_ca",), "tls_client_ca needs tls_cert and tls_key"),
    ],
)
def test_incomplete_tls_settings_are_refused(
    pem_files: dict[str, Any], given: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        ServerSettings(**{name: pem_files[name] for name in given})


async def test_unusable_tls_files_fail_start_up_naming_the_file(
    repository: Path, pem_files: dict[str, Any], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(SettingsError, match=f"tls_key: cannot read {re.escape(str(missing))}"):
        async with running_server(repository, tls_cert=pem_files["tls_cert"], tls_key=missing):
            pass
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(make_certificates().server.private_key)
    with pytest.raises(SettingsError, match="not a matching PEM certificate"):
        async with running_server(repository, tls_cert=pem_files["tls_cert"], tls_key=other_key):
            pass
    with pytest.raises(SettingsError, match=r"tls_client_ca .* not PEM CA certificates"):
        async with running_server(repository, **{**pem_files, "tls_client_ca": other_key}):
            pass


def test_serve_exits_with_the_reason_when_a_tls_file_is_missing(
    repository: Path, pem_files: dict[str, Any], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pem"
    command = [sys.executable, "-m", "visionrpc.cli", "serve", "--repository", str(repository)]
    flags = ["--tls-cert", str(pem_files["tls_cert"]), "--tls-key", str(missing)]
    done = subprocess.run(
        [*command, *flags, "--metrics-port", "0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"tls_key: cannot read {missing}" in done.stderr


def test_tls_and_token_file_settings_come_from_flags_and_environment(
    pem_files: dict[str, Any], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    flags = build_parser().parse_args(
        [
            "serve",
            f"--tls-cert={pem_files['tls_cert']}",
            f"--tls-key={pem_files['tls_key']}",
            f"--auth-token-file={token_file}",
        ]
    )
    environ = {"VISIONRPC_TLS_CLIENT_CA": str(pem_files["tls_client_ca"])}
    settings = server_cli.settings_from_args(flags, environ)
    assert (settings.tls_cert, settings.tls_key) == (pem_files["tls_cert"], pem_files["tls_key"])
    assert settings.tls_client_ca == pem_files["tls_client_ca"]
    assert settings.auth_token_file == token_file
    # An empty variable means "not set", as for a container that blanks it.
    assert load_settings({}, {"VISIONRPC_TLS_CERT": "", "VISIONRPC_TLS_KEY": ""}).tls_cert is None


def test_the_token_has_no_flag_and_stays_out_of_the_settings_repr() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--auth-token", TOKEN])
    settings = load_settings({}, {"VISIONRPC_AUTH_TOKEN": TOKEN})
    assert settings.read_auth_token() == TOKEN
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth_token": "two words"}, "visible ASCII"),
        ({"auth_token": TOKEN, "auth_token_file": Path("t")}, "not both"),
    ],
)
def test_unusable_token_settings_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        ServerSettings(**values)


def test_the_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert ServerSettings(auth_token_file=token_file).read_auth_token() == TOKEN
    token_file.write_text("\n")
    with pytest.raises(SettingsError, match="auth_token_file"):
        ServerSettings(auth_token_file=token_file).read_auth_token()


@pytest.fixture
async def guarded_channel(repository: Path) -> AsyncIterator[grpc.aio.Channel]:
    async with (
        running_server(repository, auth_token=TOKEN) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield channel


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
    ids=["no token", "wrong token", "no Bearer scheme"],
)
async def test_inference_calls_without_the_token_are_unauthenticated(
    guarded_channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = pb_grpc.InferenceServiceStub(guarded_channel)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
    assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (unary.value.details() or "")
    stream = stub.PredictStream(iter([encoded_request("colors", RED)]), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [answer async for answer in stream]
    assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_inference_calls_with_the_token_are_answered(
    guarded_channel: grpc.aio.Channel,
) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    assert await predict_top_label(guarded_channel, metadata=metadata) == "red"
    stub = pb_grpc.InferenceServiceStub(guarded_channel)
    stream = stub.PredictStream(
        iter([encoded_request("colors", RED, request_id="a")]), metadata=metadata
    )
    answers = [answer async for answer in stream]
    assert [answer.request_id for answer in answers] == ["a"]
    assert answers[0].results[0].classification.top[0].label == "red"


def scrape(metrics_port: int) -> str:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def trailing_request_ids(error: grpc.aio.AioRpcError) -> list[str]:
    # The stubs type metadata as items that are not pairs; at run time they are.
    metadata: Any = error.trailing_metadata() or ()
    return [value for key, value in metadata if key == "x-request-id"]


async def test_refused_calls_are_counted_and_access_logged_without_their_content(
    repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    # A name the caller chose: it must not become a label value, as no token came with it.
    scanned = "scan-target-0001"
    async with (
        running_server(repository, metrics=True, auth_token=TOKEN) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Predict(
                encoded_request(scanned, RED), metadata=(("x-request-id", "refused-1"),), timeout=10
            )
        assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert trailing_request_ids(unary.value) == ["refused-1"]
        stream = stub.PredictStream(iter([encoded_request(scanned, RED)]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            [answer async for answer in stream]
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        exposition = await asyncio.to_thread(scrape, server.metrics_port)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    for method, kind in (("Predict", "unary"), ("PredictStream", "bidi_stream")):
        labels = (
            ("grpc_code", "UNAUTHENTICATED"),
            ("grpc_method", method),
            ("grpc_service", "visionrpc.v1.InferenceService"),
            ("grpc_type", kind),
        )
        assert samples["grpc_server_handled_total", labels] == 1.0
    # The unary request arrived (unread); the stream was refused before its first one.
    refused = (("code", "UNAUTHENTICATED"), ("model", "_unknown"), ("version", ""))
    assert samples["visionrpc_requests_total", refused] == 1.0
    assert samples["visionrpc_request_duration_seconds_count", refused] == 1.0
    served = (("code", "OK"), ("model", "colors"), ("version", "1"))
    assert samples["visionrpc_requests_total", served] == 0.0
    assert scanned not in exposition
    access = [record.__dict__ for record in caplog.records if record.name == ACCESS_LOGGER]
    assert [(line["method"].rsplit("/", 1)[1], line["status"]) for line in access] == [
        ("Predict", "UNAUTHENTICATED"),
        ("PredictStream", "UNAUTHENTICATED"),
        ("ListModels", "UNAUTHENTICATED"),
    ]
    assert (access[0]["model"], access[0]["images"]) == ("", 0)
    assert access[0]["request_id"] == "refused-1"
    generated = access[1]["request_id"]
    assert isinstance(generated, str) and re.fullmatch(r"[0-9a-f]{32}", generated)
    assert trailing_request_ids(streamed.value) == [generated]


async def test_health_and_reflection_stay_open_without_the_token(
    guarded_channel: grpc.aio.Channel,
) -> None:
    health = health_pb2_grpc.HealthStub(guarded_channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(guarded_channel)
    listing = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    [listed] = [answer async for answer in listing]
    names = {service.name for service in listed.list_services_response.service}
    assert "visionrpc.v1.InferenceService" in names


async def test_tls_and_token_together(
    repository: Path, pki: Certificates, pem_files: dict[str, Any]
) -> None:
    async with running_server(repository, auth_token=TOKEN, **pem_files) as server:
        port = port_of(server.address)
        async with tls_channel(port, pki, client_certificate=True) as channel:
            metadata = (("authorization", f"Bearer {TOKEN}"),)
            assert await predict_top_label(channel, metadata=metadata) == "red"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await predict_top_label(channel)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
