"""The model repository's schema: one module that the server reads and training writes.

Layout::

    <repository>/<model>/config.json   (or config.yaml / config.yml)
    <repository>/<model>/<version>/model.onnx      versions are positive integers

The ONNX graph takes uint8 images, NHWC ``[batch, height, width, 3]``, and does the
/255 and mean/std normalisation itself. It returns float32 ``[batch, n]``:
probabilities for ``classification`` (softmax) and ``multilabel`` (sigmoid), and
for ``points`` the model's coordinates in [-1, 1] as ``x0, y0, x1, y1, ...``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .views import parse_view

TASKS = ("classification", "multilabel", "points")
RESIZE_METHODS = ("crop", "squish", "pad")
CONFIG_NAMES = ("config.json", "config.yaml", "config.yml")
MODEL_FILE = "model.onnx"
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A config that cannot be served; the message names the file and the reason."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the model's input: the size and the resize method."""

    height: int
    width: int
    resize_method: str = "crop"


@dataclass(frozen=True)
class BatchingConfig:
    """Per-model batching; None takes the server-wide default."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    instances: int | None = None
    # True makes an idle instance wait max_queue_delay_ms for company too (see batching.py).
    wait_when_idle: bool | None = None


@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation: deterministic views blended as fastai's ``tta`` does."""

    enabled: bool = False
    # Views besides the identity; see visionrpc.server.views.parse_view.
    views: tuple[str, ...] = ("flip",)
    # Weight of the un-augmented prediction: lerp(mean(augmented), plain, beta).
    beta: float = 0.25
    # How much larger the resize is that the zoom views crop from.
    zoom: float = 1.15


VERSION_POLICIES = ("latest", "all", "specific")


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's version folders serve, as Triton's ``version_policy`` says.

    In the config: ``{"latest": {"num_versions": 2}}``, ``{"all": {}}`` or
    ``{"specific": {"versions": [1, 3]}}``; without one, the newest version alone.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve among those on disk, oldest first."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [version for version in ordered if version in self.versions]
        return ordered[-self.num_versions :]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}


@dataclass(frozen=True)
class TrainingSummary:
    # The dataset's folder; its kind (training.kinds) and the reader options that chose
    # the validation split, so evaluation reads the same split.
    dataset: str = ""
    dataset_kind: str = ""
    dataset_options: Mapping[str, str | int | float] = field(default_factory=dict)
    trained_at: str = ""
    arch: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    task: str
    # Class names (classification, multilabel) or point names (points).
    labels: tuple[str, ...]
    input: InputSpec
    # multilabel: default threshold, chosen on the validation set by training.
    threshold: float = 0.5
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    # classification: under this top-1 score the answer is "none of the known classes".
    min_confidence: float = 0.0
    # classification: how many labels to return when the request does not say.
    top_k: int = 5
    tta: TTAConfig = field(default_factory=TTAConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    training: TrainingSummary = field(default_factory=TrainingSummary)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["class_thresholds"] = dict(self.class_thresholds)
        data["tta"]["views"] = list(self.tta.views)
        data["training"]["metrics"] = dict(self.training.metrics)
        data["training"]["dataset_options"] = dict(self.training.dataset_options)
        data["batching"] = {k: v for k, v in data["batching"].items() if v is not None}
        # The default policy is left out, so configs written before policies existed are unchanged.
        if self.version_policy == VersionPolicy():
            del data["version_policy"]
        else:
            data["version_policy"] = self.version_policy.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def model_config_from_dict(data: Mapping[str, Any], *, name: str | None = None) -> ModelConfig:
    """Build and validate a config; raises ConfigError naming the bad field."""
    if not isinstance(data, Mapping):
        raise ConfigError("the config must be a mapping")
    known = {
        "name", "task", "labels", "input", "threshold", "class_thresholds",
        "min_confidence", "top_k", "tta", "batching", "training", "version_policy",
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(unknown)}")
    model_name = str(data.get("name") or name or "")
    if not MODEL_NAME_PATTERN.match(model_name):
        raise ConfigError(f"name {model_name!r} must match {MODEL_NAME_PATTERN.pattern}")
    if name is not None and model_name != name:
        raise ConfigError(f"name {model_name!r} differs from its folder {name!r}")
    task = data.get("task")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    labels = data.get("labels")
    if not isinstance(labels, list | tuple) or not labels:
        raise ConfigError("labels must be a non-empty list")
    labels = tuple(str(label) for label in labels)
    if len(set(labels)) != len(labels):
        raise ConfigError("labels must be unique")
    input_spec = _input_spec(data.get("input"))
    threshold = _probability(data.get("threshold", 0.5), "threshold")
    class_thresholds = _class_thresholds(data.get("class_thresholds", {}), labels)
    min_confidence = _probability(data.get("min_confidence", 0.0), "min_confidence")
    top_k = _positive_int(data.get("top_k", 5), "top_k")
    return ModelConfig(
        name=model_name,
        task=task,
        labels=labels,
        input=input_spec,
        threshold=threshold,
        class_thresholds=class_thresholds,
        min_confidence=min_confidence,
        top_k=top_k,
        tta=_tta(data.get("tta", {})),
        batching=_batching(data.get("batching", {})),
        training=_training(data.get("training", {})),
        version_policy=_version_policy(data.get("version_policy")),
    )


def load_model_config(path: Path) -> ModelConfig:
    """Read a config file; the model name defaults to its folder's name."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return model_config_from_dict(data, name=path.parent.name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def find_config_file(model_dir: Path) -> Path | None:
    for name in CONFIG_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def model_versions(model_dir: Path) -> list[int]:
    """Version numbers present under a model folder, oldest first."""
    return sorted(
        int(child.name)
        for child in model_dir.iterdir()
        if child.is_dir() and child.name.isascii() and child.name.isdigit() and int(child.name) > 0
    )


def write_repository_entry(repository: Path, config: ModelConfig, onnx_file: Path) -> Path:
    """Add a new version of a model to a repository and (re)write its config.

    Returns the new version folder. The ONNX file is copied in first and the
    config written last, so a server scanning meanwhile never sees a config
    that points at a half-written model.
    """
    model_json = config.to_json()
    model_config_from_dict(json.loads(model_json))  # never write what the server would refuse
    model_dir = repository / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    versions = model_versions(model_dir)
    version_dir = model_dir / str((versions[-1] if versions else 0) + 1)
    version_dir.mkdir()
    partial = version_dir / (MODEL_FILE + ".partial")
    shutil.copyfile(onnx_file, partial)
    partial.rename(version_dir / MODEL_FILE)
    for stale in CONFIG_NAMES[1:]:
        (model_dir / stale).unlink(missing_ok=True)
    (model_dir / "config.json").write_text(model_json + "\n")
    return version_dir


def _input_spec(raw: Any) -> InputSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError("input must be a mapping with height, width and resize_method")
    size = raw.get("size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    else:
        height, width = raw.get("height"), raw.get("width")
    height = _positive_int(height, "input.height")
    width = _positive_int(width, "input.width")
    method = raw.get("resize_method", "crop")
    if method not in RESIZE_METHODS:
        raise ConfigError(f"input.resize_method must be one of {', '.join(RESIZE_METHODS)}")
    return InputSpec(height=height, width=width, resize_method=method)


def _tta(raw: Any) -> TTAConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("tta must be a mapping")
    views = tuple(str(v) for v in raw.get("views", TTAConfig.views))
    for view in views:
        try:
            parse_view(view, zoom=1.5)
        except ValueError as exc:
            raise ConfigError(f"tta.views: {exc}") from exc
    zoom = float(raw.get("zoom", TTAConfig.zoom))
    if not 1.0 < zoom <= 2.0:
        raise ConfigError("tta.zoom must be in (1, 2]")
    return TTAConfig(
        enabled=bool(raw.get("enabled", False)),
        views=views,
        beta=_probability(raw.get("beta", TTAConfig.beta), "tta.beta"),
        zoom=zoom,
    )


def _batching(raw: Any) -> BatchingConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("batching must be a mapping")
    delay = raw.get("max_queue_delay_ms")
    if delay is not None and (not isinstance(delay, int | float) or delay < 0):
        raise ConfigError("batching.max_queue_delay_ms must be a number >= 0")
    wait_when_idle = raw.get("wait_when_idle")
    if wait_when_idle is not None and not isinstance(wait_when_idle, bool):
        raise ConfigError("batching.wait_when_idle must be true or false")

    def optional_int(key: str) -> int | None:
        value = raw.get(key)
        return None if value is None else _positive_int(value, f"batching.{key}")

    return BatchingConfig(
        max_batch_size=optional_int("max_batch_size"),
        max_queue_delay_ms=None if delay is None else float(delay),
        max_queue_size=optional_int("max_queue_size"),
        instances=optional_int("instances"),
        wait_when_idle=wait_when_idle,
    )


def _version_policy(raw: Any) -> VersionPolicy:
    if raw is None:
        return VersionPolicy()
    if not isinstance(raw, Mapping) or len(raw) != 1 or next(iter(raw)) not in VERSION_POLICIES:
        raise ConfigError(
            'version_policy must be one of {"latest": {"num_versions": N}}, {"all": {}} '
            'or {"specific": {"versions": [...]}}'
        )
    kind, options = next(iter(raw.items()))
    if not isinstance(options, Mapping):
        raise ConfigError(f"version_policy.{kind} must be a mapping")
    if kind == "latest":
        count = _positive_int(options.get("num_versions", 1), "version_policy.latest.num_versions")
        return VersionPolicy(kind="latest", num_versions=count)
    if kind == "specific":
        versions = options.get("versions")
        if not isinstance(versions, list) or not versions:
            raise ConfigError("version_policy.specific.versions must be a non-empty list")
        checked = tuple(
            sorted({_positive_int(v, "version_policy.specific.versions[]") for v in versions})
        )
        return VersionPolicy(kind="specific", versions=checked)
    return VersionPolicy(kind="all")


def _training(raw: Any) -> TrainingSummary:
    if not isinstance(raw, Mapping):
        raise ConfigError("training must be a mapping")
    metrics = raw.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise ConfigError("training.metrics must be a mapping of names to numbers")
    options = raw.get("dataset_options", {})
    if not isinstance(options, Mapping) or not all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in options.values()
    ):
        raise ConfigError("training.dataset_options must map names to strings or numbers")
    return TrainingSummary(
        dataset=str(raw.get("dataset", "")),
        dataset_kind=str(raw.get("dataset_kind", "")),
        dataset_options={str(k): v for k, v in options.items()},
        trained_at=str(raw.get("trained_at", "")),
        arch=str(raw.get("arch", "")),
        metrics={str(k): float(v) for k, v in metrics.items()},
    )


def _class_thresholds(raw: Any, labels: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ConfigError("class_thresholds must be a mapping of label to threshold")
    unknown = sorted(set(raw) - set(labels))
    if unknown:
        raise ConfigError(f"class_thresholds names unknown label(s): {', '.join(unknown)}")
    return {str(k): _probability(v, f"class_thresholds[{k}]") for k, v in raw.items()}


def _probability(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{field_name} must be a number in [0, 1], not {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{field_name} must be in [0, 1], not {value}")
    return float(value)


def _positive_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field_name} must be a positive integer, not {value!r}")
    return value
