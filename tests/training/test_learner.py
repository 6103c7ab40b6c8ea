"""The training loop on real synthetic datasets: schedules, lr_find, and models that learn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from visionrpc.training.augment import AugmentConfig, augment_batch, augment_for_task
from visionrpc.training.data import DataLoaders, make_loaders
from visionrpc.training.datasets import read_dataset
from visionrpc.training.learner import (
    Learner,
    LearnerOptions,
    no_weight_decay,
    one_cycle,
    spread_lr,
    steepest,
    valley,
)
from visionrpc.training.models import create_model
from visionrpc.training.plots import lr_find_curve
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task

CPU = torch.device("cpu")


def loaders_for(kind: str, root: Path, size: tuple[int, int], **options: int) -> DataLoaders:
    make_dataset(kind, root, **options)
    return make_loaders(read_dataset(kind, root), size=size, bs=16)


def learner_for(
    loaders: DataLoaders,
    options: LearnerOptions | None = None,
    augmentation: AugmentConfig | None = None,
) -> Learner:
    torch.manual_seed(0)
    task = get_task(loaders.task)
    model = create_model("tiny", task.n_outputs(len(loaders.vocab)), None)
    config = augmentation or AugmentConfig(size=(loaders.spec.height, loaders.spec.width))
    generator = torch.Generator().manual_seed(0)

    def augment(
        images: torch.Tensor, points: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return augment_batch(images, points, config, generator)

    return Learner(
        model, loaders, task, device=CPU, augment=augment, options=options or LearnerOptions()
    )


@pytest.fixture(scope="module")
def pets(tmp_path_factory: pytest.TempPathFactory) -> DataLoaders:
    root = tmp_path_factory.mktemp("pets")
    return loaders_for("pets", root, (40, 40), breeds=8, per_breed=20)


def test_one_cycle_warms_up_to_the_peak_then_anneals_far_below() -> None:
    lr_max = 1e-2
    start_lr, start_momentum = one_cycle(0.0, lr_max)
    peak_lr, peak_momentum = one_cycle(0.25, lr_max)
    end_lr, end_momentum = one_cycle(1.0, lr_max)
    assert start_lr == pytest.approx(lr_max / 25)
    assert peak_lr == pytest.approx(lr_max)
    assert end_lr == pytest.approx(lr_max / 1e5)
    assert (start_momentum, peak_momentum, end_momentum) == pytest.approx((0.95, 0.85, 0.95))
    rising = [one_cycle(p / 100, lr_max)[0] for p in range(26)]
    falling = [one_cycle(p / 100, lr_max)[0] for p in range(25, 101)]
    assert rising == sorted(rising)
    assert falling == sorted(falling, reverse=True)


def test_discriminative_rates_spread_geometrically_from_body_to_head() -> None:
    assert spread_lr(1e-3, 3) == [1e-3] * 3
    assert spread_lr((1e-5, 1e-3), 3) == pytest.approx([1e-5, 1e-4, 1e-3])


def test_lr_suggestions_sit_on_the_falling_part_of_the_curve() -> None:
    lrs = list(np.logspace(-6, 0, 60))
    # Flat, then falling between 1e-4 and 1e-2, then diverging.
    losses = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) for lr in lrs]
    losses = [
        loss + (8 * (math.log10(lr) + 1.5) if lr > 0.03 else 0)
        for lr, loss in zip(lrs, losses, strict=True)
    ]
    assert 1e-4 < valley(lrs, losses) < 1e-2
    assert 1e-4 < steepest(lrs, losses) < 1e-2


def test_lr_find_suggests_a_finite_rate_restores_the_weights_and_plots(
    pets: DataLoaders, tmp_path: Path
) -> None:
    learner = learner_for(pets)
    before = {k: v.clone() for k, v in learner.net.state_dict().items()}
    result = learner.lr_find(num_it=40)
    assert math.isfinite(result.suggestion) and result.suggestion > 0
    assert min(result.lrs) <= result.suggestion <= max(result.lrs)
    after = learner.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    plot = lr_find_curve(result.lrs, result.losses, result.suggestions, tmp_path / "lr.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classifier_beats_chance_by_a_wide_margin(pets: DataLoaders) -> None:
    learner = learner_for(pets)
    learner.fit_one_cycle(6, 1e-2)
    predictions = learner.predict(pets.valid)
    accuracy = float((predictions.outputs.argmax(1) == predictions.targets).float().mean())
    chance = 1 / len(pets.vocab)
    assert accuracy >= 3 * chance
    assert len(learner.history) == 6
    assert learner.history[-1].train_loss < learner.history[0].train_loss


def test_frozen_body_keeps_its_convolutions_and_trains_batchnorm_and_head(
    pets: DataLoaders,
) -> None:
    learner = learner_for(pets)
    model = learner.model
    names = ("body.0.0.weight", "body.0.1.weight", "head.8.weight")  # conv, its BN, last linear
    before = [model.get_parameter(name).clone() for name in names]
    model.freeze_body()
    learner.fit_one_cycle(1, 1e-2)
    conv, batchnorm, head = (model.get_parameter(name) for name in names)
    assert torch.equal(conv, before[0])
    assert not torch.equal(batchnorm, before[1])
    assert not torch.equal(head, before[2])


def test_fine_tune_trains_the_whole_model_after_the_frozen_epoch(pets: DataLoaders) -> None:
    learner = learner_for(pets)
    conv_before = learner.model.get_parameter("body.0.0.weight").clone()
    learner.fine_tune(1, 1e-2, freeze_epochs=1)
    assert [r.epoch for r in learner.history] == [0, 1]
    assert not torch.equal(learner.model.get_parameter("body.0.0.weight"), conv_before)
    assert all(p.requires_grad for p in learner.model.parameters())


def test_the_frozen_phase_trains_the_body_at_a_tenth_of_the_heads_rate(
    pets: DataLoaders,
) -> None:
    learner = learner_for(pets)
    learner.fine_tune(1, 1e-2, freeze_epochs=1)
    frozen, unfrozen = learner.history
    assert frozen.peak_lrs == pytest.approx((1e-3, 1e-3, 1e-2))
    # Unfrozen: half the rate, spread from 1/100 of it in the earliest layers.
    assert unfrozen.peak_lrs == pytest.approx((5e-5, 5e-4, 5e-3))


def test_adam_carries_the_heads_state_from_the_frozen_epoch_into_the_unfrozen_one(
    pets: DataLoaders,
) -> None:
    # fastai's freeze_to clears it; carrying it on scored better on voc on every seed tried.
    learner = learner_for(pets)
    learner.fine_tune(1, 1e-2, freeze_epochs=1)
    steps = len(pets.train)
    head = learner.model.get_parameter("head.8.weight")
    conv = learner.model.get_parameter("body.0.0.weight")
    assert int(learner.optimizer.state[head]["step"]) == 2 * steps
    assert int(learner.optimizer.state[conv]["step"]) == steps


def test_weight_decay_spares_batchnorm_and_biases(pets: DataLoaders) -> None:
    learner = learner_for(pets, LearnerOptions(weight_decay=0.5))
    exempt = {id(p) for p in no_weight_decay(learner.model)}
    batchnorm = learner.model.get_parameter("body.0.1.weight")
    conv = learner.model.get_parameter("body.0.0.weight")
    assert id(batchnorm) in exempt and id(conv) not in exempt
    for group in learner.optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["weight_decay"] == (0.0 if ids <= exempt else 0.5)
        assert ids <= exempt or not ids & exempt
    # With no gradient, only decay moves a parameter: the convolution shrinks, BN stays.
    conv_before, bn_before = conv.detach().clone(), batchnorm.detach().clone()
    for group in learner.optimizer.param_groups:
        group["lr"] = 0.1
    for param in learner.model.parameters():
        param.grad = torch.zeros_like(param)
    learner.optimizer.step()
    assert float(conv.detach().norm()) < float(conv_before.norm())
    assert torch.equal(batchnorm.detach(), bn_before)


def test_mixup_and_label_smoothing_train_with_finite_losses(pets: DataLoaders) -> None:
    learner = learner_for(pets, LearnerOptions(mixup=0.4, label_smoothing=0.1))
    (record,) = learner.fit_one_cycle(1, 1e-2)
    assert math.isfinite(record.train_loss) and math.isfinite(record.valid_loss)


def test_mixup_is_refused_for_points(tmp_path: Path) -> None:
    loaders = loaders_for("biwi", tmp_path, (24, 32), people=2, frames_per_person=4)
    with pytest.raises(ValueError, match="mixup"):
        learner_for(loaders, LearnerOptions(mixup=0.4))


@pytest.mark.parametrize("augmentation", ["crop-rotate-flip", "points-defaults"])
def test_point_model_error_falls_well_below_predicting_the_mean_point(
    tmp_path: Path, augmentation: str
) -> None:
    loaders = loaders_for("biwi", tmp_path, (48, 64), people=4, frames_per_person=30)
    # The points defaults add fastai's zoom and warp: the targets must follow both.
    config = augment_for_task("points", (48, 64)) if augmentation == "points-defaults" else None
    learner = learner_for(loaders, augmentation=config)
    learner.fit_one_cycle(12, 1e-2)
    task = get_task("points")
    predictions = learner.predict(loaders.valid)
    error = task.epoch_metrics(predictions.outputs, predictions.targets, loaders.valid_geometries)
    train_targets = torch.cat([targets for _, targets in loaders.train])
    mean_point = train_targets.mean(dim=0).reshape(1, -1).expand(len(predictions.targets), -1)
    baseline = task.epoch_metrics(mean_point, predictions.targets, loaders.valid_geometries)
    assert error["point_error_px"] < 0.6 * baseline["point_error_px"]


def test_multilabel_model_beats_predicting_each_labels_frequency(tmp_path: Path) -> None:
    loaders = loaders_for("voc", tmp_path, (48, 48), images=600)
    learner = learner_for(loaders)
    learner.fit_one_cycle(12, 1e-2)
    predictions = learner.predict(loaders.valid)
    train_targets = torch.cat([targets for _, targets in loaders.train])
    frequency = train_targets.mean(dim=0).clamp(1e-3, 1 - 1e-3)
    prior = frequency.expand_as(predictions.targets)
    prior_loss = float(torch.nn.functional.binary_cross_entropy(prior, predictions.targets))
    assert predictions.loss < 0.8 * prior_loss
