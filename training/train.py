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
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader

from visionrpc.server.model_config import TTAConfig
from visionrpc.server.views import parse_view

from . import plots
from .augment import augment_batch, augment_for_task
from .config import TrainConfig, TrainConfigError
from .data import DataLoaders, PreparedItems, make_loaders
from .datasets import Dataset, read_dataset
from .export import build_config, export_to_repository, serving_model
from .kinds import get_kind
from .learner import BatchTransform, Learner, LearnerOptions, LRFindResult, is_main_process
from .models import create_model, get_architecture, model_from_checkpoint, resolve_weights
from .plots import lr_find_curve
from .tasks import Evaluation, Task, accuracy_multi, get_task, top_losses

PARITY_BATCHES = 4
TOP_LOSSES = 9
# The TTA the exported config declares (export.build_config): what a served tta=True does.
TTA = TTAConfig(views=("flip",))


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
    # Continues an earlier run (--resume): its weights, trained unfrozen.
    resumed: bool = False


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
    resumed = _resumed_checkpoint(config)
    arch = resumed["arch"] if resumed else config.arch_name
    weights_file = None if resumed else resolve_weights(arch, config.weights)
    dataset = read_dataset(config.kind, config.data, **config.reader_options())
    size = input_size(config, arch)
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
    if resumed:
        if (resumed["task"], resumed["labels"]) != (task.name, list(dataset.vocab)):
            raise TrainConfigError(
                f"--resume {config.resume}: its model predicts {resumed['task']} of "
                f"{len(resumed['labels'])} labels, this {config.kind} dataset "
                f"{task.name} of {len(dataset.vocab)}"
            )
        model = model_from_checkpoint(resumed)
    else:
        model = create_model(arch, task.n_outputs(len(dataset.vocab)), weights_file)
    learner = Learner(
        model,
        loaders,
        task,
        device=device,
        augment=augmenter(config, dataset.task, size),
        options=LearnerOptions(
            label_smoothing=config.label_smoothing,
            mixup=config.mixup,
            mixed_precision=config.mixed_precision,
            cpu_bf16=config.cpu_bf16,
            quiet=config.quiet,
        ),
        seed=config.seed,
    )
    return Session(
        config,
        dataset,
        loaders,
        task,
        learner,
        pretrained=weights_file is not None,
        resumed=resumed is not None,
    )


def _resumed_checkpoint(config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` names, checked against the other options."""
    if config.resume is None:
        return None
    if config.weights is not None:
        raise TrainConfigError("--resume starts from its checkpoint: leave out --weights")
    try:
        checkpoint: dict[str, Any] = torch.load(
            config.resume, map_location="cpu", weights_only=True
        )
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise TrainConfigError(f"--resume {config.resume}: cannot read it: {exc}") from None
    if not {"arch", "n_out", "state_dict", "task", "labels"} <= set(checkpoint):
        raise TrainConfigError(
            f"--resume {config.resume}: not a visionrpc checkpoint.pt (pretrained weights go "
            "to --weights)"
        )
    if config.arch is not None and config.arch != checkpoint["arch"]:
        raise TrainConfigError(
            f"--resume {config.resume} holds a {checkpoint['arch']} model, not --arch {config.arch}"
        )
    return checkpoint


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
    arch = session.learner.model.arch
    resumed = f" (resumed from {config.resume})" if session.resumed else ""
    learner.log(f"{config.kind}: {arch}{resumed}, lr {lr:.2e}, {_data_summary(session)}")
    if session.resumed:
        # fastai's progressive resizing: the trained model goes on, unfrozen, at this size.
        learner.fine_tune(config.epochs, lr, freeze_epochs=0)
    elif session.pretrained:
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
    if config.tta:
        with_tta = tta_metrics(session, predictions.outputs, predictions.targets, evaluation)
        learner.log(
            f"validation with TTA (identity + {', '.join(TTA.views)}, beta {TTA.beta}): "
            + ", ".join(f"{k} {v:.4f}" for k, v in with_tta.items())
        )
        metrics.update({f"{name}_tta": value for name, value in with_tta.items()})
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
        arch=model.arch,
    )
    with tempfile.TemporaryDirectory(prefix="visionrpc-train-") as work:
        work_dir = Path(work)
        plot_dir = work_dir / "plots"
        images, targets = _first_valid_images(session.loaders, 16)
        task.plots(evaluation, images, outputs, targets, session.dataset.vocab, plot_dir)
        _classifier_reports(session, evaluation, outputs, plot_dir)
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


def input_size(config: TrainConfig, arch: str | None = None) -> tuple[int, int]:
    """``--size``, else the kind's default at the height the backbone was trained at."""
    if config.size is not None:
        return config.size
    height, width = get_kind(config.kind).default_size
    trained = get_architecture(arch or config.arch_name).preprocessing.input_size
    if trained is None:
        return height, width
    # The kind's shape (BIWI's 4:3 keeps every head in view) at the backbone's scale.
    return trained[0], round(width * trained[0] / height)


def augmenter(config: TrainConfig, task: str, size: tuple[int, int]) -> BatchTransform:
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


def tta_metrics(
    session: Session, outputs: Tensor, targets: Tensor, evaluation: Evaluation
) -> dict[str, float]:
    """The task's metric on the server's TTA: identity and flip views, blended as it blends.

    The server decodes once, prepares a flipped view and mixes ``lerp(mean(views), plain,
    beta)``; the same views through the same ``prepare`` here give the number a served
    ``tta=True`` request scores.
    """
    task, spec = session.task, session.loaders.spec
    views = [parse_view(name, zoom=TTA.zoom) for name in TTA.views]
    augmented = []
    for view in views:
        items = PreparedItems(
            session.dataset.valid,
            spec,
            task.name,
            len(session.dataset.vocab),
            cache=False,
            view=view,
        )
        loader = DataLoader(items, batch_size=session.config.bs)
        viewed = session.learner.predict(loader).outputs
        if task.name == "points" and view.flip:
            # A point at u in the flipped picture is at -u in the plain one (same crop box).
            viewed = (viewed.reshape(len(viewed), -1, 2) * torch.tensor([-1.0, 1.0])).flatten(1)
        if task.name == "points" and view.zoom != 1.0:
            raise TrainConfigError("TTA of points at validation takes flips only")
        augmented.append(viewed)
    blended = (1 - TTA.beta) * torch.stack(augmented).mean(dim=0) + TTA.beta * outputs
    geometries = session.loaders.valid_geometries
    if task.name == "multilabel":
        return {"accuracy_multi": accuracy_multi(blended, targets, evaluation.threshold)}
    return task.epoch_metrics(blended, targets, geometries)


def _classifier_reports(
    session: Session, evaluation: Evaluation, outputs: Tensor, plot_dir: Path
) -> None:
    """fastai's plot_top_losses and a per-class report, for the two classifier tasks."""
    task, labels = session.task, session.dataset.vocab
    targets = torch.cat([t for _, t in session.loaders.valid])
    report = task.class_report(outputs, targets, labels, evaluation.threshold)
    if report is None:
        return
    plot_dir.mkdir(parents=True, exist_ok=True)
    (plot_dir / "class_report.txt").write_text(report + "\n")
    session.learner.log(report)
    worst = top_losses(task, outputs, targets, TOP_LOSSES)
    valid_items = session.loaders.valid.dataset
    images = torch.stack([valid_items[index][0] for index, _ in worst])
    picked = torch.tensor([index for index, _ in worst])
    truth = task.decode_targets(targets[picked], labels)
    predicted = task.decode(outputs[picked], labels, evaluation.threshold)
    titles = [
        f"{t}\n-> {p}\nloss {loss:.2f}"
        for t, p, (_, loss) in zip(truth, predicted, worst, strict=True)
    ]
    plots.image_grid(images, titles, plot_dir / "top_losses.png")


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
