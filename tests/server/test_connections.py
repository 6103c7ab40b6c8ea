"""Connection hygiene through a real server, seen by a real gRPC client and by a bare HTTP/2
peer: idle connections closed after the idle limit, aged ones asked to go, vanished peers
found by keepalive pings, ping floods sent away, streams per connection announced."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.serve_log import serve_process
from tests.helpers.server import free_port, running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

RED = png(solid(255, 0, 0))
IDLE_LIMIT_SECONDS = 0.5
# How long a connection is watched: many idle limits, and far below anything that could
# close a connection otherwise (keepalive, connection age).
WATCH_SECONDS = 5.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = struct.pack(">I", 0)[1:] + bytes([0x4, 0]) + struct.pack(">I", 0)
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors")
    return root


def frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (type, payload) of each HTTP/2 frame in ``data``, a server's bytes from the start."""
    found, offset = [], 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        found.append((data[offset + 3], data[offset + 9 : offset + 9 + length]))
        offset += 9 + length
    return found


def frame_types(data: bytes) -> list[int]:
    return [kind for kind, _ in frames(data)]


def ping_frame(payload: bytes) -> bytes:
    return struct.pack(">I", 8)[1:] + bytes([PING, 0]) + struct.pack(">I", 0) + payload


def open_stream_frame(authority: str) -> bytes:
    """HEADERS opening stream 1, a PredictStream call that then never sends a message.

    Each header is an HPACK literal without indexing, new name, no Huffman coding.
    """
    headers = {
        ":method": "POST",
        ":scheme": "http",
        ":path": "/visionrpc.v1.InferenceService/PredictStream",
        ":authority": authority,
        "content-type": "application/grpc",
        "te": "trailers",
    }
    block = b"".join(
        bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
        for name, value in headers.items()
    )
    end_headers = 0x4
    return (
        struct.pack(">I", len(block))[1:] + bytes([0x1, end_headers]) + struct.pack(">I", 1) + block
    )


def silent_peer(port: int, pings: int = 0, open_stream: bool = False) -> tuple[bytes, bool]:
    """Opens an HTTP/2 connection, sends ``pings`` pings at once and (``open_stream``) opens
    a call, then goes silent, never answering the server; what the server sent, and
    whether it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=WATCH_SECONDS) as peer:
        peer.sendall(
            HTTP2_PREFACE
            + EMPTY_SETTINGS
            + b"".join(ping_frame(n.to_bytes(8, "big")) for n in range(pings))
            + (open_stream_frame(f"127.0.0.1:{port}") if open_stream else b"")
        )
        received = b""
        try:
            while chunk := peer.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


async def watch_silent_peer(
    repository: Path, pings: int = 0, open_stream: bool = False, **settings: Any
) -> tuple[bytes, bool]:
    """``silent_peer`` against a server whose connection limits are all off but ``settings``."""
    limits: dict[str, Any] = {
        "max_connection_idle_seconds": 0,
        "max_connection_age_seconds": 0,
        "keepalive_time_seconds": 0,
        **settings,
    }
    async with running_server(repository, **limits) as server:
        port = int(server.address.rsplit(":", 1)[1])
        return await asyncio.to_thread(silent_peer, port, pings, open_stream)


@pytest.mark.parametrize(("idle_limit", "closed"), [(IDLE_LIMIT_SECONDS, True), (0.0, False)])
async def test_a_connection_without_calls_is_closed_after_the_idle_limit(
    repository: Path, idle_limit: float, closed: bool
) -> None:
    received, was_closed = await watch_silent_peer(
        repository, max_connection_idle_seconds=idle_limit
    )
    assert was_closed is closed
    # The server says goodbye (GOAWAY) before it closes, so a client knows to reconnect.
    assert (GOAWAY in frame_types(received)) is closed


async def test_an_aged_connection_is_asked_to_go_so_clients_rebalance(repository: Path) -> None:
    received, was_closed = await watch_silent_peer(
        repository, max_connection_age_seconds=0.5, max_connection_age_grace_seconds=0.5
    )
    assert GOAWAY in frame_types(received)
    assert was_closed


@pytest.mark.parametrize(("keepalive", "closed"), [(0.5, True), (0.0, False)])
async def test_keepalive_pings_find_a_vanished_peer_that_holds_a_call_open(
    repository: Path, keepalive: float, closed: bool
) -> None:
    received, was_closed = await watch_silent_peer(
        repository,
        open_stream=True,
        keepalive_time_seconds=keepalive,
        keepalive_timeout_seconds=0.5,
    )
    # The server's own ping (not an answer to one: the peer sent none) went unanswered.
    assert (PING in frame_types(received)) is closed
    assert was_closed is closed


async def test_a_client_that_pings_too_often_is_sent_away(repository: Path) -> None:
    received, _ = await watch_silent_peer(
        repository, pings=4, keepalive_min_ping_interval_seconds=10
    )
    goaways = [payload for kind, payload in frames(received) if kind == GOAWAY]
    assert goaways, frame_types(received)
    error_code = int.from_bytes(goaways[0][4:8], "big")
    assert error_code == ENHANCE_YOUR_CALM
    assert b"too_many_pings" in goaways[0][8:]


async def test_the_server_announces_its_streams_per_connection_limit(repository: Path) -> None:
    received, _ = await watch_silent_peer(
        repository, max_concurrent_streams=7, max_connection_idle_seconds=0.5
    )
    settings = next(payload for kind, payload in frames(received) if kind == SETTINGS and payload)
    announced = {
        int.from_bytes(settings[i : i + 2], "big"): int.from_bytes(settings[i + 2 : i + 6], "big")
        for i in range(0, len(settings), 6)
    }
    assert announced[SETTINGS_MAX_CONCURRENT_STREAMS] == 7


async def test_a_client_left_idle_is_sent_away_and_reconnects_for_its_next_call(
    repository: Path,
) -> None:
    async with (
        running_server(repository, max_connection_idle_seconds=IDLE_LIMIT_SECONDS) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        await stub.Predict(encoded_request("colors", RED), timeout=10)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # GOAWAY moves the channel out of READY; it connects again only when asked to.
        await asyncio.wait_for(
            channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=10
        )
        assert channel.get_state() == grpc.ChannelConnectivity.IDLE
        response = await stub.Predict(encoded_request("colors", RED), timeout=10)
        assert response.results[0].classification.top[0].label == "red"


async def test_sigterm_with_idle_streams_and_silent_connections_exits_well_inside_the_grace(
    repository: Path,
) -> None:
    metrics_port = free_port()
    grace = 60
    streams = 20
    # A peer that never answers holds its connection until the server's goodbye ping
    # times out: the keepalive timeout, which here is short, not the grace.
    flags = ("--shutdown-grace-seconds", str(grace), "--keepalive-timeout-seconds", "2")
    with serve_process(repository, *flags, "--metrics-port", str(metrics_port)) as server:
        await asyncio.to_thread(server.wait_until_serving)
        never = asyncio.Event()

        async def nothing_to_send() -> AsyncIterator[pb.PredictRequest]:
            await never.wait()
            yield pb.PredictRequest()

        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            calls = [stub.PredictStream(nothing_to_send()) for _ in range(streams)]
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            peers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
            for peer in peers:
                peer.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
            await asyncio.to_thread(
                wait_for_sample, metrics_port, "grpc_server_started_total", PREDICT_STREAM, streams
            )
            server.sigterm()
            # Far less than the grace: nothing idle holds the drain.
            exit_code = await asyncio.to_thread(server.exit_code, grace / 3)
            endings = [await ended(call) for call in calls]
            watch.cancel()
            for peer in peers:
                peer.close()
    assert exit_code == 0, server.log_text()
    assert set(endings) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, endings


PREDICT_STREAM = {
    "grpc_type": "bidi_stream",
    "grpc_service": "visionrpc.v1.InferenceService",
    "grpc_method": "PredictStream",
}


def scraped(port: int, name: str, labels: dict[str, str]) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        exposition = response.read().decode()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def wait_for_sample(port: int, name: str, labels: dict[str, str], value: float) -> None:
    deadline = time.monotonic() + 60
    while (seen := scraped(port, name, labels)) != value:
        assert time.monotonic() < deadline, f"{name}{labels} is {seen}, never {value}"
        time.sleep(0.05)


async def ended(call: Any) -> grpc.StatusCode:
    """The status a streaming call ended with, once it ended."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK
