"""The drain's accept window and its count of calls in flight, on a real ``Drain``.

Each call is a task of its own, as grpc.aio runs every call (interceptors and handler)
in one task: ``arrive`` does what the drain's interceptor does when a call reaches it.
The serving side, through a real server and client, is in ``test_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import time

from visionrpc.server.drain import (
    ACCEPT_GAP_TICKS,
    ACCEPT_MIN_TICKS,
    ACCEPT_WINDOW_LIMIT,
    QUIET_SECONDS,
    TICK_SECONDS,
    Drain,
)


async def arrive(drain: Drain, done: asyncio.Event | None = None) -> bool:
    """One call reaching the interceptor now, in a task of its own that ends at once or,
    given ``done``, when it is set; whether it is served."""

    async def call() -> bool:
        accepted = drain.admit()
        if done is not None:
            await done.wait()
        return accepted

    return await asyncio.create_task(call())


async def test_calls_before_the_drain_and_right_after_it_are_served_later_ones_refused() -> None:
    drain = Drain()
    assert await arrive(drain)
    drain.begin()
    # Within the window's first ticks: a call gRPC held when the signal came.
    assert await arrive(drain)
    await drain.window_closed()
    assert not await arrive(drain)
    # Closed for good, even for calls that now come back to back.
    assert [await arrive(drain) for _ in range(3)] == [False, False, False]


async def test_a_backlog_taken_back_to_back_keeps_the_window_open_until_a_lull() -> None:
    drain = Drain()
    drain.begin()
    # Calls a tick apart, as a backlog gRPC held is taken, past the window's minimum.
    last_arrival = 0
    while drain.ticks < ACCEPT_MIN_TICKS + ACCEPT_GAP_TICKS:
        last_arrival = drain.ticks
        assert await arrive(drain), last_arrival
        await asyncio.sleep(TICK_SECONDS)
    assert drain.window_open
    # The lull ends the backlog: the window closes that many ticks after the last call,
    # and the next call is one made after the signal.
    await drain.window_closed()
    assert drain.ticks == last_arrival + ACCEPT_GAP_TICKS
    assert not await arrive(drain)


async def test_the_window_never_outlasts_its_limit_under_calls_that_keep_coming() -> None:
    drain = Drain()
    began = time.monotonic()
    drain.begin()
    served = True
    while served:
        served = await arrive(drain)
        await asyncio.sleep(TICK_SECONDS / 2)
    # Refused only once the limit had passed.
    assert time.monotonic() - began >= ACCEPT_WINDOW_LIMIT
    assert not drain.window_open


async def test_a_call_counts_as_in_flight_from_the_interceptor_until_its_task_ends() -> None:
    # Also while its request is still on the way and no handler runs yet.
    drain = Drain()
    done = asyncio.Event()
    receiving = asyncio.create_task(arrive(drain, done))
    await asyncio.sleep(0.05)
    assert drain.in_flight == 1
    drain.begin()
    assert not await drain.wait_idle(ACCEPT_WINDOW_LIMIT + 0.2)
    done.set()
    assert await receiving
    assert await drain.wait_idle(5)
    assert drain.in_flight == 0


async def test_refusals_that_keep_coming_hold_the_stop_only_briefly() -> None:
    # Callers that ignore the retry hint never leave a quiet moment.
    drain = Drain()
    drain.begin()
    await drain.window_closed()
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            assert not await arrive(drain)
            await asyncio.sleep(QUIET_SECONDS / 5)

    hammering = asyncio.create_task(hammer())
    # Done after about QUIET_WAIT_LIMIT, not at the end of the 60 s timeout.
    assert await drain.wait_idle(60)
    stop.set()
    await hammering


async def test_a_stop_without_grace_is_idle_only_when_no_call_is_in_flight() -> None:
    # A start that failed stops with no grace: nothing to wait for, nothing to warn of.
    drain = Drain()
    drain.begin()
    assert await drain.wait_idle(0)
    done = asyncio.Event()
    receiving = asyncio.create_task(arrive(drain, done))
    await asyncio.sleep(0.05)
    assert not await drain.wait_idle(0)
    done.set()
    await receiving
