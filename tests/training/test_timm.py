"""timm backbones: their own statistics in the exported graph, weights only from local files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from visionrpc.cli import main
from visionrpc.server.model_config import InputSpec, load_model_config
from visionrpc.training.config import TrainConfig
from visionrpc.training.export import check_parity, export_onnx, serving_model
from visionrpc.training.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnknownArchitecture,
    WeightsNotFound,
    create_model,
    get_architecture,
    model_from_checkpoint,
    resolve_weights,
)
from visionrpc.training.synthetic import make_dataset
from visionrpc.training.tasks import get_task
from visionrpc.training.train import input_size

from .support import model_that_tells_images_apart

timm = pytest.importorskip("timm")

# Tiny timm test models (a few hundred thousand weights), random init: test_resnet's
# pretrained config normalises with 0.5/0.5, test_efficientnet's with ImageNet's.
OWN_STATS = "timm:test_resnet"
IMAGENET_STATS = "timm:test_efficientnet"


def test_each_timm_backbone_brings_its_pretrained_configs_preprocessing() -> None:
    own = get_architecture(OWN_STATS).preprocessing
    assert (own.mean, own.std, own.input_size) == ((0.5,) * 3, (0.5,) * 3, (160, 160))
    imagenet = get_architecture(IMAGENET_STATS).preprocessing
    assert (imagenet.mean, imagenet.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # torchvision's backbones resolve through the same step: ImageNet, the kind's size.
    assert get_architecture("resnet18").preprocessing.input_size is None
    config = TrainConfig(kind="biwi", data=Path("d"), repository=Path("r"), arch=OWN_STATS)
    assert input_size(config) == (160, 213)  # BIWI's 4:3 at the backbone's height


def test_the_exported_graph_normalises_with_the_backbones_own_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = model_that_tells_images_apart(OWN_STATS, 3)
    serving = serving_model(model, get_task("classification"))
    spec = InputSpec(48, 48, "crop")
    onnx_file = export_onnx(serving, spec, tmp_path / "model.onnx")
    images = torch.randint(0, 256, (4, 48, 48, 3), dtype=torch.uint8)
    assert check_parity(onnx_file, serving, [images]) <= 1e-4
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"images": images.numpy()})
    floats = images.permute(0, 3, 1, 2).float() / 255
    imagenet_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    imagenet_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        own = torch.softmax(model((floats - 0.5) / 0.5), dim=1).numpy()
        imagenet = torch.softmax(model((floats - imagenet_mean) / imagenet_std), dim=1).numpy()
    np.testing.assert_allclose(served, own, atol=1e-5)
    assert np.abs(served - imagenet).max() > 1e-3


def test_timm_weights_come_from_the_local_hub_cache_or_a_file_never_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_dir: Path
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFound, match="never downloaded"):
        resolve_weights(OWN_STATS, None)
    # The published file: the whole timm model, its classifier included.
    published = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in published.state_dict().items()}
    hub_id = published.pretrained_cfg["hf_hub_id"]
    repo = tmp_path / "hf" / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    cached = resolve_weights(OWN_STATS, None)
    assert cached == snapshot / "model.safetensors"
    model = create_model(OWN_STATS, 2, cached)
    torch.testing.assert_close(model.get_parameter("body.conv1.0.weight"), state["conv1.0.weight"])
    # A --weights file in torch's format works the same way.
    torch.save(published.state_dict(), tmp_path / "weights.pth")
    from_file = create_model(
        OWN_STATS, 2, resolve_weights(OWN_STATS, str(tmp_path / "weights.pth"))
    )
    torch.testing.assert_close(
        from_file.get_parameter("body.conv1.0.weight"), state["conv1.0.weight"]
    )


def test_an_unknown_or_token_output_timm_model_is_refused() -> None:
    with pytest.raises(UnknownArchitecture, match="timm:no_such_net"):
        get_architecture("timm:no_such_net")
    with pytest.raises(UnknownArchitecture, match="channels-first feature map"):
        get_architecture("timm:test_vit")


def test_train_with_a_timm_backbone_exports_a_model_its_checkpoint_rebuilds(
    tmp_path: Path,
) -> None:
    data = make_dataset("pets", tmp_path / "pets", breeds=3, per_breed=6)
    repository = tmp_path / "repo"
    argv = ["train", "pets", "--data", str(data), "--repository", str(repository)]
    flags = ["--arch", OWN_STATS, "--weights", "none", "--size", "32", "--bs", "8"]
    assert main([*argv, *flags, "--epochs", "1", "--lr", "1e-2", "--quiet"]) == 0
    config = load_model_config(repository / "pets" / "config.json")
    assert config.training.arch == OWN_STATS
    checkpoint = torch.load(repository / "pets" / "1" / "checkpoint.pt", weights_only=True)
    assert checkpoint["mean"] == [0.5, 0.5, 0.5]
    rebuilt = serving_model(model_from_checkpoint(checkpoint), get_task("classification"))
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    onnx_file = repository / "pets" / "1" / "model.onnx"
    assert check_parity(onnx_file, rebuilt, [images]) <= 1e-4
