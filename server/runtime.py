"""One onnxruntime session per model version: load, check against the config, warm up, run.

The graph must take uint8 NHWC ``[batch, H, W, 3]`` (any dimension may be symbolic)
and return float32 ``[batch, output_width]``; anything else is refused at load with
a ``ModelLoadError`` that says what differs, so a mismatched export never serves.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .cpus import in_lowered_thread
from .model_config import ModelConfig
from .tasks import serving_task

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(Exception):
    """A model file that cannot serve; the message says why."""


@dataclass(frozen=True)
class RuntimeOptions:
    # ("auto",) is CUDA then CPU among the providers this onnxruntime build has.
    providers: tuple[str, ...] = ("auto",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # Idle intra-op threads busy-wait for the next parallel region (onnxruntime's default).
    allow_spinning: bool = True
    # How far below the event loop the model's threads run (cpus.lower_this_thread).
    model_niceness: int = 0
    # On the CPU provider with 2+ intra-op threads: also one single-thread session per
    # intra-op thread, for the batcher's lanes (batching.Batcher).
    cpu_lanes: bool = False


class _ProviderProbe:
    """Remembers that CUDA failed once, so later sessions skip the noisy retry."""

    cuda_failed = False


@functools.cache
def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: onnxruntime-gpu lists CUDA even without one."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_providers(requested: Sequence[str]) -> list[str]:
    available = ort.get_available_providers()
    if tuple(requested) == ("auto",):
        # Without a driver, asking onnxruntime for CUDA only prints a loud failure first.
        try_cuda = cuda_driver_present() and not _ProviderProbe.cuda_failed
        preferred = [CUDA, CPU] if try_cuda else [CPU]
        return [name for name in preferred if name in available]
    missing = [name for name in requested if name not in available]
    if missing:
        raise ModelLoadError(
            f"provider(s) {', '.join(missing)} not in this onnxruntime "
            f"(available: {', '.join(available)})"
        )
    return list(requested)


def lane_count(options: RuntimeOptions, providers: Sequence[str]) -> int:
    """Single-thread lane sessions a model gets: one per intra-op thread where lanes are on,
    the model runs on the CPU provider alone and has 2+ intra-op threads; else none."""
    if options.cpu_lanes and list(providers) == [CPU] and options.intra_op_threads > 1:
        return options.intra_op_threads
    return 0


class ModelRuntime:
    """A loaded, checked and warmed-up model; ``run`` is safe from several threads.

    With ``cpu_lanes``, ``lane_runs`` run the model on one thread each, in sessions of
    their own: the batcher runs them side by side under load and ``run`` (all threads)
    for a lone request.
    """

    def __init__(self, path: Path, config: ModelConfig, options: RuntimeOptions) -> None:
        self.path = path
        self.config = config
        providers = choose_providers(options.providers)
        lanes = lane_count(options, providers)
        self._session = self._open(
            path, providers, options, options.intra_op_threads, stop_spinning=lanes > 0
        )
        # Lane sessions have no pool threads, so spinning does not apply to them.
        self._lanes = [
            self._open(path, providers, options, 1, stop_spinning=False) for _ in range(lanes)
        ]
        self.lane_runs: tuple[Callable[[np.ndarray], np.ndarray], ...] = tuple(
            functools.partial(self._run_on, lane) for lane in self._lanes
        )
        self.provider: str = self._session.get_providers()[0]
        if CUDA in providers and self.provider != CUDA:
            _ProviderProbe.cuda_failed = True
        # Per task (see visionrpc.server.tasks): classes, or two coordinates per point.
        self.output_width = serving_task(config.task).output_width(config)
        self._input_name = self._check_input()
        self._check_output()
        self.warmup_seconds = 0.0
        # Seconds per image row in the warm-up: the retry hints' estimate until batches run.
        self.warmup_row_seconds = 0.0

    @staticmethod
    def _open(
        path: Path,
        providers: list[str],
        options: RuntimeOptions,
        threads: int,
        *,
        stop_spinning: bool,
    ) -> ort.InferenceSession:
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = options.inter_op_threads
        spinning = "1" if options.allow_spinning else "0"
        session_options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session_options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        if stop_spinning:
            # Beside lanes: its pool threads would otherwise spin on after a run, holding
            # cores that the lanes started next need.
            session_options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            # Created in a lowered thread, so onnxruntime's pool threads inherit its nice.
            return in_lowered_thread(
                options.model_niceness,
                lambda: ort.InferenceSession(
                    str(path), sess_options=session_options, providers=providers
                ),
            )
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` in, float32 ``[N, output_width]`` out."""
        return self._run_on(self._session, batch)

    def _run_on(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        outputs = session.run(None, {self._input_name: batch})
        return np.asarray(outputs[0], dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run zero batches once per size (first runs allocate and pick kernels), on the
        lanes too; the timing is the all-thread session's."""
        sizes = sorted(set(batch_sizes))
        started = time.perf_counter()
        for size in sizes:
            self._warm_run(self.run, size)
        self.warmup_seconds = time.perf_counter() - started
        self.warmup_row_seconds = self.warmup_seconds / max(1, sum(sizes))
        for lane in self.lane_runs:
            for size in sizes:
                self._warm_run(lane, size)

    def _warm_run(self, run: Callable[[np.ndarray], np.ndarray], size: int) -> None:
        spec = self.config.input
        try:
            outputs = run(np.zeros((size, spec.height, spec.width, 3), dtype=np.uint8))
        except Exception as exc:  # e.g. a batch size fixed inside a "dynamic" graph
            raise ModelLoadError(
                f"{self.path}: fails on a batch of {size} zero images: {exc}"
            ) from exc
        expected = (size, self.output_width)
        if outputs.shape != expected:
            raise ModelLoadError(
                f"{self.path}: returned shape {outputs.shape} for a batch of {size}, "
                f"expected {expected} ({self.config.task} with {len(self.config.labels)} "
                "labels)"
            )

    def _check_input(self) -> str:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{self.path}: needs exactly one input, has {len(inputs)}")
        graph_input = inputs[0]
        if graph_input.type != "tensor(uint8)":
            raise ModelLoadError(
                f"{self.path}: input {graph_input.name!r} is {graph_input.type}, "
                "expected tensor(uint8) NHWC images"
            )
        spec = self.config.input
        expected = (None, spec.height, spec.width, 3)
        if not _shape_matches(graph_input.shape, expected):
            raise ModelLoadError(
                f"{self.path}: input shape {graph_input.shape} does not fit "
                f"[batch, {spec.height}, {spec.width}, 3] from the config"
            )
        return str(graph_input.name)

    def _check_output(self) -> None:
        output = self._session.get_outputs()[0]
        if output.type != "tensor(float)":
            raise ModelLoadError(f"{self.path}: output is {output.type}, expected tensor(float)")
        if not _shape_matches(output.shape, (None, self.output_width)):
            raise ModelLoadError(
                f"{self.path}: output shape {output.shape} does not fit "
                f"[batch, {self.output_width}] ({self.config.task} with "
                f"{len(self.config.labels)} labels)"
            )


def _shape_matches(shape: Sequence[Any], expected: Sequence[int | None]) -> bool:
    """Symbolic or unknown dimensions match anything; None in ``expected`` is any size."""
    if len(shape) != len(expected):
        return False
    return all(
        want is None or not isinstance(have, int) or have == want
        for have, want in zip(shape, expected, strict=True)
    )
