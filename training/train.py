"""Train a model end to end and add it to a model repository.

    visionrpc train pets --data ~/data/oxford-iiit-pet --repository models

reads the dataset, builds the loaders and the model, finds a learning rate when none is
given, fine-tunes (or trains from scratch without pretrained weights), evaluates, plots,
exports to ONNX, checks the export against PyTorch and writes the repository entry. Run
it under ``torchrun`` through visionrpc.training.distributed for several processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .augment import augment_batch, augment_for_task
from .config import TrainConfig, TrainConfigError
from .data import DataLoaders, make_loaders
from .datasets import Dataset, read_dataset
from .export import build_config, export_to_repository, serving_model
from .kinds import get_kind
from .learner import BatchTransform, Learner, LearnerOptions, LRFindResult, is_main_process
from .models import create_model, get_architecture, resolve_weights
from .plots import lr_find_curve
from .tasks import Evaluation, Task, get_task

PARITY_BATCHES = 4


@dataclass
class TrainResult:
    """What a run produced; ``version_dir`` is None on every process but the first."""

    metrics: dict[str, float]
    evaluation: Evaluation
    lr: float
    version_dir: Path | None
    lr_find: LRFindResult | None = None


@dataclass
class Session:
    """Everything a run needs, built once from a TrainConfig."""

    config: TrainConfig
    dataset: Dataset
    loaders: DataLoaders
    task: Task
    learner: Learner
    pretrained: bool


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # torchrun numbers the processes on each machine; each takes its own GPU.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def open_session(config: TrainConfig) -> Session:
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    weights_file = resolve_weights(config.arch_name, config.weights)
    dataset = read_dataset(config.kind, config.data, **config.reader_options())
    size = input_size(config)
    loaders = make_loaders(
        dataset,
        size=size,
        presize=config.presize,
        bs=config.bs,
        resize_method=config.resize_method,
        num_workers=config.num_workers,
        seed=config.seed,
        distributed=dist.is_initialized(),
    )
    task = get_task(dataset.task)
    if config.mixup and not task.supports_mixup:
        raise TrainConfigError(f"--mixup does not apply to the {task.name} task")
    if config.label_smoothing and task.name != "classification":
        raise TrainConfigError("--label-smoothing applies to classification only")
    model = create_model(config.arch_name, task.n_outputs(len(dataset.vocab)), weights_file)
    learner = Learner(
        model,
        loaders,
        task,
        device=device,
        augment=_augmenter(config, dataset.task, size),
        options=LearnerOptions(
            label_smoothing=config.label_smoothing,
            mixup=config.mixup,
            mixed_precision=config.mixed_precision,
            cpu_bf16=config.cpu_bf16,
            quiet=config.quiet,
        ),
        seed=config.seed,
    )
    return Session(config, dataset, loaders, task, learner, pretrained=weights_file is not None)


def find_lr(session: Session) -> LRFindResult:
    """lr_find in the state training starts from: the body frozen when it is pretrained."""
    if session.pretrained and session.config.freeze_epochs:
        session.learner.model.freeze_body()
    result = session.learner.lr_find()
    session.learner.model.unfreeze()
    return result


def train(config: TrainConfig) -> TrainResult:
    session = open_session(config)
    learner = session.learner
    found: LRFindResult | None = None
    if config.lr is None:
        found = find_lr(session)
        lr = found.suggestion
    else:
        lr = config.lr
    learner.log(f"{config.kind}: {config.arch_name}, lr {lr:.2e}, {_data_summary(session)}")
    if session.pretrained:
        learner.fine_tune(config.epochs, lr, freeze_epochs=config.freeze_epochs)
    else:
        # A random body has nothing worth protecting by freezing it.
        learner.fit_one_cycle(config.epochs, lr)
    predictions = learner.predict(session.loaders.valid)
    evaluation = session.task.evaluate(
        predictions.outputs,
        predictions.targets,
        session.loaders.valid_geometries,
        session.dataset.vocab,
    )
    metrics = {**evaluation.metrics, "valid_loss": predictions.loss}
    learner.log("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    for actual, predicted, count in evaluation.most_confused[:5]:
        learner.log(f"most confused: {actual} -> {predicted} ({count})")
    version_dir = None
    if is_main_process():
        version_dir = _publish(session, evaluation, metrics, predictions.outputs, found)
        learner.log(f"wrote {version_dir}")
    return TrainResult(metrics, evaluation, lr, version_dir, found)


def _publish(
    session: Session,
    evaluation: Evaluation,
    metrics: dict[str, float],
    outputs: Tensor,
    found: LRFindResult | None,
) -> Path:
    """Plots, checkpoint, export and repository entry; the first process only."""
    config, task = session.config, session.task
    model = session.learner.model
    model_config = build_config(
        name=config.model_name or config.kind,
        task=task,
        labels=session.dataset.vocab,
        spec=session.loaders.spec,
        threshold=evaluation.threshold,
        metrics=metrics,
        dataset=str(config.data),
        dataset_kind=config.kind,
        dataset_options={k: v for k, v in config.reader_options().items() if k != "strict"},
        arch=config.arch_name,
    )
    with tempfile.TemporaryDirectory(prefix="visionrpc-train-") as work:
        work_dir = Path(work)
        plot_dir = work_dir / "plots"
        images, targets = _first_valid_images(session.loaders, 16)
        task.plots(evaluation, images, outputs, targets, session.dataset.vocab, plot_dir)
        if found is not None:
            lr_find_curve(found.lrs, found.losses, found.suggestions, plot_dir / "lr_find.png")
        checkpoint = {
            **model.checkpoint(),
            "task": task.name,
            "labels": list(session.dataset.vocab),
            "input": dataclasses.asdict(session.loaders.spec),
            "train_config": _plain(dataclasses.asdict(config)),
            "metrics": metrics,
        }
        torch.save(checkpoint, work_dir / "checkpoint.pt")
        serving = serving_model(model, task)
        check_batches = (images for images, _ in session.loaders.valid)
        version_dir = export_to_repository(
            config.repository,
            model_config,
            serving,
            itertools.islice(check_batches, PARITY_BATCHES),
            work_dir,
        )
        shutil.move(str(plot_dir), version_dir / "plots")
        shutil.move(str(work_dir / "checkpoint.pt"), version_dir / "checkpoint.pt")
    return version_dir


def input_size(config: TrainConfig) -> tuple[int, int]:
    """``--size``, else the kind's default at the height the backbone was trained at."""
    if config.size is not None:
        return config.size
    height, width = get_kind(config.kind).default_size
    trained = get_architecture(config.arch_name).preprocessing.input_size
    if trained is None:
        return height, width
    # The kind's shape (BIWI's 4:3 keeps every head in view) at the backbone's scale.
    return trained[0], round(width * trained[0] / height)


def _augmenter(config: TrainConfig, task: str, size: tuple[int, int]) -> BatchTransform:
    try:
        augment_config = augment_for_task(
            task,
            size,
            min_scale=config.min_scale,
            max_rotate=config.max_rotate,
            max_lighting=config.max_lighting,
            max_warp=config.max_warp,
            max_zoom=config.max_zoom,
            flip_p=config.flip_p,
        )
    except ValueError as exc:
        raise TrainConfigError(f"augmentation: {exc}") from None
    # A few random numbers per image: drawn on the CPU, the same on any device.
    generator = torch.Generator()
    rank = dist.get_rank() if dist.is_initialized() else 0
    generator.manual_seed(config.seed + rank)

    def augment(images: Tensor, points: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return augment_batch(images, points, augment_config, generator)

    return augment


def _first_valid_images(loaders: DataLoaders, count: int) -> tuple[Tensor, Tensor]:
    images, targets = [], []
    for batch_images, batch_targets in loaders.valid:
        images.append(batch_images)
        targets.append(batch_targets)
        if sum(len(b) for b in images) >= count:
            break
    return torch.cat(images)[:count], torch.cat(targets)[:count]


def _data_summary(session: Session) -> str:
    dataset = session.dataset
    skipped = f", {len(dataset.skipped)} skipped" if dataset.skipped else ""
    return (
        f"{len(dataset.train)} train / {len(dataset.valid)} valid images, "
        f"{len(dataset.vocab)} labels{skipped}"
    )


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings, so the checkpoint loads with weights_only=True."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
