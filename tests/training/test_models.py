"""Architectures, pretrained weights from the hub cache, freezing and parameter groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from visionrpc.training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalized,
    ServingModel,
    WeightsNotFound,
    create_model,
    hub_weights_path,
    model_from_checkpoint,
    resolve_weights,
)
from visionrpc.training.tasks import get_task

from .support import model_that_tells_images_apart


@pytest.mark.parametrize("arch", ["tiny", "resnet18", "mobilenet_v3_small"])
def test_model_returns_one_row_of_outputs_per_image(arch: str) -> None:
    model = create_model(arch, 7, None).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 3, 64, 64)).shape == (3, 7)


def test_param_groups_split_body_early_late_and_head_covering_every_parameter() -> None:
    model = create_model("resnet18", 3, None)
    groups = model.param_groups()
    assert len(groups) == 3
    assert all(groups)
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[2]} == {id(p) for p in model.head.parameters()}
    # resnet's stem and first two stages train slowest, as fastai splits it.
    stem_and_early = list(model.body.children())[:6]
    assert {id(p) for p in groups[0]} == {id(p) for m in stem_and_early for p in m.parameters()}


def test_freeze_body_leaves_batchnorm_and_head_trainable() -> None:
    model = create_model("resnet18", 3, None)
    model.freeze_body()
    for module in model.body.modules():
        for param in module.parameters(recurse=False):
            assert param.requires_grad == isinstance(module, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.head.parameters())
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())


def test_missing_pretrained_weights_name_the_file_and_where_it_goes(hub_dir: Path) -> None:
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights("resnet34", None)
    message = str(caught.value)
    assert str(hub_dir / "checkpoints" / "resnet34-b627a593.pth") in message
    assert "--weights none" in message


def test_pretrained_weights_load_from_the_hub_cache(hub_dir: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    path = hub_weights_path("resnet18")
    assert path is not None
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", 2, resolve_weights("resnet18", None))
    assert torch.equal(model.get_parameter("body.0.weight"), source.conv1.weight)
    assert torch.equal(
        model.get_parameter("body.7.1.conv2.weight"), source.get_parameter("layer4.1.conv2.weight")
    )


def test_weights_path_and_none(tmp_path: Path, hub_dir: Path) -> None:
    explicit = tmp_path / "mine.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), explicit)
    assert resolve_weights("resnet18", str(explicit)) == explicit
    assert resolve_weights("resnet18", "none") is None
    # The tiny CNN has no published weights: random initialisation is its default.
    assert resolve_weights("tiny", None) is None
    with pytest.raises(WeightsNotFound):
        resolve_weights("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown architecture"):
        resolve_weights("vgg", None)


def test_checkpoint_is_a_plain_dict_that_rebuilds_the_model(tmp_path: Path) -> None:
    model = model_that_tells_images_apart("tiny", 4)
    torch.save(model.checkpoint(), tmp_path / "checkpoint.pt")
    loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    rebuilt = model_from_checkpoint(loaded).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_serving_model_takes_uint8_nhwc_like_normalized_takes_float_nchw() -> None:
    net = model_that_tells_images_apart("tiny", 5)
    normalized = Normalized(net)
    serving = ServingModel(normalized, lambda raw: torch.softmax(raw, dim=1))
    images = torch.randint(0, 256, (3, 32, 40, 3), dtype=torch.uint8)
    floats = images.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(net((floats - mean) / std), dim=1)
        assert torch.allclose(normalized(floats), net((floats - mean) / std))
        assert torch.allclose(serving(images), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("task_name", "n_labels", "neutral"),
    [("classification", 5, 1 / 5), ("multilabel", 4, 0.5), ("points", 1, 0.0)],
)
def test_a_new_model_gives_the_neutral_answer_for_every_image(
    task_name: str, n_labels: int, neutral: float
) -> None:
    # Even class probabilities, 0.5 per label, the frame's centre: not a random spread that
    # a short run from random weights cannot undo (see create_head).
    task = get_task(task_name)
    model = create_model("resnet18", task.n_outputs(n_labels), None).eval()
    with torch.no_grad():
        answers = task.activation(model(torch.rand(6, 3, 48, 64)))
    assert answers.shape == (6, task.n_outputs(n_labels))
    assert torch.allclose(answers, torch.full_like(answers, neutral))
