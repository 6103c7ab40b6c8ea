"""Each gRPC status becomes its own exception class, with the server's message and code."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.client.conftest import solid
from tests.client.scripted_server import PredictScript, scripted_server
from tests.helpers.server import RunningServer, free_port
from visionrpc.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
    VisionRPCError,
)

IMAGE = solid((255, 0, 0))


@pytest.mark.parametrize(
    ("code", "error_class"),
    [
        (grpc.StatusCode.NOT_FOUND, ModelNotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, OverloadedError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNKNOWN, ServerError),
        (grpc.StatusCode.PERMISSION_DENIED, ServerError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    ],
)
async def test_status_maps_to_its_error_class_in_both_clients(
    code: grpc.StatusCode, error_class: type[VisionRPCError]
) -> None:
    script = PredictScript([code, code])
    async with scripted_server(script) as address:
        async with AsyncClient(address, retries=None) as async_client:
            with pytest.raises(error_class) as from_async:
                await async_client.predict("m", IMAGE)
        with Client(address, retries=None) as client, pytest.raises(error_class) as from_sync:
            await asyncio.to_thread(client.predict, "m", IMAGE)
    for caught in (from_async.value, from_sync.value):
        assert caught.code == code
        assert caught.message == f"scripted {code.name}"
        assert isinstance(caught, VisionRPCError)


def test_unknown_model_is_not_found(server: RunningServer) -> None:
    with Client(server.address) as client, pytest.raises(ModelNotFoundError) as caught:
        client.predict("nope", IMAGE)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.message


def test_unknown_version_is_not_found(server: RunningServer) -> None:
    with Client(server.address) as client, pytest.raises(ModelNotFoundError):
        client.predict("colors", IMAGE, version="99")


def test_an_out_of_range_option_is_invalid_input(server: RunningServer) -> None:
    with Client(server.address) as client, pytest.raises(InvalidInputError) as caught:
        client.predict("channels", IMAGE, threshold=2.0)
    assert "threshold" in caught.value.message


def test_an_impossible_deadline_is_deadline_exceeded(server: RunningServer) -> None:
    with Client(server.address) as client, pytest.raises(DeadlineExceededError):
        client.predict("colors", [IMAGE] * 32, timeout=1e-6)


def test_nothing_listening_is_unavailable() -> None:
    address = f"127.0.0.1:{free_port()}"
    with Client(address, retries=None, timeout=5) as client, pytest.raises(UnavailableError):
        client.models()
