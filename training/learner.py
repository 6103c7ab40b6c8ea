"""The training loop, fastai style: ``fit_one_cycle``, ``fine_tune`` and ``lr_find``.

Batches arrive as uint8 NHWC (the training ones presized, the validation ones exactly as
the server prepares them). On the training device they become float NCHW in [0, 1], are
augmented as a whole batch (points move with their images), and go through the model.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from visionrpc.server.preprocess import Geometry

from .models import Normalized, VisionModel, uint8_to_float
from .tasks import Task

# (images float NCHW in [0, 1], points [N, K, 2] or None) -> the same, augmented.
BatchTransform = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
# One rate for all layer groups, (body, head) spread geometrically, or one per group.
LearningRate = float | tuple[float, float] | list[float]
# fastai's freeze phase, ``slice(lr)``: every body group at a tenth of the head's rate.
FROZEN_BODY_DIV = 10.0


class Loaders(Protocol):
    """What the learner needs from training.data.DataLoaders."""

    @property
    def train(self) -> DataLoader[Any]: ...
    @property
    def valid(self) -> DataLoader[Any]: ...
    @property
    def valid_geometries(self) -> Sequence[Geometry]: ...


@dataclass(frozen=True)
class LearnerOptions:
    label_smoothing: float = 0.0
    # Beta(mixup, mixup) mixing of image pairs; 0 turns mixup off.
    mixup: float = 0.0
    # float16 autocast with a GradScaler, used on CUDA only.
    mixed_precision: bool = True
    # bfloat16 autocast on the CPU: faster on CPUs with AMX/AVX512-BF16, slower elsewhere.
    cpu_bf16: bool = False
    weight_decay: float = 0.01
    quiet: bool = False


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    valid_loss: float
    metrics: dict[str, float]
    # The whole epoch, and its training steps alone (no validation).
    seconds: float
    train_seconds: float
    train_images: int
    # The schedule's peak rate for each layer group, body first.
    peak_lrs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Predictions:
    """Activated outputs and targets for a whole loader, on the CPU."""

    outputs: Tensor
    targets: Tensor
    loss: float


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)

    @property
    def suggestion(self) -> float:
        return self.suggestions["valley"]


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * progress))


def one_cycle(
    progress: float,
    lr_max: float,
    *,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    moms: tuple[float, float] = (0.95, 0.85),
) -> tuple[float, float]:
    """(learning rate, momentum) at ``progress`` in [0, 1] of a one-cycle schedule."""
    if progress < pct_start:
        phase = progress / pct_start
        return cosine(lr_max / div, lr_max, phase), cosine(moms[0], moms[1], phase)
    phase = (progress - pct_start) / (1 - pct_start)
    return cosine(lr_max, lr_max / div_final, phase), cosine(moms[1], moms[0], phase)


def spread_lr(lr: LearningRate, n_groups: int) -> list[float]:
    """A float for every group, or (low, high) spread geometrically from the body to the head."""
    if isinstance(lr, int | float):
        return [float(lr)] * n_groups
    if isinstance(lr, list):
        if len(lr) != n_groups:
            raise ValueError(f"{len(lr)} learning rates for {n_groups} layer groups")
        return [float(rate) for rate in lr]
    low, high = lr
    return [low * (high / low) ** (i / (n_groups - 1)) for i in range(n_groups)]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's valley: a third into the longest decreasing run of the loss curve."""
    n = len(losses)
    run = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[end] < run[i]:
                end = i
                start = end - run[end]
    sections = (end - start) / 3
    return lrs[start + int(sections) + int(sections / 2)]


def steepest(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """Where the loss falls fastest per decade of learning rate."""
    slopes = [
        (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(len(lrs) - 1)
    ]
    return lrs[min(range(len(slopes)), key=slopes.__getitem__)]


class Learner:
    def __init__(
        self,
        model: VisionModel,
        loaders: Loaders,
        task: Task,
        *,
        device: torch.device,
        augment: BatchTransform | None = None,
        options: LearnerOptions = LearnerOptions(),
        seed: int = 42,
    ) -> None:
        self.model = model
        self.net = Normalized(model).to(device)
        self.loaders = loaders
        self.task = task
        self.device = device
        self.augment = augment
        self.options = options
        self.loss_function = task.loss_function(options.label_smoothing)
        self.history: list[EpochRecord] = []
        self.random = random.Random(seed)
        if options.mixup and not task.supports_mixup:
            raise ValueError(f"mixup does not apply to the {task.name} task")
        self.layer_groups = len(model.param_groups())
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(model, options.weight_decay),
            lr=1e-3,
            betas=(0.9, 0.99),
            eps=1e-5,
            weight_decay=options.weight_decay,
        )
        use_fp16 = device.type == "cuda" and options.mixed_precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
        self.autocast_dtype = (
            torch.float16 if use_fp16 else torch.bfloat16 if options.cpu_bf16 else None
        )

    def log(self, line: str) -> None:
        if is_main_process():
            print(line, flush=True)

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1) -> None:
        """Train the head with the body frozen, then everything with discriminative rates."""
        if freeze_epochs:
            self.model.freeze_body()
            # The body's BatchNorm layers still train, at the body's rate, not the head's.
            body = [base_lr / FROZEN_BODY_DIV] * (self.layer_groups - 1)
            self.fit_one_cycle(freeze_epochs, [*body, base_lr], pct_start=0.99)
        # fastai halves the rate once the body is unfrozen and gives the earliest layers 1/100.
        base_lr /= 2
        self.model.unfreeze()
        # Adam's state carries on into the unfrozen epochs. fastai clears it here (freeze_to);
        # doing so lowered voc's accuracy on every seed tried (bench/train_vs_fastai.py).
        self.fit_one_cycle(epochs, (base_lr / 100, base_lr), pct_start=0.3, div=5.0)

    def fit_one_cycle(
        self,
        epochs: int,
        lr_max: LearningRate,
        *,
        pct_start: float = 0.25,
        div: float = 25.0,
    ) -> list[EpochRecord]:
        layer_lrs = spread_lr(lr_max, self.layer_groups)
        net = self._training_net()
        steps_per_epoch = len(self.loaders.train)
        total_steps = epochs * steps_per_epoch
        records: list[EpochRecord] = []
        for epoch in range(epochs):
            sampler = self.loaders.train.sampler
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(len(self.history))  # reshuffles differently every epoch
            started = time.perf_counter()
            net.train()
            running, seen = 0.0, 0
            for step, (images, targets) in enumerate(self._progress()):
                progress = (epoch * steps_per_epoch + step) / total_steps
                for group in self.optimizer.param_groups:
                    lr = layer_lrs[group["layer"]]
                    group["lr"], momentum = one_cycle(progress, lr, pct_start=pct_start, div=div)
                    group["betas"] = (momentum, group["betas"][1])
                loss = self._train_step(net, images, targets)
                running += loss * len(images)
                seen += len(images)
            train_seconds = time.perf_counter() - started
            _share_first_process_buffers(self.net)
            predictions = self.predict(self.loaders.valid)
            metrics = self.task.epoch_metrics(
                predictions.outputs, predictions.targets, self.loaders.valid_geometries
            )
            record = EpochRecord(
                epoch=len(self.history),
                train_loss=running / max(seen, 1),
                valid_loss=predictions.loss,
                metrics=metrics,
                seconds=time.perf_counter() - started,
                train_seconds=train_seconds,
                train_images=seen,
                peak_lrs=tuple(layer_lrs),
            )
            if epoch == 0:
                self.log(_table_header(metrics))
            self.history.append(record)
            records.append(record)
            self.log(_table_row(record))
        return records

    def lr_find(
        self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100
    ) -> LRFindResult:
        """Exponentially increasing rates until the loss diverges; the weights are restored."""
        saved_model = copy.deepcopy(self.net.state_dict())
        saved_optimizer = copy.deepcopy(self.optimizer.state_dict())
        net = self._training_net()
        net.train()
        lrs: list[float] = []
        losses: list[float] = []
        smoothed, best = 0.0, math.inf
        batches = self._endless_train_batches()
        for i in range(num_it):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_it - 1))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images, targets = next(batches)
            loss = _mean_over_processes(self._train_step(net, images, targets), self.device)
            # Debiased exponential moving average, as fastai's Recorder smooths the loss.
            smoothed = 0.98 * smoothed + 0.02 * loss
            value = smoothed / (1 - 0.98 ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            best = min(best, value)
            if not math.isfinite(value) or value > 4 * best:
                break
        self.net.load_state_dict(saved_model)
        self.optimizer.load_state_dict(saved_optimizer)
        # The first tenth is noise around the starting loss, the last few points the explosion.
        trimmed = slice(len(lrs) // 10, max(len(lrs) - 5, len(lrs) // 10 + 2))
        kept_lrs, kept_losses = lrs[trimmed], losses[trimmed]
        finite = [
            (lr, loss)
            for lr, loss in zip(kept_lrs, kept_losses, strict=True)
            if math.isfinite(loss)
        ]
        if len(finite) < 2:
            raise RuntimeError("lr_find: the loss diverged immediately; lower start_lr")
        kept_lrs, kept_losses = [lr for lr, _ in finite], [loss for _, loss in finite]
        return LRFindResult(
            lrs=kept_lrs,
            losses=kept_losses,
            suggestions={
                "valley": valley(kept_lrs, kept_losses),
                "steep": steepest(kept_lrs, kept_losses),
            },
        )

    @torch.no_grad()
    def predict(self, loader: DataLoader[Any]) -> Predictions:
        self.net.eval()
        outputs, targets = [], []
        total, count = 0.0, 0
        for images, batch_targets in loader:
            inputs = uint8_to_float(images.to(self.device, non_blocking=True))
            batch_targets = batch_targets.to(self.device)
            with self._autocast():
                raw = self.net(inputs)
            total += float(self.loss_function(raw, batch_targets)) * len(images)
            count += len(images)
            outputs.append(self.task.activation(raw.float()))
            targets.append(batch_targets)
        all_outputs, all_targets = torch.cat(outputs), torch.cat(targets)
        if isinstance(loader.sampler, DistributedSampler):
            sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)
            total, count = sums.tolist()
            all_outputs = _gather_dealt(all_outputs, len(loader.dataset))  # type: ignore[arg-type]
            all_targets = _gather_dealt(all_targets, len(loader.dataset))  # type: ignore[arg-type]
        return Predictions(all_outputs.cpu(), all_targets.cpu(), total / max(count, 1))

    def _training_net(self) -> nn.Module:
        # DDP records which parameters need gradients when it wraps, so wrap after (un)freezing.
        if not dist.is_initialized():
            return self.net
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)

    def _train_step(self, net: nn.Module, images: Tensor, targets: Tensor) -> float:
        inputs = uint8_to_float(images.to(self.device, non_blocking=True))
        targets = targets.to(self.device, non_blocking=True)
        if self.augment is not None:
            points = targets if self.task.name == "points" else None
            inputs, moved = self.augment(inputs, points)
            if moved is not None:
                targets = moved
        with self._autocast():
            if self.options.mixup:
                loss = self._mixup_loss(net, inputs, targets)
            else:
                loss = self.loss_function(net(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(self.scaler.scale(loss))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _mixup_loss(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        alpha = self.options.mixup
        # fastai keeps the larger weight so each mixed image stays mostly itself.
        weight = max(lam := self.random.betavariate(alpha, alpha), 1 - lam)
        order = torch.randperm(len(inputs), device=inputs.device)
        raw = net(weight * inputs + (1 - weight) * inputs[order])
        return weight * self.loss_function(raw, targets) + (1 - weight) * self.loss_function(
            raw, targets[order]
        )

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _progress(self) -> Iterator[tuple[Tensor, Tensor]]:
        hidden = self.options.quiet or not sys.stderr.isatty() or not is_main_process()
        bar: Iterator[tuple[Tensor, Tensor]] = tqdm(
            self.loaders.train, desc=f"epoch {len(self.history)}", leave=False, disable=hidden
        )
        return bar

    def _endless_train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield from self.loaders.train


def optimizer_groups(model: VisionModel, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups per layer group: weights decayed, BatchNorm and biases not.

    As fastai (``bn_wd=False``): decaying a BatchNorm scale or a bias towards zero only
    fights the normalisation and costs accuracy. ``layer`` is the layer group's index.
    """
    exempt = {id(p) for p in no_weight_decay(model)}
    groups = []
    for layer, params in enumerate(model.param_groups()):
        for decayed in (True, False):
            chosen = [p for p in params if (id(p) not in exempt) == decayed]
            if chosen:
                rate = weight_decay if decayed else 0.0
                groups.append({"params": chosen, "layer": layer, "weight_decay": rate})
    return groups


def no_weight_decay(model: nn.Module) -> list[nn.Parameter]:
    """Every bias, and every parameter of a normalisation layer."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    exempt: list[nn.Parameter] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, norms) or name == "bias":
                exempt.append(param)
    return exempt


def _share_first_process_buffers(net: nn.Module) -> None:
    """Copy the first process's BatchNorm statistics to all.

    DDP broadcasts buffers at the start of each forward, so after the last training step
    every process holds statistics of its own last batch; the exported model is the
    first process's, and validation must measure that model on every shard.
    """
    if dist.is_initialized():
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def _mean_over_processes(value: float, device: torch.device) -> float:
    """The same number on every process, so they all stop lr_find at the same step."""
    if not dist.is_initialized():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def _gather_dealt(local: Tensor, total: int) -> Tensor:
    """Every process's share of an unshuffled DistributedSampler, back in dataset order."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    # Item i went to process i % world_size; the sampler padded the end with repeats.
    return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])[:total]


def _table_header(metrics: dict[str, float]) -> str:
    columns = ["epoch", "train_loss", "valid_loss", *metrics, "time"]
    return "  ".join(f"{c:<12}" if i else f"{c:<6}" for i, c in enumerate(columns)).rstrip()


def _table_row(record: EpochRecord) -> str:
    minutes, seconds = divmod(int(record.seconds), 60)
    values = [f"{record.train_loss:.6f}", f"{record.valid_loss:.6f}"]
    values += [f"{v:.6f}" for v in record.metrics.values()]
    cells = [f"{record.epoch:<6}", *(f"{v:<12}" for v in values), f"{minutes:02d}:{seconds:02d}"]
    return "  ".join(cells)
