"""``visionrpc quantize``: a statically quantized int8 version of a model, checked first.

    visionrpc quantize --repository models --model pets [--data DIR] [--max-drop 0.01]

Reads the newest (or ``--version``) float version, calibrates activation ranges on
training images (onnxruntime's ``quantize_static``: QDQ format, int8 weights per output
channel, uint8 activations, min/max calibration), then scores the float and the int8
model on the validation split through the server's own preprocessing and prints both
metrics side by side. The int8 model becomes the next version (the server serves it like
any other) only when its metric is at most ``--max-drop`` worse (default one point:
0.01 for error_rate and accuracy_multi, 1 px for point_error_px), unless ``--force``.

The dataset and its split come from the model config's training summary (what training used);
``--data`` and ``--kind`` override them. ``visionrpc train ... --quantize int8`` runs the
same steps on the version it has just written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .kinds import KINDS

if TYPE_CHECKING:
    import numpy as np

    from visionrpc.server.model_config import ModelConfig

    from .datasets import Dataset

# The metric each task is judged by, and whether larger is better.
PRIMARY_METRIC = {
    "classification": ("error_rate", False),
    "multilabel": ("accuracy_multi", True),
    "points": ("point_error_px", False),
}
DEFAULT_MAX_DROP = {"error_rate": 0.01, "accuracy_multi": 0.01, "point_error_px": 1.0}
CALIBRATION_IMAGES = 128
BATCH = 16
QUANTIZATION_FILE = "quantization.json"


class QuantizationError(Exception):
    """A model or dataset that cannot be quantized as asked; the message says why."""


@dataclass(frozen=True)
class QuantizationResult:
    metric: str
    float_value: float
    int8_value: float
    max_drop: float
    # How much worse int8 is, in the metric's units (negative: better).
    drop: float
    # The new version's folder; None when the drop refused it.
    version_dir: Path | None
    source_version: int


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``quantize`` to the ``visionrpc`` parser."""
    parser = subcommands.add_parser(
        "quantize",
        help="add an int8 version of a model, if its validation metric holds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--model", required=True, help="model name in the repository")
    parser.add_argument("--version", type=int, help="float version to quantize (default newest)")
    parser.add_argument("--data", type=Path, help="dataset root (default: training's)")
    parser.add_argument("--kind", choices=tuple(KINDS), help="dataset kind")
    add_quantize_options(parser)
    parser.set_defaults(handler=_run)


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """The options ``quantize`` and ``train --quantize`` share."""
    parser.add_argument(
        "--max-drop", type=float,
        help="largest metric loss that still publishes (default 0.01 for rates, 1 px for points)",
    )  # fmt: skip
    parser.add_argument(
        "--calibration-images", type=int, default=CALIBRATION_IMAGES,
        help=f"training images that calibrate activation ranges (default {CALIBRATION_IMAGES})",
    )  # fmt: skip
    parser.add_argument(
        "--force", action="store_true", help="publish the int8 version whatever its metric"
    )


def _run(args: argparse.Namespace) -> int:
    from visionrpc.server.model_config import ConfigError

    from .datasets import DatasetError

    try:
        result = quantize_version(
            args.repository,
            args.model,
            version=args.version,
            data=args.data,
            kind=args.kind,
            max_drop=args.max_drop,
            calibration_images=args.calibration_images,
            force=args.force,
        )
    except (QuantizationError, DatasetError, ConfigError) as exc:
        print(f"visionrpc quantize: {exc}", file=sys.stderr)
        return 1
    return 0 if result.version_dir is not None else 1


def quantize_version(
    repository: Path,
    model: str,
    *,
    version: int | None = None,
    data: Path | None = None,
    kind: str | None = None,
    max_drop: float | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    force: bool = False,
    dataset: Dataset | None = None,
) -> QuantizationResult:
    """Quantize one version of ``model``; prints the metrics, publishes if they hold."""
    from visionrpc.server.model_config import (
        MODEL_FILE,
        find_config_file,
        load_model_config,
        model_versions,
    )

    model_dir = repository / model
    config_file = find_config_file(model_dir) if model_dir.is_dir() else None
    if config_file is None:
        raise QuantizationError(f"no model {model!r} in {repository}")
    config = load_model_config(config_file)
    versions = model_versions(model_dir)
    source = versions[-1] if version is None and versions else version
    if source is None or source not in versions:
        raise QuantizationError(f"{model} has no version {source} (versions: {versions})")
    float_file = model_dir / str(source) / MODEL_FILE
    if (model_dir / str(source) / QUANTIZATION_FILE).exists():
        raise QuantizationError(f"{model} version {source} is int8 already; name a float one")
    if dataset is None:
        dataset = _dataset_of(model_dir / str(source), config, data, kind)
    metric, _ = PRIMARY_METRIC[config.task]
    allowed = DEFAULT_MAX_DROP[metric] if max_drop is None else max_drop
    with tempfile.TemporaryDirectory(prefix="visionrpc-quantize-") as work:
        int8_file = Path(work) / MODEL_FILE
        items = dataset.train[:calibration_images] or dataset.valid[:calibration_images]
        if not items:
            raise QuantizationError("the dataset has no images to calibrate on")
        quantize_file(float_file, int8_file, _batches([item.path for item in items], config))
        float_value = validation_metric(float_file, config, dataset)
        int8_value = validation_metric(int8_file, config, dataset)
        result = _judge(config.task, float_value, int8_value, allowed, source)
        _print_comparison(model, result)
        if result.drop > allowed and not force:
            print(
                f"not published: int8 loses {result.drop:.4f} {metric}, more than "
                f"--max-drop {allowed:g}; --force publishes it anyway",
                file=sys.stderr,
            )
            return result
        version_dir = _publish(repository, config, int8_file, result, calibration_images)
    print(f"wrote {version_dir}")
    return dataclasses.replace(result, version_dir=version_dir)


def quantize_file(float_file: Path, int8_file: Path, calibration: Iterable[np.ndarray]) -> None:
    """Static QDQ int8 quantization of ``float_file``, calibrated on uint8 NHWC batches."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_file.with_name("prepared.onnx")
    # Folds constants and infers shapes so the quantizer sees every tensor's type.
    quant_pre_process(str(float_file), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(int8_file),
        _Calibration(iter(calibration), _input_name(float_file)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # uint8 activations with int8 weights: the pairing VNNI's dot products take.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # The convolutions and matrix products are the work; the preprocessing at the
        # front and the activation at the end stay float, so scores keep their resolution.
        op_types_to_quantize=["Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool"],
        calibrate_method=CalibrationMethod.MinMax,
    )


def validation_metric(model_file: Path, config: ModelConfig, dataset: Dataset) -> float:
    """The task's primary metric on the validation split, decoded as the server decodes."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from visionrpc.server.preprocess import input_geometry

    from .data import PreparedItems
    from .tasks import get_task

    if not dataset.valid:
        raise QuantizationError("the dataset has no validation images to compare on")
    task = get_task(config.task)
    items = PreparedItems(dataset.valid, config.input, config.task, len(config.labels), cache=False)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs, targets = [], []
    for start in range(0, len(items), BATCH):
        examples = [items[i] for i in range(start, min(start + BATCH, len(items)))]
        pixels = np.stack([image.numpy() for image, _ in examples])
        outputs.append(torch.from_numpy(session.run(None, {name: pixels})[0]))
        targets.append(torch.stack([target for _, target in examples]))
    geometries = [input_geometry(item.path.read_bytes(), config.input) for item in dataset.valid]
    evaluation = task.evaluate(torch.cat(outputs), torch.cat(targets), geometries, dataset.vocab)
    metric, _ = PRIMARY_METRIC[config.task]
    return float(evaluation.metrics[metric])


class _Calibration:
    """onnxruntime's CalibrationDataReader: one input feed per call, None at the end."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str) -> None:
        self._batches = batches
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def _batches(paths: Sequence[Path], config: ModelConfig) -> Iterator[np.ndarray]:
    import numpy as np

    from visionrpc.server.preprocess import decode_for_model, prepare

    for start in range(0, len(paths), BATCH):
        yield np.stack(
            [
                prepare(decode_for_model(path.read_bytes(), config.input), config.input)[0]
                for path in paths[start : start + BATCH]
            ]
        )


def _input_name(model_file: Path) -> str:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return str(session.get_inputs()[0].name)


def _dataset_of(
    version_dir: Path, config: ModelConfig, data: Path | None, kind: str | None
) -> Dataset:
    """The dataset and split training used, from the model config; flags override them."""
    from .datasets import read_dataset
    from .kinds import kind_of_task

    training = config.training
    kind = kind or training.dataset_kind or kind_of_task(config.task)
    options = dict(training.dataset_options) if kind == training.dataset_kind else {}
    data = data or (Path(training.dataset) if training.dataset else None)
    if data is None:
        raise QuantizationError(f"{version_dir}: its config names no dataset folder: pass --data")
    return read_dataset(kind, data, **options)


def _judge(
    task: str, float_value: float, int8_value: float, allowed: float, source: int
) -> QuantizationResult:
    metric, larger_is_better = PRIMARY_METRIC[task]
    drop = float_value - int8_value if larger_is_better else int8_value - float_value
    return QuantizationResult(metric, float_value, int8_value, allowed, drop, None, source)


def _print_comparison(model: str, result: QuantizationResult) -> None:
    print(f"{model} version {result.source_version}, validation {result.metric}:")
    print(f"  {'float32':>10} {'int8':>10} {'drop':>10} {'max drop':>10}")
    print(
        f"  {result.float_value:>10.4f} {result.int8_value:>10.4f} "
        f"{result.drop:>+10.4f} {result.max_drop:>10g}"
    )


def _publish(
    repository: Path,
    config: ModelConfig,
    int8_file: Path,
    result: QuantizationResult,
    calibration_images: int,
) -> Path:
    from visionrpc.server.model_config import write_repository_entry

    version_dir = write_repository_entry(repository, config, int8_file)
    record = {
        "format": "onnxruntime static QDQ: int8 per-channel weights, uint8 activations",
        "source_version": result.source_version,
        "calibration_images": calibration_images,
        "metric": result.metric,
        "float": result.float_value,
        "int8": result.int8_value,
        "max_drop": result.max_drop,
    }
    (version_dir / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return version_dir
