"""Dynamic batching of model inputs, free of gRPC and of images.

A ``Batcher`` serves one model version. Callers ``submit`` rows (one uint8 array per
model input, e.g. one per image view) and await one future per row. A loop forms a
batch from the oldest rows, and only when an instance is free to run it. When no batch
is running the rows waiting start at once (a lone request on an idle model never waits
for company); rows that arrive while the model is busy wait for an instance, so batches
grow with the load, not with a timer. With several ``instances`` and one of them busy,
a batch closes when it holds ``max_batch_size`` rows or ``max_queue_delay_ms`` after its
first row arrived (one fixed deadline per batch); ``wait_when_idle`` applies that rule
to an idle model too. Up to ``instances`` batches run at once in a thread pool
(onnxruntime releases the GIL), and a model thread that finishes a batch takes the next
one due itself, so the model never idles while the loop hands out answers.

On a CPU a model may also come with ``lanes``: single-thread runs, one per core, beside
its run on all cores. A lone row on an idle model runs on all cores (the lowest latency);
otherwise each lane runs a batch of its own, the waiting rows shared out among the free
lanes, and the all-core run never overlaps a lane. Single-thread runs side by side waste
nothing when a thread loses its core to decoding or to the event loop, where the threads
of one parallel run wait for the slowest at every layer. Rows whose
caller gave up (cancelled future) or whose deadline passed are dropped before they cost
compute. What happens is reported to a ``BatchObserver`` (the server's Prometheus
metrics), which this module knows only by its methods.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .cpus import MODEL_THREAD, lower_this_thread
from .errors import DeadlineExceeded, Overloaded, Unavailable, VisionRPCError

logger = logging.getLogger(__name__)

# Bounds of the retry hint sent with a refusal: soon enough to use freed slots, and
# never so late that a caller gives up on a server that had room again.
MIN_RETRY_AFTER = 0.01
MAX_RETRY_AFTER = 5.0

# Runs the model on a stacked batch [N, ...] and returns one output row per input row.
ModelRun = Callable[[np.ndarray], np.ndarray]


class BatchObserver(Protocol):
    """What a batcher reports; ``metrics.BatcherMetrics`` turns it into Prometheus series."""

    def queue_capacity_set(self, capacity: int) -> None: ...
    def queue_depth_changed(self, depth: int) -> None: ...
    def queue_rejected(self) -> None: ...
    def rows_dropped(self, count: int) -> None: ...
    def queue_waited(self, seconds: float) -> None: ...
    def batch_ran(self, size: int, seconds: float) -> None: ...


class Unobserved:
    """The observer of a batcher nobody watches (tests, tools)."""

    def queue_capacity_set(self, capacity: int) -> None:
        pass

    def queue_depth_changed(self, depth: int) -> None:
        pass

    def queue_rejected(self) -> None:
        pass

    def rows_dropped(self, count: int) -> None:
        pass

    def queue_waited(self, seconds: float) -> None:
        pass

    def batch_ran(self, size: int, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int
    # An idle instance waits max_queue_delay_ms for more rows too, as Triton's batcher
    # does: worth it where a batch of 16 costs about what a batch of 1 does (a GPU),
    # not on a CPU, where each row costs its own compute and waiting only adds latency.
    wait_when_idle: bool = False


@dataclass
class BatcherStats:
    """Counters since start; tests read them to see that batches formed."""

    runs: int = 0
    rows_run: int = 0
    largest_batch: int = 0
    # Of ``runs``, those on a single-thread lane.
    lane_runs: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0


@dataclass(frozen=True)
class _Run:
    """What a taken batch runs on: the instance slots it holds, and the model run."""

    slots: tuple[int, ...]
    run: ModelRun
    # Model time per row counts once per slot that could run beside it.
    parallel: int


@dataclass(eq=False)
class _Item:
    row: np.ndarray
    future: asyncio.Future[np.ndarray]
    # time.monotonic() after which nobody waits for the answer; None waits forever.
    deadline: float | None
    enqueued_at: float


def merge_rows(items: Sequence[_Item]) -> np.ndarray:
    return np.stack([item.row for item in items])


def split_outputs(outputs: np.ndarray, items: Sequence[_Item]) -> None:
    """Hand each item its own output row; a caller that gave up meanwhile is skipped."""
    if outputs.ndim < 1 or outputs.shape[0] != len(items):
        raise ValueError(f"the model returned shape {outputs.shape} for {len(items)} rows")
    for item, row in zip(items, outputs, strict=True):
        if not item.future.done():
            item.future.set_result(row)


def fail_items(items: Sequence[_Item], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


class Batcher:
    def __init__(
        self,
        run: ModelRun,
        settings: BatchSettings,
        *,
        name: str,
        observer: BatchObserver | None = None,
        expected_row_seconds: float = 0.0,
        thread_niceness: int = 0,
        lanes: Sequence[ModelRun] = (),
    ) -> None:
        """``expected_row_seconds`` (``run``'s time per row, e.g. the warm-up's) seeds the
        retry hints until batches have run; the model runs in threads lowered by
        ``thread_niceness``. ``lanes`` (with one instance) are single-thread runs of the
        same model that run batches side by side, ``run`` taking all cores."""
        if lanes and settings.instances != 1:
            raise ValueError("lanes replace instances: give one or the other")
        self.name = name
        self.settings = settings
        self.stats = BatcherStats()
        self._observer = Unobserved() if observer is None else observer
        self._observer.queue_capacity_set(settings.max_queue_size)
        self._observer.queue_depth_changed(0)
        self._delay_seconds = settings.max_queue_delay_ms / 1000.0
        self._pending: collections.deque[_Item] = collections.deque()
        # Guards _pending and _closed: the loop queues rows, a model thread that has just
        # finished a batch takes the next one.
        self._lock = threading.Lock()
        # Set on every change the loop may wait for: a new row, a finished run, close.
        self._wakeup = asyncio.Event()
        self._run = run
        self._lanes = tuple(lanes)
        # Instance slots: one per lane, else one per instance; guarded by _lock. A batch on
        # ``run`` with lanes holds every slot.
        self._slots = len(self._lanes) or settings.instances
        # A lane's batch holds its share of max_batch_size: a lane runs a row about
        # ``lanes`` times slower than all cores do, so its full batch then takes as long as
        # a full batch on all cores, and a row waits no longer for a lane to come free.
        self._full_batch = settings.max_batch_size
        if self._lanes:
            self._full_batch = -(-settings.max_batch_size // self._slots)
        self._free_slots = list(range(self._slots))
        # time.monotonic() of the last batch taken.
        self._last_take = -float("inf")
        self._running: set[asyncio.Future[None]] = set()
        self._executor = ThreadPoolExecutor(
            max_workers=self._slots,
            thread_name_prefix=f"model-{name}",
            initializer=lower_this_thread,
            initargs=(thread_niceness, MODEL_THREAD),
        )
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        # Slots held by requests whose rows are still being decoded.
        self._reserved = 0
        # For retry hints: a moving average of the model's time per row with every slot
        # busy, and the time the last refused caller was told to come back.
        self._recent_row_seconds = expected_row_seconds / (1 if self._lanes else self._slots)
        self._next_turn = 0.0

    @property
    def queued(self) -> int:
        return len(self._pending)

    def reserve(self, count: int, held: Reservation | None = None) -> Reservation:
        """Hold ``count`` queue slots for one request's rows, before any of them exists.

        The pipeline reserves when a request arrives, so a request that cannot fit is
        refused before its images cost a decode. ``held``: slots given to the request
        before its message was read (``admission.py``); those in this queue count toward
        ``count`` and move to the reservation returned. Raises Overloaded (with a retry
        hint) when the slots are not free and Unavailable after close.
        """
        if held is not None and held._batcher is not self:
            held.release()
        kept = 0 if held is None else min(count, held._count)
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        limit = self.settings.max_queue_size
        if count > limit:
            self._observer.queue_rejected()
            raise Overloaded(
                f"model {self.name}: {count} inputs in one request, "
                f"more than its queue holds ({limit}); send fewer images per request"
            )
        if not self._room_for(count - kept):
            self._observer.queue_rejected()
            raise Overloaded(
                f"model {self.name} is overloaded: {self._taken()} of {limit} "
                "queue slots taken; retry later",
                retry_after_seconds=self._retry_hint(count),
            )
        if held is not None:
            held._count -= kept
            held.release()
        self._reserved += count - kept
        return Reservation(self, count)

    def full(self) -> bool:
        """Whether not even a one-row request would fit now."""
        return not self._room_for(1)

    def _room_for(self, count: int) -> bool:
        if self._taken() + count > self.settings.max_queue_size:
            # Rows whose callers gave up must not hold slots; purging costs a scan, so
            # it happens only when the queue looks full.
            self._purge()
        return self._taken() + count <= self.settings.max_queue_size

    @property
    def next_turn(self) -> float:
        """The time the last refused caller was told to come back (time.monotonic())."""
        return self._next_turn

    def refuse_unread(self) -> float:
        """Counts the refusal of a request not read yet (so one row at least) and gives
        it a turn: the retry hint, in seconds."""
        self._observer.queue_rejected()
        return self._retry_hint(1)

    def submit(
        self, rows: Sequence[np.ndarray], deadline: float | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        """Queue all rows of one request, or none of them; one future per row.

        Raises Overloaded when they do not fit in the queue and Unavailable after close.
        """
        return self.reserve(len(rows)).submit(rows, deadline)

    def _release(self, count: int) -> None:
        self._reserved -= count
        self._queue_changed()

    def _enqueue(
        self, rows: Sequence[np.ndarray], deadline: float | None
    ) -> list[asyncio.Future[np.ndarray]]:
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [
            _Item(row=row, future=loop.create_future(), deadline=deadline, enqueued_at=now)
            for row in rows
        ]
        with self._lock:
            self._pending.extend(items)
        futures = [item.future for item in items]
        self._queue_changed()
        if self._loop_task is None:
            self._loop_task = loop.create_task(self._batch_loop(), name=f"batcher-{self.name}")
        self._wakeup.set()
        return futures

    def _taken(self) -> int:
        return len(self._pending) + self._reserved

    def _retry_hint(self, count: int) -> float:
        """The refusal's retry hint: this caller's turn in a line of refused callers.

        Each refused request is given the next turn, behind the rows already queued and
        the turns already handed out, as far after the previous turn as the model takes
        to run its ``count`` rows. Callers that obey come back about as fast as the
        queue frees room, so each freed slot draws about one retry instead of a crowd
        (each refusal still costs the server a received message and a reply).
        """
        row_seconds = self._recent_row_seconds
        now = time.monotonic()
        behind_queue = now + self._taken() * row_seconds
        turn = max(self._next_turn, behind_queue) + count * row_seconds
        # Callers capped at MAX_RETRY_AFTER come back early; the line must not run away.
        self._next_turn = min(turn, now + MAX_RETRY_AFTER)
        hint = (turn - now) * random.uniform(0.9, 1.1)
        return min(max(hint, MIN_RETRY_AFTER), MAX_RETRY_AFTER)

    async def close(self) -> None:
        """Fail whatever still waits with Unavailable, let running batches finish, stop."""
        with self._lock:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
        fail_items(waiting, Unavailable(f"model {self.name} is shutting down"))
        self._queue_changed()
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)
        # A call may still hold a reference to this queue for a moment (a slot given when
        # its headers arrived, freed when its task ends): the model's sessions must not
        # live on in it after an unload.
        self._run = _refuse_run
        self._lanes = ()

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (taken := await self._next_batch()) is not None:
            self._start(loop, [taken, *taken.others])

    def _start(self, loop: asyncio.AbstractEventLoop, parts: Sequence[_Taken]) -> None:
        """On the loop: a model thread for each batch taken."""
        for part in parts:
            # Submitted here, not from a task of its own: a task's first step would wait
            # behind every callback already queued on the loop.
            run = loop.run_in_executor(self._executor, self._run_batches, loop, part)
            self._running.add(run)
            run.add_done_callback(self._instance_freed)

    def _instance_freed(self, run: asyncio.Future[None]) -> None:
        self._running.discard(run)
        self._wakeup.set()
        if not run.cancelled() and (error := run.exception()) is not None:
            logger.error("model %s: its batch runner failed", self.name, exc_info=error)

    async def _next_batch(self) -> _Taken | None:
        """Wait until a batch may close and an instance is free; None once closed."""
        while True:
            self._wakeup.clear()
            taken = self._take_due()
            self._dropped(taken.expired, taken.cancelled)
            if taken.batch:
                return taken
            if taken.close_at is None and self._closed:
                return None
            timeout: float | None = None
            if taken.close_at is not None and self._free_slots:
                timeout = max(taken.close_at - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _take_due(self, freed: tuple[int, ...] = ()) -> _Taken:
        """The batching rule, for the loop and for a model thread that just finished.

        Gives back the ``freed`` slots of the batch that thread ran, drops dead rows at the
        head, then takes a batch if a slot is free and one may close now: at once on an
        idle model (unless it waits when idle), when a full batch waits, or once the
        oldest row has waited the delay. With lanes, a lone row on an idle model takes
        every slot and runs on all cores; otherwise each free lane takes a lane's share of
        the waiting rows (so an idle model's lanes split them). Runs in either thread, so
        it only reads futures; the loop fails the expired rows it returns.
        """
        taken = _Taken([], [], 0, None)
        with self._lock:
            self._free_slots.extend(freed)
            if self._closed:
                return taken
            now = time.monotonic()
            pending = self._pending
            while pending and not taken.keep_if_live(pending[0], now):
                pending.popleft()
            if not pending:
                return taken
            free = len(self._free_slots)
            idle = free == self._slots
            # Fixed per batch: the oldest row's arrival plus the delay, never shrunk per wait.
            close_at = pending[0].enqueued_at + self._delay_seconds
            # An idle model gains nothing by waiting: the rows that come meanwhile would
            # find it busy with this batch anyway and form the next one.
            due = (
                (idle and not self.settings.wait_when_idle)
                or len(pending) >= self._full_batch
                or now >= close_at
                # Rows a lane left when it took its share go to the next free lane at once.
                or (bool(self._lanes) and pending[0].enqueued_at <= self._last_take)
            )
            if free and due:
                if self._lanes and idle and len(pending) == 1:
                    if self._fill(taken, now, _Run(tuple(self._free_slots), self._run, 1), 1):
                        self._free_slots.clear()
                elif self._lanes:
                    # Each free lane takes a lane's share of what waits, so the rows being
                    # run stay about max_batch_size, as on all threads, and a row waits
                    # no longer than there.
                    share = min(self._full_batch, -(-len(pending) // self._slots))
                    for slot in list(self._free_slots):
                        part = taken if taken.run is None else _Taken([], taken.expired, 0, None)
                        if self._fill(
                            part, now, _Run((slot,), self._lanes[slot], self._slots), share
                        ):
                            self._free_slots.remove(slot)
                            if part is not taken:
                                taken.others.append(part)
                        if part is not taken:
                            taken.cancelled += part.cancelled
                        if not pending:
                            break
                else:
                    run = _Run((self._free_slots[-1],), self._run, self._slots)
                    if self._fill(taken, now, run, self.settings.max_batch_size):
                        self._free_slots.pop()
                if taken.run is not None:
                    self._last_take = now
            if pending:
                taken.close_at = pending[0].enqueued_at + self._delay_seconds
        return taken

    def _fill(self, taken: _Taken, now: float, run: _Run, size: int) -> bool:
        """Under the lock: up to ``size`` live rows from the queue's head into ``taken``,
        to run on ``run``; False (nothing taken) when only dead rows were left."""
        while self._pending and len(taken.batch) < size:
            if taken.keep_if_live(item := self._pending.popleft(), now):
                taken.batch.append(item)
        if taken.batch:
            taken.run = run
        return bool(taken.batch)

    def _dropped(self, expired: Sequence[_Item], cancelled: int) -> None:
        """On the loop: tell expired rows' callers why, count what was dropped."""
        for item in expired:
            if not item.future.done():
                item.future.set_exception(
                    DeadlineExceeded(f"model {self.name}: the deadline passed in the queue")
                )
        if expired or cancelled:
            self.stats.dropped_expired += len(expired)
            self.stats.dropped_cancelled += cancelled
            self._observer.rows_dropped(len(expired) + cancelled)
        self._queue_changed()

    def _purge(self) -> None:
        """On the loop: drop every row nobody waits for any more, wherever it is queued."""
        now = time.monotonic()
        dead = _Taken([], [], 0, None)
        with self._lock:
            self._pending = collections.deque(
                item for item in self._pending if dead.keep_if_live(item, now)
            )
        self._dropped(dead.expired, dead.cancelled)

    def _queue_changed(self) -> None:
        self._observer.queue_depth_changed(self._taken())

    def _run_batches(self, loop: asyncio.AbstractEventLoop, taken: _Taken) -> None:
        """In a model thread: run a batch, then go straight on to the next one due.

        Taking the next batch here, the moment this one ends, keeps the model busy while
        the loop hands out the answers; left to the loop, the next batch would wait for
        every handler those answers resume.
        """
        batch, held = taken.batch, taken.run
        while batch and held is not None:
            started = time.monotonic()
            # Callers may have given up while the batch waited for its instance.
            live = [item for item in batch if not item.future.done()]
            outputs: np.ndarray | None = None
            error: Exception | None = None
            seconds = 0.0
            if live:
                try:
                    # Inside the try: rows that cannot stack must fail their callers.
                    inputs = merge_rows(live)
                    clock = time.perf_counter()
                    outputs = held.run(inputs)
                    seconds = time.perf_counter() - clock
                except Exception as exc:
                    error = exc
            if not _call_on(
                loop, self._batch_done, batch, live, started, held, outputs, seconds, error
            ):
                return
            taken = self._take_due(held.slots)
            # Also when only rows were taken: the loop refreshes the queue-depth gauge, and
            # starts batches on other slots that are free while rows still wait.
            if (taken.batch or taken.expired or taken.cancelled) and not _call_on(
                loop, self._thread_took, loop, taken
            ):
                return
            batch, held = taken.batch, taken.run

    def _thread_took(self, loop: asyncio.AbstractEventLoop, taken: _Taken) -> None:
        """On the loop, after a model thread took a batch: report drops, start the other
        lanes' batches of the same share-out, look again."""
        self._dropped(taken.expired, taken.cancelled)
        self._start(loop, taken.others)
        self._wakeup.set()

    def _batch_done(
        self,
        batch: list[_Item],
        live: list[_Item],
        started: float,
        held: _Run,
        outputs: np.ndarray | None,
        seconds: float,
        error: Exception | None,
    ) -> None:
        """On the loop: report one batch and hand its callers their rows."""
        self._dropped([], len(batch) - len(live))
        if not live:
            return
        for item in live:
            self._observer.queue_waited(started - item.enqueued_at)
        try:
            if error is not None:
                raise error
            assert outputs is not None
            self._observer.batch_ran(len(live), seconds)
            row_seconds = seconds / len(live) / held.parallel
            self._recent_row_seconds += 0.2 * (row_seconds - self._recent_row_seconds)
            self.stats.runs += 1
            self.stats.lane_runs += held.run is not self._run
            self.stats.rows_run += len(live)
            self.stats.largest_batch = max(self.stats.largest_batch, len(live))
            split_outputs(outputs, live)
        except Exception as exc:
            logger.exception("model %s: a batch of %d rows failed", self.name, len(live))
            fail_items(live, VisionRPCError(f"model {self.name} failed: {exc}"))


def _refuse_run(rows: np.ndarray) -> np.ndarray:
    raise Unavailable("the model has been unloaded")


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> bool:
    """Schedule ``callback`` on ``loop`` from a thread; False once the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


@dataclass
class _Taken:
    batch: list[_Item]
    expired: list[_Item]
    cancelled: int
    # When the rows still waiting may close a batch; None when none wait.
    close_at: float | None
    # The slots and run the batch holds; None when nothing was taken.
    run: _Run | None = None
    # Batches other free lanes took in the same share-out; their expired rows and
    # cancelled count are in this one's.
    others: list[_Taken] = field(default_factory=list)

    def keep_if_live(self, item: _Item, now: float) -> bool:
        """True for a row someone still waits for; a dead one is counted by why."""
        if item.future.done():
            self.cancelled += 1
            return False
        if item.deadline is not None and item.deadline <= now:
            self.expired.append(item)
            return False
        return True


class Reservation:
    """Queue slots one request holds while its images decode; used or released once.

    ``submit`` queues the rows (fewer than reserved when some images failed) and frees
    the slots they no longer need; ``release`` frees them all. Both are idempotent
    after the first, so a ``finally: release()`` is always safe.
    """

    def __init__(self, batcher: Batcher, count: int) -> None:
        self._batcher = batcher
        self._count = count

    def submit(
        self, rows: Sequence[np.ndarray], deadline: float | None = None
    ) -> list[asyncio.Future[np.ndarray]]:
        if len(rows) > self._count:
            raise ValueError(f"{len(rows)} rows for a reservation of {self._count}")
        self.release()
        return self._batcher._enqueue(rows, deadline)

    def release(self) -> None:
        if self._count:
            self._batcher._release(self._count)
            self._count = 0
