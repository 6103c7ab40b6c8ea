"""The live model table: which versions serve, each version's state, and leases on them.

Layout: ``<root>/<model>/config.(json|yaml)`` and ``<root>/<model>/<version>/model.onnx``;
the config's ``version_policy`` picks the versions that serve (the newest alone by
default). ``ModelRepository`` is what the request path reads: ``use`` resolves a name
(and an optional pinned version) to a ``LoadedModel`` and holds a lease on it for the
call, so a version taken out of service keeps answering the calls that already hold
it. ``visionrpc.server.model_manager`` decides what loads and swaps it in with
``publish``, one model at a time, atomically: a call sees the old set of versions or
the new one, never a mix.

A bad config or an unloadable ONNX file is logged with its path and reason and shows
in ``failures`` and the index; every other model (and every version already serving)
keeps serving.

The server listens while its models load: until loading ends ``get`` answers
Unavailable, so callers retry instead of hearing "no model".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
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


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    # Out of service; the calls that hold it finish before its session is released.
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: VersionState
    # Why a version is not READY: its load error, "unloaded", "not in the version policy".
    reason: str = ""


@dataclass(frozen=True)
class ModelStatus:
    name: str
    versions: tuple[VersionStatus, ...] = ()
    # A problem of the model as a whole (its config), or why none of it serves.
    reason: str = ""

    @property
    def state(self) -> VersionState:
        """READY when any version serves; LOADING while one loads; UNAVAILABLE otherwise."""
        states = {version.state for version in self.versions}
        for state in (VersionState.READY, VersionState.LOADING, VersionState.UNLOADING):
            if state in states:
                return state
        return VersionState.UNAVAILABLE


@dataclass(frozen=True)
class LoadFailure:
    model: str
    path: Path
    reason: str


class Usage:
    """The calls holding a loaded version, so it is released only once they have finished."""

    def __init__(self) -> None:
        self.calls = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.calls += 1

    def exit(self) -> None:
        self.calls -= 1
        if self.calls == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.calls == 0:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    version: int
    runtime: ModelRuntime
    batching: BatchSettings
    batcher: Batcher
    usage: Usage = field(default_factory=Usage, compare=False, repr=False)

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
    """The serving view; every method runs on the event loop's thread."""

    def __init__(
        self,
        models: dict[str, dict[int, LoadedModel]] | None = None,
        failures: list[LoadFailure] | None = None,
        *,
        loading: bool = False,
    ) -> None:
        self._models: dict[str, dict[int, LoadedModel]] = dict(models or {})
        self._failures: dict[tuple[str, Path], LoadFailure] = {
            (failure.model, failure.path): failure for failure in failures or ()
        }
        self._statuses: dict[str, ModelStatus] = {}
        self.loading = loading

    @property
    def failures(self) -> list[LoadFailure]:
        """What fails to load now, by model and file (a fixed file drops out)."""
        return list(self._failures.values())

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def loaded(self) -> Iterator[LoadedModel]:
        """Every serving model version, by name then version."""
        for name in self.names():
            for version in self.versions(name):
                yield self._models[name][version]

    def serving(self, name: str) -> dict[int, LoadedModel]:
        """The versions of ``name`` that serve, loading or not (for the model manager)."""
        return dict(self._models.get(name, {}))

    def statuses(self) -> dict[str, ModelStatus]:
        return dict(self._statuses)

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """A serving version; the newest when ``version`` is None or empty.

        A model the repository knows but does not serve now (unloaded, still loading)
        is Unavailable: a retry can succeed once it is loaded. A model that failed to
        load, or that the repository never had, is ModelNotFound.
        """
        if self.loading:
            raise Unavailable(
                "the server is still loading its models; retry shortly",
                retry_after_seconds=LOADING_RETRY_AFTER,
            )
        versions = self._models.get(name)
        if not versions:
            raise self._not_serving(name)
        if version is None or version == "":
            return versions[max(versions)]
        # isdigit() alone admits "²" and "①", which int() refuses.
        text = str(version)
        number = int(text) if text.isascii() and text.isdigit() else None
        if number is None or number not in versions:
            listed = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {listed}")
        return versions[number]

    @contextlib.contextmanager
    def use(self, name: str, version: str | int | None = None) -> Iterator[LoadedModel]:
        """``get``, holding the version for the ``with`` block: a swap waits for it."""
        model = self.get(name, version)
        model.usage.enter()
        try:
            yield model
        finally:
            model.usage.exit()

    def publish(self, name: str, versions: dict[int, LoadedModel]) -> list[LoadedModel]:
        """Serve exactly ``versions`` of ``name`` from now on; returns those taken out."""
        kept = {id(model) for model in versions.values()}
        previous = self._models.get(name, {})
        if versions:
            self._models[name] = dict(versions)
        else:
            self._models.pop(name, None)
        return [model for model in previous.values() if id(model) not in kept]

    def set_status(self, status: ModelStatus) -> None:
        self._statuses[status.name] = status

    def forget(self, name: str) -> None:
        """A model whose folder is gone: no status, no failures."""
        self._statuses.pop(name, None)
        for key in [key for key in self._failures if key[0] == name]:
            del self._failures[key]

    def record_failure(self, failure: LoadFailure) -> None:
        self._failures[failure.model, failure.path] = failure

    def clear_failure(self, model: str, path: Path) -> None:
        self._failures.pop((model, path), None)

    async def close(self) -> None:
        for model in list(self.loaded()):
            await model.batcher.close()

    def _not_serving(self, name: str) -> Exception:
        status = self._statuses.get(name)
        if any(failure.model == name for failure in self._failures.values()):
            # The reason names server paths, so it goes to the log, not to callers.
            return ModelNotFound(
                f"model {name!r} failed to load (the server log says why); {self._available()}"
            )
        if status is not None:
            state = status.state.value + (f" ({status.reason})" if status.reason else "")
            return Unavailable(f"model {name!r} is not serving now: {state}; retry later")
        return ModelNotFound(f"no model named {name!r}; {self._available()}")

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
    """Load every model's policy versions under ``root`` at once; blocking. For tools and tests.

    The server itself loads through ``ModelManager``, which can also reload and unload.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    repository = ModelRepository()

    def skip(model: str, path: Path, reason: str) -> None:
        log_failure(model, path, reason, metrics)
        repository.record_failure(LoadFailure(model=model, path=path, reason=reason))

    for model_dir in model_folders(root):
        config_file = find_config_file(model_dir)
        if config_file is None:
            skip(model_dir.name, model_dir, "no config.json or config.yaml")
            continue
        try:
            config = load_model_config(config_file)
        except ConfigError as exc:
            skip(model_dir.name, config_file, str(exc))
            continue
        on_disk = model_versions(model_dir)
        policy = config.version_policy
        candidates = sorted(policy.select(on_disk), reverse=True)
        if not candidates:
            skip(config.name, model_dir, "no numbered version folders the version policy selects")
        # Latest N: older versions stand in, newest first, for selected ones that fail.
        stand_ins = [v for v in sorted(on_disk, reverse=True) if v not in candidates]
        batching = batching_in_force(config.batching, default_batching)
        loaded: dict[int, LoadedModel] = {}
        while candidates:
            version = candidates.pop(0)
            model_file = model_dir / str(version) / MODEL_FILE
            try:
                loaded[version] = load_model(
                    model_file, config, version, runtime_options, batching, metrics
                )
            except (ModelLoadError, OSError) as exc:
                skip(config.name, model_file, str(exc))
                if policy.kind == "latest" and stand_ins:
                    candidates.append(stand_ins.pop(0))
        repository.publish(config.name, loaded)
    return repository


def model_folders(root: Path) -> list[Path]:
    """The model folders under ``root``, by name; dot folders (editors, rsync) are not models."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def log_failure(model: str, path: Path, reason: str, metrics: ServerMetrics | None) -> None:
    logger.error(
        "skipping model %s: %s: %s",
        model,
        path,
        reason,
        extra={"model": model, "path": str(path), "reason": reason},
    )
    if metrics is not None:
        metrics.model_load_failed(model)


def load_model(
    path: Path,
    config: ModelConfig,
    version: int,
    runtime_options: RuntimeOptions,
    batching: BatchSettings,
    metrics: ServerMetrics | None = None,
) -> LoadedModel:
    """The one place a model version loads: session, checks, warm-up, its batcher.

    Blocking, and safe off the event loop: the batcher starts its loop on first submit.
    """
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist")
    # A config's own instances run the one session concurrently instead of lanes.
    lanes = runtime_options.cpu_lanes and batching.instances == 1
    runtime = ModelRuntime(path, config, dataclasses.replace(runtime_options, cpu_lanes=lanes))
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
        expected_row_seconds=runtime.warmup_row_seconds,
        thread_niceness=runtime_options.model_niceness,
        lanes=runtime.lane_runs,
    )
    return LoadedModel(
        config=config, version=version, runtime=runtime, batching=batching, batcher=batcher
    )
