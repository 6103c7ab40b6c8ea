"""Architectures: a pretrained body (torchvision, or timm's ``timm:NAME``) plus a fastai head.

Pretrained weights are never downloaded: they come from ``--weights PATH`` or from the
local cache where torchvision (the torch hub cache) or timm (the Hugging Face hub cache)
would have saved them. ``--weights none`` starts from random initialisation.

Each architecture carries its preprocessing (``Preprocessing``: mean, std and the input
size it was trained at), which ``Normalized`` bakes into the training graph and so into
the exported one: timm's from the model's pretrained config through its
``resolve_data_config``, torchvision's the ImageNet statistics.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
# Files a timm model's weights are published as on the Hugging Face hub, in timm's order.
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights were asked for but no file is available offline."""


class UnknownArchitecture(ValueError):
    """An --arch that is neither registered here nor a timm model."""


class WrongWeights(ValueError):
    """A weights file that is not a state dict of this architecture; says what it is."""


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects: the normalisation and the input size it was trained at."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # (height, width); None: the dataset kind's default.
    input_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Architecture:
    """How to build a body, and where its pretrained weights would live."""

    name: str
    build_body: Callable[[], nn.Module]
    # Loads a state dict of the full torchvision model into a fresh body.
    load_body: Callable[[dict[str, Tensor]], nn.Module]
    body_channels: int
    # fastai's split point: layers before it train at the smallest learning rate.
    early_layers: int
    head_hidden: int = 512
    # fastai's head dropout; the tiny CNN, trained from scratch on little data, needs less.
    dropout: float = 0.5
    weights_file: str | None = None
    preprocessing: Preprocessing = Preprocessing()
    # timm: the cached pretrained file, looked up without any network (None: not cached).
    find_cached: Callable[[], Path | None] | None = None


def _torchvision_body(name: str, keep: Callable[[nn.Module], list[nn.Module]]) -> nn.Sequential:
    return nn.Sequential(*keep(torchvision.models.get_model(name, weights=None)))


def _torchvision_loader(
    name: str, keep: Callable[[nn.Module], list[nn.Module]]
) -> Callable[[dict[str, Tensor]], nn.Sequential]:
    def load(state: dict[str, Tensor]) -> nn.Sequential:
        full = torchvision.models.get_model(name, weights=None)
        full.load_state_dict(state)
        return nn.Sequential(*keep(full))

    return load


def _resnet_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.children())[:-2]  # everything before the average pool and classifier


def _mobilenet_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.get_submodule("features").children())


def _tiny_body() -> nn.Sequential:
    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), block(64, 128), block(128, 128)
    )


def _load_tiny(state: dict[str, Tensor]) -> nn.Sequential:
    body = _tiny_body()
    body.load_state_dict(state)
    return body


def _weights_file(name: str) -> str:
    url: str = torchvision.models.get_model_weights(name).DEFAULT.url
    return url.rsplit("/", 1)[-1]


def _torchvision_arch(
    name: str, keep: Callable[[nn.Module], list[nn.Module]], channels: int, early: int
) -> Architecture:
    return Architecture(
        name=name,
        build_body=lambda: _torchvision_body(name, keep),
        load_body=_torchvision_loader(name, keep),
        body_channels=channels,
        early_layers=early,
        weights_file=_weights_file(name),
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        _torchvision_arch("resnet18", _resnet_layers, 512, 6),
        _torchvision_arch("resnet34", _resnet_layers, 512, 6),
        _torchvision_arch("resnet50", _resnet_layers, 2048, 6),
        _torchvision_arch("mobilenet_v3_small", _mobilenet_layers, 576, 7),
        Architecture("tiny", _tiny_body, _load_tiny, 128, 3, head_hidden=128, dropout=0.25),
    )
}


def get_architecture(arch: str) -> Architecture:
    """A registered architecture, or ``timm:NAME`` built from timm's registry."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch.startswith(TIMM_PREFIX):
        return _timm_architecture(arch.removeprefix(TIMM_PREFIX))
    raise UnknownArchitecture(
        f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)} or timm:NAME"
    )


def hub_weights_path(arch: str) -> Path | None:
    """Where torchvision caches this architecture's default weights (None: it has none)."""
    file_name = get_architecture(arch).weights_file
    return None if file_name is None else Path(torch.hub.get_dir()) / "checkpoints" / file_name


def resolve_weights(arch: str, weights: str | None) -> Path | None:
    """The weights file to start from; None means random initialisation.

    ``weights`` is a path, ``"none"``, or None for the architecture's default (pretrained
    where torchvision has weights for it).
    """
    spec = get_architecture(arch)
    if weights == "none":
        return None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFound(f"--weights {path}: no such file")
        return path
    if spec.find_cached is not None:
        found = spec.find_cached()
        if found is None:
            raise WeightsNotFound(
                f"{arch} starts from its pretrained weights, which are not in the local "
                "Hugging Face cache and are never downloaded here. Fetch them once "
                f"(timm.create_model({arch.removeprefix(TIMM_PREFIX)!r}, pretrained=True) "
                "where there is a network), pass --weights PATH to its state dict, or pass "
                "--weights none to train from random weights."
            )
        return found
    cached = hub_weights_path(arch)
    if cached is None:
        return None
    if not cached.is_file():
        raise WeightsNotFound(
            f"{arch} starts from ImageNet weights, which are not available offline. "
            f"Put {cached.name} (from torchvision) at {cached}, pass --weights PATH to a "
            "state dict of that file, or pass --weights none to train from random weights."
        )
    return cached


class AdaptiveConcatPool2d(nn.Module):
    """Average and max pooling side by side, as fastai's head does: twice the features."""

    def __init__(self) -> None:
        super().__init__()
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.max(x), self.avg(x)], dim=1)


def create_head(n_features: int, n_out: int, hidden: int, dropout: float = 0.5) -> nn.Sequential:
    inner = nn.Linear(2 * n_features, hidden, bias=False)
    last = nn.Linear(hidden, n_out, bias=False)
    nn.init.kaiming_normal_(inner.weight)
    # The last layer starts at zero, so a new model's first answer is the neutral one (even
    # class probabilities, 0.5 per label, the frame's centre for points) instead of a random
    # spread over the whole range that a short run cannot undo. From random body weights and
    # a few hundred images (bench/train_vs_fastai.py, 8 seeds): points 211 -> 96 px, where
    # fastai, which draws this layer like the one before, gets 181; voc 0.883 -> 0.894;
    # pets level. Its gradient is not zero, so the first step moves it off zero.
    nn.init.zeros_(last.weight)
    return nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * n_features),
        nn.Dropout(dropout / 2),
        inner,
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(hidden),
        nn.Dropout(dropout),
        last,
    )


class VisionModel(nn.Module):
    """Body and head, with fastai's freezing and parameter groups."""

    def __init__(self, arch: str, n_out: int, body: nn.Module | None = None) -> None:
        super().__init__()
        spec = get_architecture(arch)
        self.arch = arch
        self.n_out = n_out
        self.early_layers = spec.early_layers
        self.preprocessing = spec.preprocessing
        self.body = body if body is not None else spec.build_body()
        self.head = create_head(spec.body_channels, n_out, spec.head_hidden, spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.body(x))
        return out

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Body early, body late, head: the groups discriminative learning rates spread over."""
        layers = list(self.body.children())
        early = [p for layer in layers[: self.early_layers] for p in layer.parameters()]
        late = [p for layer in layers[self.early_layers :] for p in layer.parameters()]
        return [early, late, list(self.head.parameters())]

    def freeze_body(self) -> None:
        # BatchNorm stays trainable, as in fastai: its statistics must adapt to the new data.
        for module in self.body.modules():
            trainable = isinstance(module, nn.modules.batchnorm._BatchNorm)
            for param in module.parameters(recurse=False):
                param.requires_grad_(trainable)

    def unfreeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(True)

    def checkpoint(self) -> dict[str, Any]:
        """A plain dict that carries the arguments needed to rebuild this model."""
        return {
            "arch": self.arch,
            "n_out": self.n_out,
            "state_dict": self.state_dict(),
            "mean": list(self.preprocessing.mean),
            "std": list(self.preprocessing.std),
        }


def create_model(arch: str, n_out: int, weights_file: Path | None) -> VisionModel:
    """A model with a pretrained body from ``weights_file`` (see resolve_weights), or random."""
    if weights_file is None:
        return VisionModel(arch, n_out)
    state = load_state(weights_file)
    if {"arch", "state_dict"} <= set(state):
        raise WrongWeights(
            f"--weights {weights_file} is a visionrpc checkpoint (of {state['arch']}), not "
            f"pretrained weights: continue from it with --resume {weights_file}"
        )
    try:
        body = get_architecture(arch).load_body(state)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshapen tensors
        first = str(exc).strip().splitlines()[0]
        raise WrongWeights(f"--weights {weights_file} does not fit {arch}: {first}") from None
    return VisionModel(arch, n_out, body=body)


def load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch file, tensors only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def model_from_checkpoint(checkpoint: dict[str, Any]) -> VisionModel:
    model = VisionModel(checkpoint["arch"], checkpoint["n_out"])
    model.load_state_dict(checkpoint["state_dict"])
    return model


def uint8_to_float(images: Tensor) -> Tensor:
    """uint8 NHWC batches (what the loaders and the server produce) to float NCHW in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div(255.0)


class Normalized(nn.Module):
    """Takes float NCHW in [0, 1] and applies the backbone's own mean and std first."""

    mean: Tensor
    std: Tensor

    def __init__(self, net: VisionModel) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(net.preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.preprocessing.std).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net((x - self.mean) / self.std)
        return out


class ServingModel(nn.Module):
    """The exported graph: uint8 NHWC in, the task's activated outputs out."""

    def __init__(self, model: Normalized, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.activation = activation

    def forward(self, images: Tensor) -> Tensor:
        return self.activation(self.model(uint8_to_float(images)))


@functools.lru_cache(maxsize=16)
def _timm_architecture(name: str) -> Architecture:
    """A timm backbone: its feature map, its own preprocessing, its cached weights."""
    import timm
    from timm.data.config import resolve_data_config

    def build() -> nn.Module:
        # No classifier and no pooling: the feature map goes to the fastai head.
        model: nn.Module = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        return model

    try:
        # Any: timm's attributes (num_features, pretrained_cfg) are not typed on nn.Module.
        probe: Any = build()
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise UnknownArchitecture(f"timm:{name}: {exc}") from None
    channels = int(probe.num_features)
    config = resolve_data_config({}, model=probe)  # type: ignore[no-untyped-call]
    height, width = config["input_size"][1:]
    with torch.no_grad():
        shape = tuple(probe.eval()(torch.zeros(1, 3, height, width)).shape)
    if len(shape) != 4 or shape[1] != channels:
        raise UnknownArchitecture(
            f"timm:{name} gives features of shape {shape}, not a channels-first feature map "
            f"[N, {channels}, H, W]; only convolutional timm backbones fit the pooling head"
        )
    pretrained = probe.pretrained_cfg
    classifier = pretrained.get("classifier") or "fc"

    def load(state: dict[str, Tensor]) -> nn.Module:
        body = build()
        result = body.load_state_dict(state, strict=False)
        # The published file carries the classifier this body leaves out, and nothing else.
        unexpected = [k for k in result.unexpected_keys if not k.startswith(classifier + ".")]
        if result.missing_keys or unexpected:
            raise WeightsNotFound(
                f"timm:{name}: the weights do not fit: missing {result.missing_keys[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return body

    def find_cached() -> Path | None:
        from huggingface_hub import try_to_load_from_cache

        hub_id = pretrained.get("hf_hub_id")
        for file_name in TIMM_WEIGHT_FILES if hub_id else ():
            # Read at call time (the hub reads its own setting once, at import).
            cache_dir = os.environ.get("HF_HUB_CACHE")
            found: Any = try_to_load_from_cache(hub_id, file_name, cache_dir=cache_dir)
            if isinstance(found, str):
                return Path(found)
        url = pretrained.get("url")
        if url:
            legacy = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
            return legacy if legacy.is_file() else None
        return None

    children = len(list(probe.children()))
    return Architecture(
        name=TIMM_PREFIX + name,
        build_body=build,
        load_body=load,
        body_channels=channels,
        # fastai splits a timm body in two; the earlier half of its top-level modules.
        early_layers=max(1, children // 2),
        preprocessing=Preprocessing(
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            input_size=(int(height), int(width)),
        ),
        find_cached=find_cached,
    )
