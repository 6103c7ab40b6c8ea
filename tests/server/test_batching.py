"""The batcher on its own: pure asyncio, a Python function as the model."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from visionrpc.server.batching import MAX_RETRY_AFTER, Batcher, BatchSettings
from visionrpc.server.errors import (
    DeadlineExceeded,
    ErrorKind,
    Overloaded,
    Unavailable,
    VisionRPCError,
)


class GatedModel:
    """Doubles its input; each run blocks until the test opens the gate."""

    def __init__(self, *, open_gate: bool = False) -> None:
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.started = threading.Semaphore(0)
        self.batches: list[list[float]] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.batches.append([float(v) for v in batch[:, 0]])
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        self.started.release()
        try:
            if not self.gate.wait(timeout=10):
                raise RuntimeError("the test never opened the gate")
            if np.any(batch < 0):
                raise ValueError("negative input")
            return batch * 2.0
        finally:
            with self._lock:
                self.concurrent -= 1

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.acquire, True, 10)

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def settings(*, wait_when_idle: bool = False, **overrides: float) -> BatchSettings:
    values = {"max_batch_size": 8, "max_queue_delay_ms": 20.0, "max_queue_size": 64, "instances": 1}
    values.update(overrides)
    return BatchSettings(
        max_batch_size=int(values["max_batch_size"]),
        max_queue_delay_ms=float(values["max_queue_delay_ms"]),
        max_queue_size=int(values["max_queue_size"]),
        instances=int(values["instances"]),
        wait_when_idle=wait_when_idle,
    )


def rows(*values: float) -> list[np.ndarray]:
    return [np.array([value], dtype=np.float32) for value in values]


async def results(futures: list[asyncio.Future[np.ndarray]]) -> list[float]:
    return [float(row[0]) for row in await asyncio.gather(*futures)]


async def test_rows_of_one_submit_run_as_one_batch_and_come_back_in_order() -> None:
    model = GatedModel(open_gate=True)
    batcher = Batcher(model, settings(), name="t")
    assert await results(batcher.submit(rows(1, 2, 3, 4, 5))) == [2, 4, 6, 8, 10]
    assert model.sizes == [5]
    assert (batcher.stats.runs, batcher.stats.rows_run, batcher.stats.largest_batch) == (1, 5, 5)
    await batcher.close()


async def test_a_batch_never_exceeds_max_batch_size() -> None:
    model = GatedModel(open_gate=True)
    batcher = Batcher(model, settings(max_batch_size=4), name="t")
    answers = await results(batcher.submit(rows(*range(10))))
    assert answers == [2.0 * v for v in range(10)]
    assert model.sizes == [4, 4, 2]
    await batcher.close()


async def test_a_lone_row_on_an_idle_model_starts_at_once_whatever_the_delay() -> None:
    model = GatedModel(open_gate=True)
    # An hour of delay: the row answers only if an idle model does not wait for company.
    batcher = Batcher(model, settings(max_queue_delay_ms=3_600_000.0), name="t")
    assert await asyncio.wait_for(results(batcher.submit(rows(3))), timeout=10) == [6]
    assert model.sizes == [1]
    await batcher.close()


async def test_rows_arriving_while_the_model_is_busy_form_the_next_batch_at_once() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_queue_delay_ms=3_600_000.0), name="t")
    first = batcher.submit(rows(1))
    await model.wait_started()
    later = [batcher.submit(rows(v)) for v in (2, 3, 4, 5, 6, 7)]
    await asyncio.sleep(0.05)
    assert model.sizes == [1]  # they wait for the busy instance...
    model.gate.set()
    # ...and run together as soon as it frees, not an hour later.
    answers = results(first + [f for group in later for f in group])
    assert await asyncio.wait_for(answers, timeout=10) == [2, 4, 6, 8, 10, 12, 14]
    assert model.sizes == [1, 6]
    await batcher.close()


async def test_the_next_batch_starts_when_one_ends_even_while_the_loop_is_busy() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_queue_delay_ms=3_600_000.0), name="t")
    first = batcher.submit(rows(1))
    await model.wait_started()
    queued = batcher.submit(rows(2, 3))
    model.gate.set()
    # Blocks the event loop: the queued rows start only if the model thread that ran
    # the first batch takes them itself instead of waiting for the loop to hand them over.
    assert model.started.acquire(timeout=5)
    assert model.batches == [[1.0], [2.0, 3.0]]
    assert await results(first + queued) == [2, 4, 6]
    await batcher.close()


async def test_a_free_instance_waits_for_the_delay_while_another_one_is_busy() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_queue_delay_ms=300.0, instances=2), name="t")
    first = batcher.submit(rows(1))
    await model.wait_started()
    second = batcher.submit(rows(2))
    await asyncio.sleep(0.05)
    third = batcher.submit(rows(3))
    await model.wait_started()
    assert model.batches == [[1.0], [2.0, 3.0]]
    model.gate.set()
    assert await results(first + second + third) == [2, 4, 6]
    await batcher.close()


async def test_wait_when_idle_makes_an_idle_model_wait_for_the_delay() -> None:
    model = GatedModel(open_gate=True)
    batcher = Batcher(model, settings(max_queue_delay_ms=300.0, wait_when_idle=True), name="t")
    first = batcher.submit(rows(1))
    await asyncio.sleep(0.05)
    second = batcher.submit(rows(2))
    assert await results(first + second) == [2, 4]
    assert model.sizes == [2]
    await batcher.close()


async def test_instances_run_batches_concurrently() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_batch_size=1, instances=2), name="t")
    futures = batcher.submit(rows(1, 2, 3))
    await model.wait_started()
    await model.wait_started()
    model.gate.set()
    assert await results(futures) == [2, 4, 6]
    assert model.most_concurrent == 2
    await batcher.close()


class LanedModel:
    """A model with an all-core run and two single-thread lanes, each gated."""

    def __init__(self) -> None:
        self.all_cores = GatedModel()
        self.lanes = [GatedModel(), GatedModel()]

    def batcher(self, max_batch_size: int = 8, max_queue_delay_ms: float = 3_600_000.0) -> Batcher:
        batching = settings(max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms)
        return Batcher(self.all_cores, batching, name="t", lanes=self.lanes)

    def open(self) -> None:
        for model in (self.all_cores, *self.lanes):
            model.gate.set()

    def lane_sizes(self) -> list[int]:
        return sorted(size for lane in self.lanes for size in lane.sizes)


async def test_with_lanes_a_lone_row_on_an_idle_model_runs_on_all_cores() -> None:
    model = LanedModel()
    model.open()
    batcher = model.batcher()
    assert await asyncio.wait_for(results(batcher.submit(rows(3))), timeout=10) == [6]
    assert (model.all_cores.sizes, model.lane_sizes()) == ([1], [])
    assert (batcher.stats.runs, batcher.stats.lane_runs) == (1, 0)
    await batcher.close()


async def test_with_lanes_waiting_rows_are_shared_out_and_run_side_by_side() -> None:
    model = LanedModel()
    batcher = model.batcher()
    # Seven rows on an idle model: not a lone row, so the lanes split them at once (with
    # an hour of delay: the second lane must not wait for company either).
    futures = batcher.submit(rows(*range(1, 8)))
    for lane in model.lanes:
        await lane.wait_started()
    assert model.lane_sizes() == [3, 4]
    assert model.all_cores.sizes == []
    model.open()
    assert await asyncio.wait_for(results(futures), timeout=10) == [2.0 * v for v in range(1, 8)]
    assert (batcher.stats.runs, batcher.stats.lane_runs) == (2, 2)
    await batcher.close()


async def test_with_lanes_a_lane_batch_holds_its_share_of_the_largest_batch() -> None:
    model = LanedModel()
    model.open()
    batcher = model.batcher(max_batch_size=8)
    # Two lanes: a lane batch takes at most 4 rows, which take as long as 8 on all cores.
    answers = await asyncio.wait_for(results(batcher.submit(rows(*range(20)))), timeout=10)
    assert answers == [2.0 * v for v in range(20)]
    assert max(model.lane_sizes()) == 4
    assert sum(model.lane_sizes()) == 20
    await batcher.close()


async def test_with_lanes_nothing_runs_beside_the_all_core_run() -> None:
    model = LanedModel()
    batcher = model.batcher()
    first = batcher.submit(rows(1))
    await model.all_cores.wait_started()
    later = batcher.submit(rows(2, 3, 4, 5, 6))
    await asyncio.sleep(0.1)
    # Both lanes are free, but a lane beside the all-core run would take one of its cores.
    assert model.lane_sizes() == []
    model.all_cores.gate.set()
    for lane in model.lanes:
        await lane.wait_started()
    assert model.lane_sizes() == [2, 3]
    model.open()
    assert await asyncio.wait_for(results(first + later), timeout=10) == [2, 4, 6, 8, 10, 12]
    assert model.all_cores.sizes == [1]
    await batcher.close()


async def test_with_lanes_a_free_lane_takes_new_rows_while_the_other_still_runs() -> None:
    model = LanedModel()
    batcher = model.batcher(max_queue_delay_ms=0.0)
    first = batcher.submit(rows(1, 2))
    for lane in model.lanes:
        await lane.wait_started()
    done, busy = model.lanes
    done.gate.set()
    finished = [f for f in first if not f.done()]
    await asyncio.wait(finished, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    # The gated lane still holds its row; a new row must not wait for it.
    assert await asyncio.wait_for(results(batcher.submit(rows(3))), timeout=10) == [6]
    assert busy.concurrent == 1
    assert sorted(v for batch in done.batches for v in batch)[-1] == 3.0
    model.open()
    assert await asyncio.wait_for(results(first), timeout=10) == [2, 4]
    assert model.all_cores.sizes == []
    await batcher.close()


async def test_with_lanes_a_lane_that_frees_takes_only_its_share_of_the_queue() -> None:
    model = LanedModel()
    batcher = model.batcher()
    first = batcher.submit(rows(1, 2))
    for lane in model.lanes:
        await lane.wait_started()
    waiting = batcher.submit(rows(3, 4, 5, 6, 7, 8))
    done = model.lanes[0]
    done.gate.set()
    # Half the six waiting rows at a time: the rows being run stay about what one full
    # batch on all threads holds, so under overload a row waits no longer than without
    # lanes (and the lane takes the next share when that one is done).
    await asyncio.wait_for(asyncio.gather(*waiting[:3]), timeout=10)
    assert done.batches[1] == [3.0, 4.0, 5.0]
    model.open()
    assert await asyncio.wait_for(results(first + waiting), timeout=10) == [
        2.0 * v for v in range(1, 9)
    ]
    await batcher.close()


async def test_lanes_and_instances_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="lanes replace instances"):
        Batcher(GatedModel(), settings(instances=2), name="t", lanes=[GatedModel()])


async def test_a_full_queue_refuses_at_once_with_overloaded() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_queue_size=3, max_batch_size=1), name="t")
    running = batcher.submit(rows(1))
    await model.wait_started()
    queued = batcher.submit(rows(2, 3))
    with pytest.raises(Overloaded) as refused:
        batcher.submit(rows(4, 5))
    assert refused.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert batcher.queued == 2  # all-or-nothing: neither row of the refused submit queued
    queued += batcher.submit(rows(6))
    model.gate.set()
    assert await results(running + queued) == [2, 4, 6, 12]
    await batcher.close()


def refusal_hints(batcher: Batcher, count: int) -> list[float]:
    """The retry hints of ``count`` one-row requests refused one after another."""
    hints = []
    for _ in range(count):
        with pytest.raises(Overloaded) as refused:
            batcher.reserve(1)
        assert refused.value.retry_after_seconds is not None
        hints.append(refused.value.retry_after_seconds)
    return hints


async def test_refused_callers_are_given_turns_one_model_run_apart() -> None:
    # 50 ms a row, 4 rows queued: the first refused caller comes back once they have run
    # and its own row has, each later one a row's time after the one before.
    batcher = Batcher(
        GatedModel(open_gate=True),
        settings(max_queue_size=4),
        name="t",
        expected_row_seconds=0.05,
    )
    batcher.reserve(4)
    hints = refusal_hints(batcher, 30)
    assert hints[0] == pytest.approx(0.25, rel=0.15)
    assert hints[9] == pytest.approx(0.70, rel=0.15)
    # The line never promises more than MAX_RETRY_AFTER, and does not run away past it.
    assert max(hints) <= MAX_RETRY_AFTER
    assert hints[-1] == pytest.approx(1.70, rel=0.15)
    await batcher.close()


async def test_a_long_line_of_refusals_is_capped_and_does_not_run_away() -> None:
    batcher = Batcher(
        GatedModel(open_gate=True), settings(max_queue_size=1), name="t", expected_row_seconds=1
    )
    batcher.reserve(1)
    hints = refusal_hints(batcher, 20)
    assert hints[0] == pytest.approx(2.0, rel=0.15)
    assert all(hint <= MAX_RETRY_AFTER for hint in hints)
    assert hints[-1] >= 0.9 * MAX_RETRY_AFTER
    await batcher.close()


async def test_more_rows_than_the_queue_holds_are_refused() -> None:
    batcher = Batcher(GatedModel(open_gate=True), settings(max_queue_size=2), name="t")
    with pytest.raises(Overloaded, match="more than its queue holds"):
        batcher.submit(rows(1, 2, 3))
    await batcher.close()


async def test_rows_past_their_deadline_are_dropped_before_compute() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_batch_size=1), name="t")
    running = batcher.submit(rows(1))
    await model.wait_started()
    expiring = batcher.submit(rows(2), deadline=time.monotonic() + 0.05)
    kept = batcher.submit(rows(3), deadline=None)
    await asyncio.sleep(0.1)
    model.gate.set()
    with pytest.raises(DeadlineExceeded):
        await expiring[0]
    assert await results(running + kept) == [2, 6]
    assert model.batches == [[1.0], [3.0]]
    assert batcher.stats.dropped_expired == 1
    await batcher.close()


async def test_cancelled_rows_are_dropped_before_compute() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_batch_size=4), name="t")
    running = batcher.submit(rows(1))
    await model.wait_started()
    abandoned = batcher.submit(rows(2, 3))
    kept = batcher.submit(rows(4))
    for future in abandoned:
        future.cancel()
    model.gate.set()
    assert await results(running + kept) == [2, 8]
    assert model.batches == [[1.0], [4.0]]
    assert batcher.stats.dropped_cancelled == 2
    await batcher.close()


async def test_a_failing_run_fails_only_its_own_batch() -> None:
    model = GatedModel(open_gate=True)
    batcher = Batcher(model, settings(max_queue_delay_ms=0.0), name="t")
    with pytest.raises(VisionRPCError, match="negative input") as failed:
        await asyncio.gather(*batcher.submit(rows(-1, 5)))
    assert failed.value.kind is ErrorKind.INTERNAL
    assert await results(batcher.submit(rows(7))) == [14]
    await batcher.close()


async def test_close_fails_queued_rows_and_lets_running_ones_finish() -> None:
    model = GatedModel()
    batcher = Batcher(model, settings(max_batch_size=1), name="t")
    running = batcher.submit(rows(1))
    await model.wait_started()
    queued = batcher.submit(rows(2, 3))
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.02)
    for future in queued:
        with pytest.raises(Unavailable):
            await future
    assert not closing.done()  # still waiting for the running batch
    model.gate.set()
    assert await results(running) == [2]
    await closing
    with pytest.raises(Unavailable):
        batcher.submit(rows(4))
    assert model.batches == [[1.0]]
