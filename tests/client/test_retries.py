"""gRPC's retry policy, as the clients configure it: what is retried, how often, and restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.client.conftest import solid
from tests.client.scripted_server import PredictScript, scripted_server
from tests.helpers.onnx_models import write_channel_mean_classifier
from tests.helpers.server import free_port, running_server
from visionrpc.client import (
    AsyncClient,
    Classification,
    Client,
    InvalidInputError,
    OverloadedError,
    RetryPolicy,
    UnavailableError,
)

IMAGE = solid((0, 0, 255))
QUICK = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OVERLOADED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("code", [UNAVAILABLE, OVERLOADED])
async def test_retryable_failures_are_retried_until_success(code: grpc.StatusCode) -> None:
    script = PredictScript([code, code, code])
    async with scripted_server(script) as address, AsyncClient(address, retries=QUICK) as client:
        result = await client.predict("m", IMAGE)
    assert isinstance(result, Classification)
    assert script.attempts == 4


async def test_the_sync_client_retries_too() -> None:
    script = PredictScript([OVERLOADED, OVERLOADED])
    async with scripted_server(script) as address:
        with Client(address, retries=QUICK) as client:
            result = await asyncio.to_thread(client.predict, "m", IMAGE)
    assert isinstance(result, Classification)
    assert script.attempts == 3


async def test_other_failures_are_not_retried() -> None:
    script = PredictScript([grpc.StatusCode.INVALID_ARGUMENT])
    async with scripted_server(script) as address, AsyncClient(address, retries=QUICK) as client:
        with pytest.raises(InvalidInputError):
            await client.predict("m", IMAGE)
    assert script.attempts == 1


async def test_max_attempts_bounds_the_retries() -> None:
    policy = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.05)
    script = PredictScript([OVERLOADED] * 4)
    async with scripted_server(script) as address, AsyncClient(address, retries=policy) as client:
        with pytest.raises(OverloadedError):
            await client.predict("m", IMAGE)
    assert script.attempts == 2


async def test_retries_none_makes_one_attempt() -> None:
    script = PredictScript([OVERLOADED])
    async with scripted_server(script) as address, AsyncClient(address, retries=None) as client:
        with pytest.raises(OverloadedError):
            await client.predict("m", IMAGE)
    assert script.attempts == 1


@pytest.fixture
def one_model(tmp_path: Path) -> Path:
    write_channel_mean_classifier(tmp_path)
    return tmp_path


@contextlib.asynccontextmanager
async def restarted_later(repository: Path, port: int, delay: float) -> AsyncIterator[None]:
    """A new server on ``port``, started ``delay`` seconds from now, stopped on exit."""
    stop = asyncio.Event()

    async def serve() -> None:
        await asyncio.sleep(delay)
        async with running_server(repository, port=port):
            await stop.wait()

    task = asyncio.create_task(serve())
    try:
        yield
    finally:
        stop.set()
        await task


# Generous backoffs: the replacement server needs time to load its model, and the
# budget (up to 0.5 + 1 + 2 + 2 s of waits, each drawn at random) must outlast it.
RESTART_POLICY = RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=2.0)
RESTART_DELAY = 0.1


async def test_a_call_survives_a_server_restart_on_the_same_port(one_model: Path) -> None:
    port = free_port()
    async with AsyncClient(f"127.0.0.1:{port}", retries=RESTART_POLICY, timeout=20) as client:
        async with running_server(one_model, port=port):
            assert isinstance(await client.predict("colors", IMAGE), Classification)
        async with restarted_later(one_model, port, delay=RESTART_DELAY):
            result = await client.predict("colors", IMAGE)
    assert isinstance(result, Classification)
    assert result.label == "blue"


async def test_without_retries_a_restart_is_unavailable(one_model: Path) -> None:
    port = free_port()
    async with AsyncClient(f"127.0.0.1:{port}", retries=None, timeout=20) as client:
        async with running_server(one_model, port=port):
            assert isinstance(await client.predict("colors", IMAGE), Classification)
        async with restarted_later(one_model, port, delay=RESTART_DELAY):
            with pytest.raises(UnavailableError):
                await client.predict("colors", IMAGE)


async def test_retry_throttling_stops_retries_once_most_calls_fail() -> None:
    # 4 tokens: retries stop at 2 or fewer. The first call fails twice (4 -> 3 -> 2), so
    # it is retried once; from then on every failure is final after one attempt.
    policy = RetryPolicy(
        max_attempts=5, initial_backoff=0.01, max_backoff=0.05, throttle_max_tokens=4
    )
    script = PredictScript([OVERLOADED] * 10)
    async with scripted_server(script) as address, AsyncClient(address, retries=policy) as client:
        for _ in range(4):
            with pytest.raises(OverloadedError):
                await client.predict("m", IMAGE)
    assert script.attempts == 2 + 3
