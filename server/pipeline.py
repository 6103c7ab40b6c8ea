"""One prediction request, transport-free: admit, decode, prepare, batch, postprocess.

Admission comes first and costs no decoding: a request may carry at most its model's
``max_images_per_request`` images (more is the caller's mistake, InvalidInput), and its
rows (images times views) are reserved in the model's queue at once, or the request is
refused as Overloaded with a retry hint. The decode stage has a bounded backlog too:
the encoded bytes of the images waiting for or in a decode thread, across all requests,
are at most ``decode_backlog_bytes``, so a burst of large images on models with long
queues cannot hold unbounded memory while it waits to be decoded.
Each admitted image is decoded and resized in a thread pool, off the event loop; small
images (at most ``SMALL_IMAGE_BYTES`` encoded and ``SMALL_IMAGE_PIXELS``) have a thread of
their own, so a thumbnail never waits behind a phone photo being decoded. Every
view of every good image becomes one row in the model's batcher, in the slots reserved
for it. A bad
image gets its own error naming its index and never fails its neighbours; problems of
the whole request (unknown model, bad option, no images, overload, deadline) raise.
Decoding time and what each prediction looks like go to a ``PipelineObserver`` (the
server's Prometheus metrics), known here only by its methods.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .batching import MAX_RETRY_AFTER, MIN_RETRY_AFTER, Batcher, Reservation
from .errors import DeadlineExceeded, InvalidInput, Overloaded, VisionRPCError
from .model_config import InputSpec
from .postprocess import ImageResult, PredictionOptions, finish, resolve_options
from .preprocess import (
    Geometry,
    ImageLimits,
    View,
    decode_for_model,
    header_pixels,
    image_from_pixels,
    prepare_views,
    rows_from_input_size_pixels,
)
from .repository import LoadedModel, ModelRepository
from .tasks import PredictionObserver, serving_task


@dataclass(frozen=True)
class EncodedImage:
    data: bytes


@dataclass(frozen=True)
class RawImage:
    pixels: bytes
    height: int
    width: int
    channels: int


ImageInput = EncodedImage | RawImage


@dataclass(frozen=True)
class PredictCall:
    model: str
    images: Sequence[ImageInput]
    # None or "" is the newest loaded version.
    version: str | None = None
    options: PredictionOptions = field(default_factory=PredictionOptions)


@dataclass(frozen=True)
class PredictOutcome:
    model: LoadedModel
    # One per input image, in input order: its result or its own error.
    results: list[ImageResult | VisionRPCError]


# One image's model inputs (one row per view) and the geometry of each view.
_PreparedImage = list[tuple[np.ndarray, Geometry]]


class PipelineObserver(PredictionObserver, Protocol):
    """What the pipeline reports; ``metrics.ServerMetrics`` implements it."""

    def preprocess_observed(self, model: str, seconds: float) -> None: ...
    def tta_used(self, model: str, version: str, images: int) -> None: ...


INITIAL_DECODE_SECONDS = 0.05


def max_images_per_request(model: LoadedModel, server_limit: int) -> int:
    """The most images one request to ``model`` may carry: the server's limit, lowered
    so that a request of that many images fits the model's queue with every TTA view."""
    most_views = 1 + len(model.config.tta.views)
    return max(1, min(server_limit, model.batching.max_queue_size // most_views))


class ArrivalSlot:
    """The queue slot ``Pipeline.admit_unread`` gave a call, until the call gives it up.

    Emptied then, because tasks the call started (a batcher's loop among them) keep a copy
    of its context, which must not keep a model's queue, and so the model, alive."""

    def __init__(self, reservation: Reservation) -> None:
        self.reservation: Reservation | None = reservation

    def give_up(self) -> None:
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None


# Set by the admission interceptor in the call's task, before its handler runs.
arrival_slot: ContextVar[ArrivalSlot | None] = ContextVar("arrival_slot", default=None)


def held_at_arrival() -> Reservation | None:
    """What the call being handled was given on arrival, for ``Pipeline.predict(held=)``."""
    slot = arrival_slot.get()
    return None if slot is None else slot.reservation


# The small-image lane's bounds: a 1600x1200 photo decodes in about 6 ms, a 224 JPEG in
# under 1 ms, while one 6000x4000 photo holds a decode thread for tens of milliseconds. The
# pixel bound keeps the lane's working memory small (4 MP x 3 B x 2, about 23 MiB).
SMALL_IMAGE_BYTES = 1 << 20
SMALL_IMAGE_PIXELS = 4_000_000


class Pipeline:
    def __init__(
        self,
        repository: ModelRepository,
        limits: ImageLimits,
        decode_executor: Executor,
        observer: PipelineObserver | None = None,
        *,
        max_images_per_request: int = 64,
        decode_backlog_bytes: int = 128 << 20,
        decode_threads: int = 1,
        small_decode_executor: Executor | None = None,
    ) -> None:
        self.repository = repository
        self.max_images_per_request = max_images_per_request
        self._limits = limits
        self._decode_executor = decode_executor
        # None: small images share the pool.
        self._small_decode_executor = small_decode_executor
        self._observer = observer
        self._decode_backlog_bytes = decode_backlog_bytes
        self._decode_threads = decode_threads
        # Images admitted to the decode stage and not yet decoded, and their bytes.
        self._decoding = 0
        self._decoding_bytes = 0
        # A moving average of one decode's seconds, for retry hints; a guess until the
        # first decode, so that early refusals do not invite retries within milliseconds.
        self._recent_decode_seconds = INITIAL_DECODE_SECONDS

    def admit_unread(self, named: tuple[str, str | None] | None = None) -> Reservation | None:
        """What a prediction call gets when its headers arrive, before its message is read.

        ``named``: the model and version (None: the newest) the client's headers say the
        message names, a hint. When no serving model's queue has a free slot, every
        request (one row at least) would be refused once read, so it is refused now
        (Overloaded): a large image is then never received, and the refusal costs the
        server almost nothing. Of several full models, the one whose line of refused
        callers is shortest gives the turn. Otherwise the call is given a slot now in the
        named model, or in the one model serving, for ``predict(held=)``: a large message
        that found room when it arrived is then not refused once read because smaller
        calls took the room while it was being received. A full named model refuses at
        once. With several models and no usable hint: None.
        """
        batchers = [model.batcher for model in self.repository.loaded()]
        if not batchers:
            return None
        target = self._named_batcher(named)
        if target is None:
            if all(batcher.full() for batcher in batchers):
                shortest_line = min(batchers, key=lambda batcher: batcher.next_turn)
                raise Overloaded(
                    "the server is overloaded: no model has a free queue slot; retry later",
                    retry_after_seconds=shortest_line.refuse_unread(),
                )
            if len(batchers) == 1:
                target = batchers[0]
        return None if target is None else target.reserve(1)

    def _named_batcher(self, named: tuple[str, str | None] | None) -> Batcher | None:
        if named is None:
            return None
        try:
            return self.repository.get(*named).batcher
        except VisionRPCError:  # the message may name a model the hint does not
            return None

    def limit_for(self, model: LoadedModel) -> int:
        return max_images_per_request(model, self.max_images_per_request)

    async def predict(
        self, call: PredictCall, deadline: float | None = None, held: Reservation | None = None
    ) -> PredictOutcome:
        """The one place a request is answered; ``deadline`` is a time.monotonic() or None,
        ``held`` what ``admit_unread`` gave the call (its owner releases it in the end)."""
        # Held for the whole call, so a swap or an unload lets it finish on this version.
        with self.repository.use(call.model, call.version) as model:
            return await self._predict(model, call, deadline, held)

    async def _predict(
        self,
        model: LoadedModel,
        call: PredictCall,
        deadline: float | None,
        held: Reservation | None,
    ) -> PredictOutcome:
        refuse_foreign_options(model.config.task, call.options)
        resolved = resolve_options(model.config, call.options)
        if not call.images:
            raise InvalidInput("the request has no images")
        limit = self.limit_for(model)
        if len(call.images) > limit:
            raise InvalidInput(
                f"the request has {len(call.images)} images, more than model {model.name}'s "
                f"max_images_per_request ({limit}); split them into several requests"
            )
        _check_deadline(deadline)
        reservation = model.batcher.reserve(len(call.images) * len(resolved.views), held)
        try:
            prepared = await self._decode_all(call, model, resolved.views)
            _check_deadline(deadline)
            good = [views for views in prepared if not isinstance(views, VisionRPCError)]
            rows = [row for views in good for row, _ in views]
            outputs = iter(await _run_rows(model, reservation, rows, deadline))
        finally:
            reservation.release()
        results: list[ImageResult | VisionRPCError] = []
        for index, views in enumerate(prepared):
            if isinstance(views, VisionRPCError):
                results.append(views)
                continue
            image_outputs = np.stack([next(outputs) for _ in views])
            if not np.isfinite(image_outputs).all():
                # NaN would pass every threshold test silently; the model is at fault.
                results.append(
                    VisionRPCError(
                        f"image {index}: model {model.name} returned outputs that are "
                        "not finite (NaN or inf)"
                    )
                )
                continue
            geometries = [geometry for _, geometry in views]
            results.append(finish(model.config, resolved, image_outputs, geometries))
        if self._observer is not None:
            observe_results(self._observer, model, results)
        return PredictOutcome(model=model, results=results)

    async def _decode_all(
        self, call: PredictCall, model: LoadedModel, views: tuple[View, ...]
    ) -> list[_PreparedImage | VisionRPCError]:
        """Every image decoded, once the decode stage has room for all of them."""
        count = len(call.images)
        size = sum(_encoded_size(image) for image in call.images)
        # An empty stage takes any request, so one larger than the backlog still runs.
        if self._decoding_bytes and self._decoding_bytes + size > self._decode_backlog_bytes:
            rounds = math.ceil(self._decoding / self._decode_threads)
            hint = rounds * self._recent_decode_seconds * random.uniform(0.5, 1.5)
            raise Overloaded(
                f"the server is overloaded: {self._decoding} images "
                f"({self._decoding_bytes} bytes) wait to be decoded; retry later",
                retry_after_seconds=min(max(hint, MIN_RETRY_AFTER), MAX_RETRY_AFTER),
            )
        self._decoding += count
        self._decoding_bytes += size
        try:
            if count == 1:
                # Awaited in this task: a gathered task would cost a turn of the loop.
                return [await self._prepare(0, call.images[0], model, views)]
            return await asyncio.gather(
                *(
                    self._prepare(index, image, model, views)
                    for index, image in enumerate(call.images)
                )
            )
        finally:
            self._decoding -= count
            self._decoding_bytes -= size

    async def _prepare(
        self, index: int, image: ImageInput, model: LoadedModel, views: tuple[View, ...]
    ) -> _PreparedImage | VisionRPCError:
        spec = model.config.input
        try:
            if _needs_no_resampling(image, spec, views):
                # The pixels are the rows (microseconds): a trip through the decode pool
                # would cost more, and the row would wait behind any photo decoding there.
                prepared, seconds = _timed_decode(image, spec, views, self._limits)
            else:
                loop = asyncio.get_running_loop()
                timed = None
                if self._small_decode_executor and _encoded_size(image) <= SMALL_IMAGE_BYTES:
                    timed = await loop.run_in_executor(
                        self._small_decode_executor, _timed_decode_if_small, image, spec, views,
                        self._limits,
                    )  # fmt: skip
                if timed is None:
                    timed = await loop.run_in_executor(
                        self._decode_executor, _timed_decode, image, spec, views, self._limits
                    )
                prepared, seconds = timed
                # What the pool's backlog costs per image, for the decode stage's hints.
                self._recent_decode_seconds += 0.2 * (seconds - self._recent_decode_seconds)
        except InvalidInput as exc:
            return InvalidInput(f"image {index}: {exc.message}")
        if self._observer is not None:
            self._observer.preprocess_observed(model.name, seconds)
        return prepared


# The options each task reads; tta and tta_views apply to every task. all_scores is
# left out: a plain bool with no "unset", which the Open Inference Protocol path always
# sets because its multilabel answer carries every score.
_TASK_OPTIONS = {
    "classification": frozenset({"top_k", "min_confidence"}),
    "multilabel": frozenset({"threshold", "class_thresholds"}),
    "points": frozenset[str](),
}


def refuse_foreign_options(task: str, options: PredictionOptions) -> None:
    """An option another task reads would be silently ignored here: refuse it instead."""
    given = {
        "top_k": options.top_k is not None,
        "min_confidence": options.min_confidence is not None,
        "threshold": options.threshold is not None,
        "class_thresholds": bool(options.class_thresholds),
    }
    applies = _TASK_OPTIONS.get(task, frozenset(given))
    foreign = sorted(name for name, is_set in given.items() if is_set and name not in applies)
    if foreign:
        taken = ", ".join([*sorted(applies), "tta", "tta_views"])
        raise InvalidInput(
            f"options.{foreign[0]}: does not apply to {task} models, which take {taken}"
        )


def _needs_no_resampling(image: ImageInput, spec: InputSpec, views: tuple[View, ...]) -> bool:
    """Raw RGB pixels at the input's size, with no zoomed view: its rows are views of the bytes."""
    return (
        isinstance(image, RawImage)
        and image.channels == 3
        and (image.height, image.width) == (spec.height, spec.width)
        and all(view.zoom == 1.0 for view in views)
    )


def _encoded_size(image: ImageInput) -> int:
    return len(image.data) if isinstance(image, EncodedImage) else len(image.pixels)


def decode_and_prepare(
    image: ImageInput, spec: InputSpec, views: tuple[View, ...], limits: ImageLimits
) -> _PreparedImage:
    """Blocking: bytes to one model-input row per view."""
    if isinstance(image, RawImage) and _needs_no_resampling(image, spec, views):
        return rows_from_input_size_pixels(
            image.pixels, image.height, image.width, spec, views, limits
        )
    if isinstance(image, EncodedImage):
        return prepare_views(decode_for_model(image.data, spec, views, limits), spec, views)
    decoded = image_from_pixels(image.pixels, image.height, image.width, image.channels, limits)
    return prepare_views(decoded, spec, views)


def _timed_decode(
    image: ImageInput, spec: InputSpec, views: tuple[View, ...], limits: ImageLimits
) -> tuple[_PreparedImage, float]:
    """Runs in the decode pool, so the time excludes waiting for a free thread."""
    started = time.perf_counter()
    prepared = decode_and_prepare(image, spec, views, limits)
    return prepared, time.perf_counter() - started


def _timed_decode_if_small(
    image: ImageInput, spec: InputSpec, views: tuple[View, ...], limits: ImageLimits
) -> tuple[_PreparedImage, float] | None:
    """In the small-image lane: None when the header shows more than the lane's pixels."""
    if isinstance(image, EncodedImage):
        pixels = header_pixels(image.data)  # None: undecodable, refused fast right here
    else:
        pixels = image.height * image.width
    if pixels is not None and pixels > SMALL_IMAGE_PIXELS:
        return None
    return _timed_decode(image, spec, views, limits)


def observe_results(
    observer: PipelineObserver, model: LoadedModel, results: Sequence[ImageResult | VisionRPCError]
) -> None:
    """What the answered images look like, so drifting inputs show on a dashboard."""
    version = str(model.version)
    answered = [result for result in results if not isinstance(result, VisionRPCError)]
    task = serving_task(model.config.task)
    for answer in answered:
        task.observe(observer, model.name, version, answer.result)
    with_tta = sum(1 for answer in answered if answer.tta_applied)
    if with_tta:
        observer.tta_used(model.name, version, with_tta)


async def _run_rows(
    model: LoadedModel, reservation: Reservation, rows: list[np.ndarray], deadline: float | None
) -> list[np.ndarray]:
    """Queue the rows in their reserved slots and await them; giving up cancels them there."""
    if not rows:
        return []
    futures = reservation.submit(rows, deadline)
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        _, not_done = await asyncio.wait(futures, timeout=timeout)
        if not_done:
            raise DeadlineExceeded(f"model {model.name}: the deadline passed before an answer")
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]
    finally:
        for future in futures:
            future.cancel()


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the images were queued")
