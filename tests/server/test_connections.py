"""Connection hygiene through a real server: idle connections are closed after the idle
limit, whether a gRPC client left them or a peer that never sent a call."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import grpc
import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2_grpc as pb_grpc

RED = png(solid(255, 0, 0))
IDLE_LIMIT_SECONDS = 0.5
# How long a connection is watched: many idle limits, and far below anything that could
# close a connection otherwise (keepalive, connection age).
WATCH_SECONDS = 3.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = struct.pack(">I", 0)[1:] + bytes([0x4, 0]) + struct.pack(">I", 0)
GOAWAY = 0x7


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_channel_mean_classifier(root, "colors")
    return root


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data``, a server's bytes from the start."""
    types, offset = [], 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        types.append(data[offset + 3])
        offset += 9 + length
    return types


def silent_peer(port: int) -> tuple[bytes, bool]:
    """Opens an HTTP/2 connection, sends no call; what the server sent, and whether it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=WATCH_SECONDS) as peer:
        peer.sendall(HTTP2_PREFACE + EMPTY_SETTINGS)
        received = b""
        try:
            while chunk := peer.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        return received, True


@pytest.mark.parametrize(("idle_limit", "closed"), [(IDLE_LIMIT_SECONDS, True), (0.0, False)])
async def test_a_connection_without_calls_is_closed_after_the_idle_limit(
    repository: Path, idle_limit: float, closed: bool
) -> None:
    async with running_server(repository, max_connection_idle_seconds=idle_limit) as server:
        port = int(server.address.rsplit(":", 1)[1])
        received, was_closed = await asyncio.to_thread(silent_peer, port)
    assert was_closed is closed
    # The server says goodbye (GOAWAY) before it closes, so a client knows to reconnect.
    assert (GOAWAY in frame_types(received)) is closed


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
