"""The server's grpc.health.v1 servicer on its own real grpc.aio server: Check, Watch, shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from visionrpc.server.health import HealthServicer

Response = health_pb2.HealthCheckResponse
SERVING = Response.SERVING
NOT_SERVING = Response.NOT_SERVING
SERVICE_UNKNOWN = Response.SERVICE_UNKNOWN
WatchCall = grpc.aio.UnaryStreamCall[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]
Served = tuple[HealthServicer, health_pb2_grpc.HealthStub]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    servicer = HealthServicer()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, health_pb2_grpc.HealthStub(channel)
    finally:
        await server.stop(0)


def watch(health: health_pb2_grpc.HealthStub, service: str) -> WatchCall:
    call: WatchCall = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return call


async def next_status(call: WatchCall) -> int:
    answer = await call.read()
    assert isinstance(answer, health_pb2.HealthCheckResponse), answer
    return int(answer.status)


async def ending_code(call: WatchCall) -> grpc.StatusCode:
    """The status a watch ends with, read after its last answer."""
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    return ended.value.code()


async def test_check_answers_what_was_set_and_not_found_for_other_services(
    served: Served,
) -> None:
    servicer, health = served
    await servicer.set("colors", SERVING)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="colors"), timeout=10)
    assert answer.status == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_watcher_keeps_hearing_changes_after_another_watcher_of_its_service_leaves(
    served: Served,
) -> None:
    servicer, health = served
    await servicer.set("colors", SERVING)
    staying, leaving = watch(health, "colors"), watch(health, "colors")
    assert [await next_status(staying), await next_status(leaving)] == [SERVING, SERVING]
    leaving.cancel()
    # Round trips on the same connection, so the server has seen the other watcher leave.
    for _ in range(3):
        await health.Check(health_pb2.HealthCheckRequest(service="colors"), timeout=10)
    await servicer.set("colors", NOT_SERVING)
    assert await next_status(staying) == NOT_SERVING
    await servicer.set("colors", SERVING)
    assert await next_status(staying) == SERVING
    staying.cancel()


async def test_shutdown_sends_not_serving_once_then_ends_every_watch(served: Served) -> None:
    servicer, health = served
    await servicer.set("colors", SERVING)
    await servicer.set("loading", NOT_SERVING)
    calls = {service: watch(health, service) for service in ("colors", "loading", "nope")}
    firsts = {service: await next_status(call) for service, call in calls.items()}
    assert firsts == {"colors": SERVING, "loading": NOT_SERVING, "nope": SERVICE_UNKNOWN}
    await servicer.enter_graceful_shutdown()
    assert await next_status(calls["colors"]) == NOT_SERVING
    for call in calls.values():
        assert await ending_code(call) == grpc.StatusCode.UNAVAILABLE
    # Shutdown is for good: a later status is ignored, and a new watch ends after one answer.
    await servicer.set("colors", SERVING)
    late = watch(health, "colors")
    assert await next_status(late) == NOT_SERVING
    assert await ending_code(late) == grpc.StatusCode.UNAVAILABLE
