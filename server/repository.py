"""The model repository: scan, load every servable model version, look models up.

Layout: ``<root>/<model>/config.(json|yaml)`` and ``<root>/<model>/<version>/model.onnx``.
A bad config or an unloadable ONNX file is logged with its path and reason and
skipped; every other model still serves. ``failures`` keeps what was skipped.

The server listens while its models load: until ``finish_loading`` the repository is
empty and ``get`` answers Unavailable, so callers retry instead of hearing "no model".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .batching import Batcher, BatchSettings
from .errors import ModelNotFound, Unavailable
from .model_config import (
    MODEL_FILE,
    BatchingConfig,
    ConfigError,
    ModelConfig,
    find_config_file,
    load_model_config,
    model_versions,
)
from .runtime import ModelLoadError, ModelRuntime, RuntimeOptions

if TYPE_CHECKING:
    from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

# The retry hint of a call made while models load: a warm-up takes seconds, so sooner
# would only spend the caller's attempts (gRPC allows at most 5).
LOADING_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class LoadFailure:
    model: str
    path: Path
    reason: str


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    version: int
    runtime: ModelRuntime
    batching: BatchSettings
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.config.name


def batching_in_force(config: BatchingConfig, defaults: BatchSettings) -> BatchSettings:
    """The model's own batching where its config sets it, the server's default elsewhere."""
    return BatchSettings(
        max_batch_size=config.max_batch_size or defaults.max_batch_size,
        max_queue_delay_ms=(
            defaults.max_queue_delay_ms
            if config.max_queue_delay_ms is None
            else config.max_queue_delay_ms
        ),
        max_queue_size=config.max_queue_size or defaults.max_queue_size,
        instances=config.instances or defaults.instances,
        wait_when_idle=(
            defaults.wait_when_idle if config.wait_when_idle is None else config.wait_when_idle
        ),
    )


class ModelRepository:
    def __init__(
        self,
        models: dict[str, dict[int, LoadedModel]],
        failures: list[LoadFailure],
        *,
        loading: bool = False,
    ) -> None:
        self._models = models
        self.failures = failures
        self.loading = loading

    def finish_loading(self, loaded: ModelRepository) -> None:
        """Takes over what a background load produced; call it on the event loop's thread."""
        self._models, self.failures = loaded._models, loaded.failures
        self.loading = False

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def loaded(self) -> Iterator[LoadedModel]:
        """Every loaded model version, by name then version."""
        for name in self.names():
            for version in self.versions(name):
                yield self._models[name][version]

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """A model version; the newest when ``version`` is None or empty."""
        if self.loading:
            raise Unavailable(
                "the server is still loading its models; retry shortly",
                retry_after_seconds=LOADING_RETRY_AFTER,
            )
        if name not in self._models:
            if any(failure.model == name for failure in self.failures):
                # The reason names server paths, so it goes to the log, not to callers.
                raise ModelNotFound(
                    f"model {name!r} failed to load (the server log says why); {self._available()}"
                )
            raise ModelNotFound(f"no model named {name!r}; {self._available()}")
        versions = self._models[name]
        if version is None or version == "":
            return versions[max(versions)]
        # isdigit() alone admits "²" and "①", which int() refuses.
        text = str(version)
        number = int(text) if text.isascii() and text.isdigit() else None
        if number is None or number not in versions:
            listed = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {listed}")
        return versions[number]

    async def close(self) -> None:
        for model in self.loaded():
            await model.batcher.close()

    def _available(self) -> str:
        if not self._models:
            return "no models are loaded"
        listed = "; ".join(
            f"{name} (versions {', '.join(str(v) for v in self.versions(name))})"
            for name in self.names()
        )
        return f"available: {listed}"


def load_repository(
    root: Path,
    runtime_options: RuntimeOptions,
    default_batching: BatchSettings,
    metrics: ServerMetrics | None = None,
) -> ModelRepository:
    """Load every model version under ``root``; blocking (sessions and warm-up)."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    models: dict[str, dict[int, LoadedModel]] = {}
    failures: list[LoadFailure] = []

    def skip(model: str, path: Path, reason: str) -> None:
        logger.error("skipping model %s: %s: %s", model, path, reason)
        failures.append(LoadFailure(model=model, path=path, reason=reason))
        if metrics is not None:
            metrics.model_load_failed(model)

    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_file = find_config_file(model_dir)
        if config_file is None:
            skip(model_dir.name, model_dir, "no config.json or config.yaml")
            continue
        try:
            config = load_model_config(config_file)
        except ConfigError as exc:
            skip(model_dir.name, config_file, str(exc))
            continue
        versions = model_versions(model_dir)
        if not versions:
            skip(config.name, model_dir, "no numbered version folders")
        batching = batching_in_force(config.batching, default_batching)
        for version in versions:
            model_file = model_dir / str(version) / MODEL_FILE
            try:
                loaded = load_model(model_file, config, version, runtime_options, batching, metrics)
            except (ModelLoadError, OSError) as exc:
                skip(config.name, model_file, str(exc))
                continue
            models.setdefault(config.name, {})[version] = loaded
    return ModelRepository(models, failures)


def load_model(
    path: Path,
    config: ModelConfig,
    version: int,
    runtime_options: RuntimeOptions,
    batching: BatchSettings,
    metrics: ServerMetrics | None = None,
) -> LoadedModel:
    """The one place a model version loads: session, checks, warm-up, its batcher."""
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    runtime = ModelRuntime(path, config, runtime_options)
    runtime.warm_up([1, batching.max_batch_size])
    observer = None
    if metrics is not None:
        metrics.model_loaded(
            config.name, str(version), config.task, runtime.provider, runtime.warmup_seconds
        )
        observer = metrics.for_batcher(config.name, str(version))
    batcher = Batcher(
        runtime.run,
        batching,
        name=f"{config.name}:{version}",
        observer=observer,
        expected_batch_seconds=runtime.warmup_seconds,
    )
    return LoadedModel(
        config=config, version=version, runtime=runtime, batching=batching, batcher=batcher
    )
