"""Model control without restarts: load, unload, reload, and polling the repository.

Transport-free: ``ModelManager`` is what the ``visionrpc.v1.ModelControlService`` servicer
and the Open Inference Protocol's repository extension call. Its API::

    index() -> list[ModelStatus]          every model folder and known model, each version's state
    await load(name) -> ModelStatus       bring a model to what its folder holds now
    await reload(name) -> ModelStatus     the same, with fresh sessions even for unchanged files
    await unload(name) -> ModelStatus     stop serving it; returns once its memory is released
    await poll() -> None                  one rescan of the whole repository (what ``poll`` runs)

Modes (``--model-control``), as Triton's ``--model-control-mode``:

* ``none``: every model loads at start-up; the repository is not watched and load,
  unload and reload are refused (FailedPrecondition).
* ``poll``: the same start, then a rescan every ``poll_interval_seconds`` that picks up new
  versions, changed configs or model files, new models and removed ones. Load, unload and
  reload are refused too: the folder is the source of truth.
* ``explicit``: only the ``--load-model`` list loads at start-up (``*`` for every model);
  afterwards only the admin API loads, unloads and reloads.

A swap: the versions to add load and warm up off the event loop while the old ones keep
serving; then ``ModelRepository.publish`` switches the model's version set at once, so
unpinned traffic moves to the newest version in one step. Versions taken out wait until
the calls holding them finish, then their batcher closes and the last reference to their
session goes, which frees its memory (onnxruntime's weights and arena are large blocks that
go straight back to the OS). A config or version that fails to load leaves
everything that served in place; the failure is logged with its file and reason, counted
in ``visionrpc_model_load_failures_total`` and shown in the index, and the same file is
not retried until it changes.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .batching import BatchSettings
from .errors import FailedPrecondition, InvalidInput, ModelNotFound
from .model_config import (
    MODEL_FILE,
    MODEL_NAME_PATTERN,
    ConfigError,
    ModelConfig,
    find_config_file,
    load_model_config,
    model_versions,
)
from .repository import (
    LoadedModel,
    LoadFailure,
    ModelRepository,
    ModelStatus,
    VersionState,
    VersionStatus,
    batching_in_force,
    load_model,
    log_failure,
    model_folders,
)
from .runtime import ModelLoadError, RuntimeOptions

if TYPE_CHECKING:
    from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

LOAD_ALL = "*"
UNLOADED = "unloaded"
NOT_SELECTED = "not selected by the version policy"
MAX_NAME_LENGTH = 200


class ControlMode(enum.Enum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


# (size, mtime_ns, inode) of a file: a rewrite or a replacing rename changes it.
Stamp = tuple[int, int, int]
# Told whether a model serves at least one version, after each change (health follows it).
ServingObserver = Callable[[str, bool], Awaitable[None]]


@dataclass(frozen=True)
class _Folder:
    """What one model folder holds now; read off the event loop."""

    name: str
    config_file: Path | None
    config_stamp: Stamp | None
    # Version number to the stamp of its model.onnx (None while the file is missing).
    versions: dict[int, Stamp | None]


@dataclass
class _Known:
    """What the manager made of a model folder the last time it looked."""

    config: ModelConfig | None = None
    config_stamp: Stamp | None = None
    # The stamps that serve now, and those that failed (retried only once they change).
    served: dict[int, Stamp | None] = field(default_factory=dict)
    failed: dict[int, tuple[Stamp | None, Stamp | None, str]] = field(default_factory=dict)
    config_failure: tuple[Stamp | None, str] | None = None
    # The folder's state when it last had nothing to serve (logged once per state).
    nothing_selected: tuple[Stamp | None, tuple[int, ...]] | None = None
    unloaded: bool = False


class ModelManager:
    def __init__(
        self,
        repository: ModelRepository,
        root: Path,
        runtime_options: RuntimeOptions,
        default_batching: BatchSettings,
        *,
        mode: ControlMode = ControlMode.NONE,
        metrics: ServerMetrics | None = None,
        on_serving_changed: ServingObserver | None = None,
    ) -> None:
        self.repository = repository
        self.root = root
        self.mode = mode
        self._runtime_options = runtime_options
        self._default_batching = default_batching
        self._metrics = metrics
        self._on_serving_changed = on_serving_changed
        self._known: dict[str, _Known] = {}
        # One change at a time: loads are heavy, and a swap must see the state it decided on.
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    async def start(self, load_models: Sequence[str] = ()) -> None:
        """Start-up loading: every model, or in explicit mode those named (``*`` for all)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        names = await asyncio.to_thread(_folder_names, self.root)
        if self.mode is ControlMode.EXPLICIT and LOAD_ALL not in load_models:
            missing = sorted(set(load_models) - set(names))
            for name in missing:
                logger.error("--load-model %s: no such model folder in %s", name, self.root)
            names = [name for name in names if name in load_models]
        async with self._lock:
            for name in names:
                await self._sync(name, force=False, notify=False)
        self.repository.loading = False
        for name in sorted(set(self._known) | set(self.repository.names())):
            await self._notify(name)

    def start_polling(self, interval_seconds: float) -> None:
        self._poller = asyncio.create_task(self._poll_forever(interval_seconds), name="model-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def index(self) -> list[ModelStatus]:
        """Every model folder (loaded or not) and every model still serving, by name."""
        names = set(await asyncio.to_thread(_folder_names, self.root))
        statuses = self.repository.statuses()
        names |= set(statuses)
        return [
            statuses.get(name, ModelStatus(name=name, reason="not loaded"))
            for name in sorted(names)
        ]

    async def load(self, name: str) -> ModelStatus:
        """Load what the folder selects; versions already serving and unchanged stay."""
        self._check_explicit("load")
        return await self._change(name, force=False)

    async def reload(self, name: str) -> ModelStatus:
        self._check_explicit("reload")
        return await self._change(name, force=True)

    async def unload(self, name: str) -> ModelStatus:
        self._check_explicit("unload")
        _check_name(name)
        async with self._lock:
            known = self._known.get(name)
            if known is None and not (self.root / name).is_dir():
                raise ModelNotFound(f"no model named {name!r} in the repository")
            if known is None:
                known = self._known[name] = _Known()
            known.unloaded = True
            known.served = {}
            retired = self.repository.publish(name, {})
            self.repository.set_status(
                ModelStatus(
                    name=name,
                    versions=tuple(
                        VersionStatus(model.version, VersionState.UNLOADING) for model in retired
                    ),
                    reason=UNLOADED,
                )
            )
            await self._notify(name)
            versions = sorted(model.version for model in retired)
            await self._retire(retired)
            del retired  # the last references: the sessions' memory goes with them
            status = ModelStatus(
                name=name,
                versions=tuple(
                    VersionStatus(version, VersionState.UNAVAILABLE, UNLOADED)
                    for version in versions
                ),
                reason=UNLOADED,
            )
            self.repository.set_status(status)
            if versions:
                logger.info("model %s unloaded", name, extra={"model": name})
            return status

    async def poll(self) -> None:
        """One rescan: new, changed and removed models and versions."""
        names = set(await asyncio.to_thread(_folder_names, self.root))
        async with self._lock:
            for name in sorted(names | set(self._known) | set(self.repository.names())):
                try:
                    await self._sync(name, force=False, notify=True)
                except Exception:  # one model's surprise must not stop the others' updates
                    logger.exception("model %s: the repository scan failed", name)

    async def _poll_forever(self, interval_seconds: float) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.poll()
            except Exception:  # an unreadable folder now must not end polling for good
                logger.exception("the repository scan of %s failed", self.root)

    def _check_explicit(self, action: str) -> None:
        if self.mode is not ControlMode.EXPLICIT:
            raise FailedPrecondition(
                f"cannot {action} models: the server runs with --model-control "
                f"{self.mode.value}; start it with --model-control explicit"
            )

    async def _change(self, name: str, *, force: bool) -> ModelStatus:
        _check_name(name)
        async with self._lock:
            if not (self.root / name).is_dir():
                raise ModelNotFound(f"no model folder named {name!r} in the repository")
            known = self._known.get(name)
            if known is not None:
                known.unloaded = False
            await self._sync(name, force=force, notify=True)
            status = self.repository.statuses().get(name, ModelStatus(name=name))
            if status.state is not VersionState.READY:
                raise FailedPrecondition(
                    f"model {name!r} did not load: {_describe(status)} (the server log says why)"
                )
            failed = [
                v.version
                for v in status.versions
                if v.state is VersionState.UNAVAILABLE and v.reason not in (NOT_SELECTED, UNLOADED)
            ]
            if failed:
                raise FailedPrecondition(
                    f"model {name!r}: version(s) {', '.join(map(str, failed))} did not load; "
                    "the versions that served before still serve (the server log says why)"
                )
            return status

    async def _sync(self, name: str, *, force: bool, notify: bool) -> None:
        """Bring one model to what its folder holds; call with the lock held.

        Without a config change, versions are added and removed one by one. A changed
        config (or ``force``) reloads the model as a whole: every selected version
        loads under it, or, if any fails, the versions that served keep serving.
        """
        known = self._known.get(name)
        if known is not None and known.unloaded:
            return
        folder = await asyncio.to_thread(_read_folder, self.root / name)
        if folder is None:
            await self._remove(name)
            return
        if known is None:
            known = self._known[name] = _Known()
        config = await self._current_config(folder, known)
        if config is None:
            if notify:
                await self._notify(name)
            return
        whole_model = force or config is not known.config
        known.config, known.config_stamp = config, folder.config_stamp
        # A version folder whose model.onnx is not there yet is one being written.
        wanted = config.version_policy.select(
            [version for version, stamp in folder.versions.items() if stamp is not None]
        )
        serving = self.repository.serving(name)
        policy = config.version_policy
        self._check_something_selected(name, folder, config, wanted, known)
        next_versions: dict[int, LoadedModel] = {}
        loaded_now: dict[int, tuple[LoadedModel, Stamp | None]] = {}
        failed: dict[int, str] = {}
        # Latest N: older versions stand in, newest first, for selected ones that fail.
        stand_ins = [
            v
            for v, stamp in sorted(folder.versions.items(), reverse=True)
            if v not in wanted and stamp is not None
        ]
        candidates = sorted(wanted, reverse=True)
        while candidates:
            version = candidates.pop(0)
            stamp = folder.versions[version]
            previous = known.failed.get(version)
            if not whole_model and version in serving and known.served.get(version) == stamp:
                next_versions[version] = serving[version]
            elif (
                not force and previous is not None and previous[:2] == (folder.config_stamp, stamp)
            ):
                failed[version] = previous[2]
            else:
                self._set_status(name, folder, config, serving, failed, loading=[version])
                loaded = await self._load_version(name, version, config, folder, known)
                if isinstance(loaded, str):
                    failed[version] = loaded
                else:
                    loaded_now[version] = (loaded, stamp)
            short = len(next_versions) + len(loaded_now) < policy.num_versions
            if not candidates and failed and policy.kind == "latest" and short and stand_ins:
                candidates.append(stand_ins.pop(0))
        if not loaded_now and next_versions.keys() == serving.keys():
            self._set_status(name, folder, config, serving, failed)
            return
        discarded: list[LoadedModel] = []
        if failed and whole_model and serving:
            # A model reloads as a whole or not at all: one config, one set of versions.
            discarded = [model for model, _ in loaded_now.values()]
            next_versions = dict(serving)
        else:
            next_versions.update({version: model for version, (model, _) in loaded_now.items()})
            if failed and policy.kind != "latest":
                # What served stays, so a bad new version costs nothing that worked.
                for version, model in serving.items():
                    if version not in next_versions and version in folder.versions:
                        next_versions[version] = model
        retired = self.repository.publish(name, next_versions)
        stamps = {version: stamp for version, (_, stamp) in loaded_now.items()}
        known.served = {
            version: stamps[version]
            if version in stamps and not discarded
            else known.served.get(version)
            for version in next_versions
        }
        self._set_status(name, folder, config, next_versions, failed, unloading=retired)
        if not self.repository.loading:  # start-up logs each loaded version once, itself
            self._log_swap(name, serving, next_versions)
        if notify:
            await self._notify(name)
        await self._retire([*retired, *discarded])
        self._set_status(name, folder, config, next_versions, failed)

    def _check_something_selected(
        self, name: str, folder: _Folder, config: ModelConfig, wanted: list[int], known: _Known
    ) -> None:
        """A model with no version to serve is a failure, logged once per state of its folder."""
        path = self.root / name
        if wanted:
            known.nothing_selected = None
            self.repository.clear_failure(name, path)
            return
        reason = (
            "no numbered version folders with a model.onnx"
            if not any(stamp is not None for stamp in folder.versions.values())
            else "the version policy selects none of the version folders"
        )
        state = (folder.config_stamp, tuple(sorted(folder.versions)))
        if known.nothing_selected != state and not self.repository.serving(name):
            known.nothing_selected = state
            log_failure(name, path, reason, self._metrics)
            self.repository.record_failure(LoadFailure(model=name, path=path, reason=reason))

    async def _load_version(
        self, name: str, version: int, config: ModelConfig, folder: _Folder, known: _Known
    ) -> LoadedModel | str:
        """The loaded version, or why it failed (logged, counted, kept for the index)."""
        path = self.root / name / str(version) / MODEL_FILE
        batching = batching_in_force(config.batching, self._default_batching)
        try:
            loaded = await asyncio.to_thread(
                load_model, path, config, version, self._runtime_options, batching, self._metrics
            )
        except (ModelLoadError, OSError) as exc:
            reason = str(exc)
            known.failed[version] = (folder.config_stamp, folder.versions[version], reason)
            log_failure(name, path, reason, self._metrics)
            self.repository.record_failure(LoadFailure(model=name, path=path, reason=reason))
            return reason
        known.failed.pop(version, None)
        self.repository.clear_failure(name, path)
        return loaded

    async def _current_config(self, folder: _Folder, known: _Known) -> ModelConfig | None:
        """The folder's config, parsed again only when its file changed; None when unusable."""
        if known.config is not None and known.config_stamp == folder.config_stamp:
            return known.config
        if folder.config_file is None:
            path, reason = self.root / folder.name, "no config.json or config.yaml"
            if not self.repository.loading and known.config is None:
                # A folder that appeared since start-up: training writes the config last, so
                # this is most likely a model being written. The index says so; no alarm.
                self.repository.set_status(ModelStatus(name=folder.name, reason=reason + " yet"))
                return None
        else:
            try:
                config = await asyncio.to_thread(load_model_config, folder.config_file)
            except ConfigError as exc:
                path, reason = folder.config_file, str(exc)
            else:
                known.config_failure = None
                self.repository.clear_failure(folder.name, folder.config_file)
                self.repository.clear_failure(folder.name, self.root / folder.name)
                # Training rewrites the config with every version, mostly unchanged: the
                # same content must not reload the versions that serve.
                if config == known.config:
                    known.config_stamp = folder.config_stamp
                    return known.config
                return config
        if known.config_failure != (folder.config_stamp, reason):
            known.config_failure = (folder.config_stamp, reason)
            log_failure(folder.name, path, reason, self._metrics)
            self.repository.record_failure(LoadFailure(model=folder.name, path=path, reason=reason))
        current = self.repository.statuses().get(folder.name, ModelStatus(name=folder.name))
        serving = self.repository.serving(folder.name)
        kept = "; the versions that served before still serve" if serving else ""
        self.repository.set_status(
            ModelStatus(name=folder.name, versions=current.versions, reason=reason + kept)
        )
        return None

    async def _remove(self, name: str) -> None:
        """The folder is gone: stop serving the model and forget it."""
        self._known.pop(name, None)
        retired = self.repository.publish(name, {})
        self.repository.forget(name)
        if retired:
            logger.info("model %s: its folder is gone, unloading it", name, extra={"model": name})
        await self._notify(name)
        await self._retire(retired)

    def _set_status(
        self,
        name: str,
        folder: _Folder,
        config: ModelConfig,
        serving: dict[int, LoadedModel],
        failed: dict[int, str],
        *,
        loading: Sequence[int] = (),
        unloading: Sequence[LoadedModel] = (),
    ) -> None:
        states: dict[int, VersionStatus] = {}
        for version, stamp in folder.versions.items():
            reason = NOT_SELECTED if stamp is not None else f"no {MODEL_FILE} (yet)"
            states[version] = VersionStatus(version, VersionState.UNAVAILABLE, reason)
        for model in unloading:
            states[model.version] = VersionStatus(model.version, VersionState.UNLOADING)
        for version, reason in failed.items():
            states[version] = VersionStatus(version, VersionState.UNAVAILABLE, reason)
        for version in serving:
            states[version] = VersionStatus(version, VersionState.READY)
        for version in loading:
            if version not in serving:
                states[version] = VersionStatus(version, VersionState.LOADING)
        reason = ""
        if not any(stamp is not None for stamp in folder.versions.values()):
            reason = "no numbered version folders with a model.onnx"
        elif not config.version_policy.select(list(folder.versions)):
            reason = "the version policy selects none of the version folders"
        self.repository.set_status(
            ModelStatus(name=name, versions=tuple(states[v] for v in sorted(states)), reason=reason)
        )

    async def _retire(self, models: Sequence[LoadedModel]) -> None:
        """Wait for the calls holding each model, then release its batcher and session."""
        if not models:
            return
        for model in models:
            await model.usage.wait_idle()
            await model.batcher.close()
            if self._metrics is not None and model.version not in self.repository.versions(
                model.name
            ):
                self._metrics.model_unloaded(model.name, str(model.version))
        # ``serve`` froze what startup loaded; the collector must see a retired model's
        # objects again, or any reference cycles among them would never be freed.
        gc.unfreeze()

    async def _notify(self, name: str) -> None:
        if self._on_serving_changed is not None and not self.repository.loading:
            await self._on_serving_changed(name, bool(self.repository.versions(name)))

    def _log_swap(
        self, name: str, before: dict[int, LoadedModel], after: dict[int, LoadedModel]
    ) -> None:
        added = sorted(v for v, m in after.items() if before.get(v) is not m)
        removed = sorted(v for v, m in before.items() if after.get(v) is not m)
        if added or removed:
            newest = max(after) if after else None
            logger.info(
                "model %s: serving versions %s (loaded %s, unloaded %s); unpinned calls go to %s",
                name,
                sorted(after) or "none",
                added or "none",
                removed or "none",
                newest if newest is not None else "none",
                extra={"model": name, "versions": [str(v) for v in sorted(after)]},
            )


def _check_name(name: str) -> None:
    # Also keeps "../x" and "/etc" from naming folders outside the repository.
    # The length bound keeps a huge name from reaching the file system (ENAMETOOLONG).
    if len(name) > MAX_NAME_LENGTH or not MODEL_NAME_PATTERN.match(name):
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise InvalidInput(f"{shown!r} is not a model name ({MODEL_NAME_PATTERN.pattern})")


def _describe(status: ModelStatus) -> str:
    parts = [
        f"{v.version} {v.state.value}" + (f": {v.reason}" if v.reason else "")
        for v in status.versions
    ]
    if status.reason:
        parts.insert(0, status.reason)
    return "; ".join(parts) or status.state.value


def _folder_names(root: Path) -> list[str]:
    return [path.name for path in model_folders(root)]


def _stamp(path: Path) -> Stamp | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def _read_folder(model_dir: Path) -> _Folder | None:
    if not model_dir.is_dir():
        return None
    config_file = find_config_file(model_dir)
    return _Folder(
        name=model_dir.name,
        config_file=config_file,
        config_stamp=None if config_file is None else _stamp(config_file),
        versions={
            version: _stamp(model_dir / str(version) / MODEL_FILE)
            for version in model_versions(model_dir)
        },
    )
