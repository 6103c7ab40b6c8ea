"""``grpc.health.v1`` over asyncio, with Watch streams that end at shutdown.

grpc's own asyncio servicer cannot end a Watch, so one watcher (a load balancer, a client's
channel) would hold every drain for the whole grace period; it also drops the wake-up of a
service's remaining watchers when one of them leaves. This one fixes both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SHUTTING_DOWN = "the server is shutting down"


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1`` over asyncio, whose Watch streams end once shutdown is announced.

    ``server.stop(grace)`` waits for every open call, and a Watch otherwise lasts as long
    as its caller: one watcher (a load balancer, a client's channel) would hold every
    shutdown for the whole grace period. grpc's own asyncio servicer keeps its watches
    open, and drops the wake-up of a service's remaining watchers when one of them leaves.
    Here each watch sends its final status (NOT_SERVING, or SERVICE_UNKNOWN for a service
    never set) and then ends with UNAVAILABLE, as calls cut off by a stopping server do.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {}
        # One condition for every service: statuses change a few times per process life.
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        service = request.service
        sent = self._status_of(service)
        await context.write(health_pb2.HealthCheckResponse(status=sent))
        while not self._shutting_down:
            status = await self._change_from(service, sent)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        """Sets the status ``service`` answers; ignored once shutdown is announced."""
        if self._shutting_down:
            return
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service turns NOT_SERVING for good, and the open watches end once told so."""
        async with self._changed:
            self._shutting_down = True
            self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
            self._changed.notify_all()

    def status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        """What ``Check`` answers for ``service`` (SERVICE_UNKNOWN for one never set)."""
        return self._status_of(service)

    def _status_of(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        return self._statuses.get(service, SERVICE_UNKNOWN)

    async def _change_from(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus
    ) -> health_pb2.HealthCheckResponse.ServingStatus:
        """The status of ``service`` once it is not ``status``, or shutdown is announced."""

        def changed() -> bool:
            return self._status_of(service) != status or self._shutting_down

        async with self._changed:
            await self._changed.wait_for(changed)
            return self._status_of(service)
