"""ONNX export with a forward check against PyTorch, then the repository entry.

The exported graph follows the repository contract (visionrpc.server.model_config): uint8
NHWC in with a dynamic batch axis; /255, mean/std, layout and the task's activation inside.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from visionrpc.server.model_config import (
    InputSpec,
    ModelConfig,
    TrainingSummary,
    TTAConfig,
    write_repository_entry,
)

from .models import Normalized, ServingModel, VisionModel
from .tasks import Task

INPUT_NAME = "images"
OUTPUT_NAME = "outputs"
OPSET = 17
# Probabilities and [-1, 1] points: float32 differences between runtimes stay far below this.
PARITY_TOLERANCE = 1e-4


class ExportParityError(RuntimeError):
    """onnxruntime and PyTorch disagree on the same inputs."""


def serving_model(model: VisionModel, task: Task) -> ServingModel:
    """A CPU copy of the model in eval mode, wrapped to take uint8 NHWC."""
    return ServingModel(Normalized(copy.deepcopy(model)), task.activation).cpu().eval()


def export_onnx(serving: ServingModel, spec: InputSpec, path: Path) -> Path:
    example = torch.zeros(2, spec.height, spec.width, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter: it writes one self-contained file with a symbolic batch axis.
    torch.onnx.export(
        serving,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def check_parity(
    onnx_file: Path,
    serving: ServingModel,
    batches: Iterable[Tensor],
    tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Run both on the same uint8 batches; returns the largest difference or raises."""
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    worst = 0.0
    checked = 0
    with torch.no_grad():
        for images in batches:
            expected = serving(images).numpy()
            (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
            if actual.shape != expected.shape:
                raise ExportParityError(
                    f"{onnx_file}: output shape {actual.shape}, PyTorch gives {expected.shape}"
                )
            worst = max(worst, float(np.abs(actual - expected).max()))
            checked += len(images)
    if checked == 0:
        raise ExportParityError("no batches to check the export on")
    if not worst <= tolerance:
        raise ExportParityError(
            f"{onnx_file}: onnxruntime differs from PyTorch by up to {worst:.3g} "
            f"on {checked} validation images (tolerance {tolerance:g})"
        )
    return worst


def build_config(
    *,
    name: str,
    task: Task,
    labels: Sequence[str],
    spec: InputSpec,
    threshold: float,
    metrics: Mapping[str, float],
    dataset: str,
    dataset_kind: str,
    dataset_options: Mapping[str, str | int | float],
    arch: str,
) -> ModelConfig:
    return ModelConfig(
        name=name,
        task=task.name,
        labels=tuple(labels),
        input=spec,
        threshold=threshold,
        top_k=min(5, len(labels)),
        tta=TTAConfig(enabled=False, views=("flip",)),
        training=TrainingSummary(
            dataset=dataset,
            dataset_kind=dataset_kind,
            dataset_options=dict(dataset_options),
            trained_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            arch=arch,
            metrics=dict(metrics),
        ),
    )


def export_to_repository(
    repository: Path,
    config: ModelConfig,
    serving: ServingModel,
    check_batches: Iterable[Tensor],
    work_dir: Path,
) -> Path:
    """Export, check against PyTorch, and add the model as a new version; returns its folder."""
    onnx_file = export_onnx(serving, config.input, work_dir / "model.onnx")
    check_parity(onnx_file, serving, check_batches)
    return write_repository_entry(repository, config, onnx_file)
