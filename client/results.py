"""Typed, immutable results returned by the clients.

Every per-image result (``Classification``, ``MultiLabel``, ``Points`` or
``ImageError``) carries the model and version that answered, whether test-time
augmentation was applied and with how many views, and the original image size
(after EXIF orientation). ``to_dict()`` gives plain JSON-serialisable data with a
``"type"`` key naming the result kind.

Each task's result class is the client's whole knowledge of that task: how its answer
is decoded from the protobuf result (``from_proto``) and how it reads as one line
(``summary``). ``TASK_RESULTS`` maps the protobuf result field to the class, so a new
task is one class here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any, TypeAlias

from visionrpc.protos import inference_pb2 as pb


def _plain(value: object) -> dict[str, Any]:
    # asdict recurses into nested dataclasses and keeps tuples, which json writes as lists.
    return dataclasses.asdict(value)  # type: ignore[call-overload, no-any-return]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LabelScore:
    """A label with its score in [0, 1].

    ``threshold`` is the threshold that was applied (multi-label results only; 0 otherwise).
    """

    label: str
    score: float
    threshold: float = 0.0

    def __str__(self) -> str:
        return f"{self.label} {self.score:.3f}"

    @classmethod
    def all_from_proto(cls, entries: Iterable[pb.LabelScore]) -> tuple[LabelScore, ...]:
        return tuple(cls(label=e.label, score=e.score, threshold=e.threshold) for e in entries)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Point:
    """A named point in pixels of the original image, with the model's own [-1, 1] coordinates."""

    name: str
    x: float
    y: float
    x_normalized: float
    y_normalized: float

    def __str__(self) -> str:
        return f"{self.name} ({self.x:.1f}, {self.y:.1f})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ImageResult:
    model: str
    version: str
    tta_applied: bool
    tta_views: int
    original_width: int
    original_height: int

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data; ``"type"`` names the result kind."""
        return {"type": type(self).__name__, **_plain(self)}

    def _provenance(self) -> str:
        tta = f", tta x{self.tta_views}" if self.tta_applied else ""
        size = f"{self.original_height}x{self.original_width} (HxW)"
        return f"{self.model} v{self.version}, {size}{tta}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Classification(_ImageResult):
    """Single-label classification: the top-k labels, best first.

    ``below_min_confidence`` is true when the top-1 score is under the applied
    ``min_confidence``: the image then shows none of the known classes, and
    ``label`` is None.
    """

    top: tuple[LabelScore, ...]
    below_min_confidence: bool
    min_confidence: float

    @property
    def label(self) -> str | None:
        """The predicted label, or None when the model is not confident enough."""
        if self.below_min_confidence or not self.top:
            return None
        return self.top[0].label

    @property
    def score(self) -> float:
        """The top-1 score (even when below ``min_confidence``)."""
        return self.top[0].score if self.top else 0.0

    def __str__(self) -> str:
        ranked = ", ".join(str(entry) for entry in self.top)
        if self.below_min_confidence:
            ranked = f"none of the known classes (best: {ranked}; min {self.min_confidence:.2f})"
        return f"{ranked} [{self._provenance()}]"

    @classmethod
    def from_proto(cls, answer: pb.Classification, common: dict[str, Any]) -> Classification:
        return cls(
            top=LabelScore.all_from_proto(answer.top),
            below_min_confidence=answer.below_min_confidence,
            min_confidence=answer.min_confidence,
            **common,
        )

    def summary(self) -> str:
        ranked = ", ".join(str(entry) for entry in self.top)
        if self.below_min_confidence:
            return f"(none: best {ranked} < {self.min_confidence:.2f})"
        return ranked


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiLabel(_ImageResult):
    """Multi-label classification: every label at or above its threshold, best first.

    ``all_scores`` holds every label's score in vocabulary order when asked for
    (``all_scores=True``), else it is empty.
    """

    labels: tuple[LabelScore, ...]
    all_scores: tuple[LabelScore, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The predicted labels' names, best first."""
        return tuple(entry.label for entry in self.labels)

    def __str__(self) -> str:
        found = ", ".join(str(entry) for entry in self.labels) or "no labels"
        return f"{found} [{self._provenance()}]"

    @classmethod
    def from_proto(cls, answer: pb.MultiLabel, common: dict[str, Any]) -> MultiLabel:
        return cls(
            labels=LabelScore.all_from_proto(answer.labels),
            all_scores=LabelScore.all_from_proto(answer.all_scores),
            **common,
        )

    def summary(self) -> str:
        found = ", ".join(str(entry) for entry in self.labels) or "(no labels)"
        if self.all_scores:
            return f"{found}  | all: {', '.join(str(entry) for entry in self.all_scores)}"
        return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class Points(_ImageResult):
    """Point regression: named points in pixels of the original image."""

    points: tuple[Point, ...]

    def __str__(self) -> str:
        return f"{', '.join(str(point) for point in self.points)} [{self._provenance()}]"

    @classmethod
    def from_proto(cls, answer: pb.PointList, common: dict[str, Any]) -> Points:
        return cls(
            points=tuple(
                Point(
                    name=point.name,
                    x=point.x,
                    y=point.y,
                    x_normalized=point.x_normalized,
                    y_normalized=point.y_normalized,
                )
                for point in answer.points
            ),
            **common,
        )

    def summary(self) -> str:
        return ", ".join(str(point) for point in self.points)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageError(_ImageResult):
    """One input could not be predicted; the other inputs were.

    ``code`` is the gRPC status name (e.g. ``"INVALID_ARGUMENT"``), ``index`` the
    input's position in the caller's list, and ``message`` starts with
    ``image <index>`` (and the file name, when the input had one). The failure may
    be the server's (an undecodable file) or the client's, found before sending (a
    missing file, empty bytes, a wrong array), or a connection lost before the
    input was answered (``UNAVAILABLE``). ``request_id`` is the call's
    ``x-request-id``. The size and TTA fields are 0/False.
    """

    code: str
    message: str
    index: int
    request_id: str = ""

    def __str__(self) -> str:
        return f"error {self.code}: {self.message}"

    def summary(self) -> str:
        return f"ERROR {self.code}: {self.message}"


Prediction: TypeAlias = Classification | MultiLabel | Points | ImageError
"""Any per-image result; narrow it with ``isinstance``."""

# The protobuf ImageResult's oneof field for each task's answer -> its result class.
TASK_RESULTS: dict[str, type[Classification] | type[MultiLabel] | type[Points]] = {
    "classification": Classification,
    "multilabel": MultiLabel,
    "points": Points,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSummary:
    """One entry of ``models()``: a loaded model, its versions and execution provider."""

    name: str
    task: str
    versions: tuple[str, ...]
    provider: str

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data."""
        return _plain(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Everything the server knows about one model version (``model_info()``).

    ``top_k`` and ``min_confidence`` (0 = off) are the classification defaults,
    ``threshold``/``class_thresholds`` the multi-label ones. ``accepted_formats`` are
    the encoded formats the server decodes and ``accepted_extensions`` their file
    name suffixes (what ``visionrpc predict`` searches folders for).
    ``max_images_per_request`` is the most images one request may carry (0: no
    limit); the clients split longer lists. ``metrics`` are the validation metrics
    recorded at training time; ``config`` is the whole model configuration as a dict.
    Sizes read height x width, as ``visionrpc train --size`` takes them.
    """

    name: str
    version: str
    versions: tuple[str, ...]
    task: str
    labels: tuple[str, ...]
    input_height: int
    input_width: int
    resize_method: str
    top_k: int
    threshold: float
    class_thresholds: dict[str, float]
    min_confidence: float
    tta_enabled: bool
    tta_views: tuple[str, ...]
    tta_beta: float
    tta_zoom: float
    provider: str
    accepted_formats: tuple[str, ...]
    accepted_extensions: tuple[str, ...]
    max_images_per_request: int
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int
    metrics: dict[str, float]
    dataset: str
    trained_at: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data."""
        return _plain(self)

    def __str__(self) -> str:
        per_request = self.max_images_per_request or "no limit"
        lines = [
            f"{self.name} v{self.version} ({self.task}), versions: {', '.join(self.versions)}",
            f"  input: {self.input_height}x{self.input_width} (HxW), {self.resize_method}",
            f"  labels ({len(self.labels)}): {', '.join(self.labels)}",
            f"  provider: {self.provider}",
            f"  tta: {'on' if self.tta_enabled else 'off'}"
            f" ({', '.join(self.tta_views) or 'no views'}; beta {self.tta_beta:g};"
            f" zoom {self.tta_zoom:g})",
            f"  batching: max {self.max_batch_size}, delay {self.max_queue_delay_ms:g} ms,"
            f" queue {self.max_queue_size}, instances {self.instances}",
            f"  max images per request: {per_request}",
            f"  accepted formats: {', '.join(self.accepted_formats) or 'not reported'}",
        ]
        if self.task == "multilabel":
            lines.append(f"  threshold: {self.threshold:g}")
            lines.extend(
                f"    {label}: {value:g}" for label, value in sorted(self.class_thresholds.items())
            )
        if self.task == "classification":
            lines.append(f"  top_k: {self.top_k}")
            lines.append(f"  min_confidence: {self.min_confidence:g}")
        if self.dataset or self.trained_at:
            lines.append(f"  trained on {self.dataset or '?'} at {self.trained_at or '?'}")
        lines.extend(f"  {name}: {value:g}" for name, value in sorted(self.metrics.items()))
        return "\n".join(lines)


class HealthStatus(enum.Enum):
    """A ``grpc.health.v1`` serving status. Truthy only when ``SERVING``."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3

    def __bool__(self) -> bool:
        return self is HealthStatus.SERVING
