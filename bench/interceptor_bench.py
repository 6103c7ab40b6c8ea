"""What the observability interceptor costs per call, on the cheapest RPC there is.

    .venv/bin/python bench/interceptor_bench.py           # about 1 minute
    .venv/bin/python bench/interceptor_bench.py --quick   # a smoke run, a few seconds

Two in-process ``grpc.aio`` servers that serve only ``grpc.health.v1`` and an echo
bidirectional stream (neither does any work, so the interceptor's share is as large as it
can be): one bare, one with
``ObservabilityInterceptor`` (metrics on its own registry, the access log going to a
logger nobody reads, as in production where a handler formats it). C concurrent
clients send Check after Check, then one stream echoes messages (the interceptor writes
each response itself); the two servers alternate every round so a drifting machine load
cannot skew the ratio. A Predict spends milliseconds in decoding and
onnxruntime, so its share of the interceptor's cost is far smaller than shown here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from serve_bench import cpu_name

from visionrpc.server.health import SERVING, HealthServicer
from visionrpc.server.interceptors import ObservabilityInterceptor
from visionrpc.server.logging_setup import ACCESS_LOGGER
from visionrpc.server.metrics import ServerMetrics


async def start(observed: bool) -> tuple[grpc.aio.Server, str]:
    interceptors: list[ObservabilityInterceptor] = []
    if observed:
        metrics = ServerMetrics(CollectorRegistry())
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"]]
        interceptors.append(ObservabilityInterceptor(metrics, lambda _m, v: v, services))
    server = grpc.aio.server(interceptors=interceptors)
    servicer = HealthServicer()
    await servicer.set("", SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    echo = grpc.stream_stream_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, {"Echo": echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


ECHO = "bench.Echo"


async def _echo(requests: AsyncIterator[bytes], context: object) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def echoes_per_second(address: str, messages: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        # Raw bytes both ways; the stubs know only protobuf codecs and iterator calls.
        echo: Any = channel.stream_stream(f"/{ECHO}/Echo")  # type: ignore[call-arg]
        call = echo()
        started = time.perf_counter()
        for _ in range(messages):
            await call.write(b"x")
            await call.read()
        await call.done_writing()
        return messages / (time.perf_counter() - started)


async def calls_per_second(address: str, concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        await stub.Check(request)
        done = 0
        end = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.Check(request)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def main(rounds: int, seconds: float, messages: int) -> None:
    # The access log is written (its records are made) but goes nowhere, as with INFO
    # records a deployment filters out; formatting cost belongs to the log handler.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    logging.getLogger(ACCESS_LOGGER).propagate = False
    bare, bare_address = await start(observed=False)
    observed, observed_address = await start(observed=True)
    print(f"CPU: {cpu_name()}")
    print(f"{'C':>3} {'bare calls/s':>13} {'observed calls/s':>17} {'observed/bare':>14}")
    try:
        for concurrency in (1, 16):
            bare_rates, observed_rates = [], []
            for _ in range(rounds):
                bare_rates.append(await calls_per_second(bare_address, concurrency, seconds))
                observed_rates.append(
                    await calls_per_second(observed_address, concurrency, seconds)
                )
            bare_rate = statistics.median(bare_rates)
            observed_rate = statistics.median(observed_rates)
            print(
                f"{concurrency:>3} {bare_rate:>13.0f} {observed_rate:>17.0f}"
                f" {observed_rate / bare_rate:>14.2f}"
            )
        bare_rates, observed_rates = [], []
        for _ in range(rounds):
            bare_rates.append(await echoes_per_second(bare_address, messages))
            observed_rates.append(await echoes_per_second(observed_address, messages))
        bare_rate = statistics.median(bare_rates)
        observed_rate = statistics.median(observed_rates)
        print(
            f"{'stream':>6} {bare_rate:>10.0f} {observed_rate:>17.0f}"
            f" {observed_rate / bare_rate:>14.2f}  (echoed messages/s, one stream)"
        )
    finally:
        await bare.stop(0)
        await observed.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    asyncio.run(
        main(
            rounds=1 if args.quick else 5,
            seconds=0.5 if args.quick else 5.0,
            messages=500 if args.quick else 5000,
        )
    )
