"""Batch augmentation on the device, as fastai's ``aug_transforms`` after presizing.

Each image gets one projective transform: a random-resized crop (area scale in
``[min_scale, 1]`` with a little aspect jitter), a zoom, a horizontal flip, a small
rotation and a perspective warp, composed into one grid and one ``grid_sample`` over the
whole batch, so the presized image is resampled once, with reflection padding. Then
brightness and contrast in logit space. Points move with the same transform.

``augment_for_task`` gives each task fastai's ``aug_transforms`` defaults (zoom up to 1.1,
warp 0.2, rotation 10, flip, lighting 0.2) with the book's crop scale: ``min_scale=0.75``
for classifiers, the whole frame (``min_scale=1``) for points, as the book trains BIWI.

Coordinates are normalised as fastai's TensorPoint and ``grid_sample`` with
``align_corners=False``: -1 and +1 are the outer edges of the first and last pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# fastai's RandomResizedCrop default: crops up to a third wider or taller than the output.
MAX_ASPECT_JITTER = 4.0 / 3.0
_LOGIT_EPS = 1e-4


@dataclass(frozen=True)
class AugmentConfig:
    size: tuple[int, int]  # output (height, width)
    min_scale: float = 0.75
    max_rotate: float = 10.0  # degrees
    flip_p: float = 0.5
    max_lighting: float = 0.2
    # fastai's Warp magnitude: corners move by up to this share of the half-frame.
    max_warp: float = 0.0
    # fastai's Zoom: up to this factor (1 = none), about the crop's centre.
    max_zoom: float = 1.0
    # Rotation, zoom and warp each happen with this probability.
    p_affine: float = 0.75
    p_lighting: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], not {self.min_scale}")
        if not 0.0 <= self.max_lighting < 1.0:
            raise ValueError(f"max_lighting must be in [0, 1), not {self.max_lighting}")
        if not 0.0 <= self.max_warp < 1.0:
            raise ValueError(f"max_warp must be in [0, 1), not {self.max_warp}")
        if self.max_zoom < 1.0:
            raise ValueError(f"max_zoom must be at least 1, not {self.max_zoom}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], not {self.flip_p}")


# fastai's aug_transforms defaults with the book's crop scale per task. Points keep the
# whole frame but take the zoom and warp as the book's BIWI model does: without them a
# resnet18 on BIWI-like frames ended further from the heads (bench/train_vs_fastai.py).
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "classification": {"min_scale": 0.75, "max_warp": 0.2, "max_zoom": 1.1},
    "multilabel": {"min_scale": 0.75, "max_warp": 0.2, "max_zoom": 1.1},
    "points": {"min_scale": 1.0, "max_warp": 0.2, "max_zoom": 1.1},
}


def augment_for_task(task: str, size: tuple[int, int], **overrides: float | None) -> AugmentConfig:
    """The task's defaults, with every option that is not None in ``overrides`` on top."""
    chosen = {**TASK_DEFAULTS[task], **{k: v for k, v in overrides.items() if v is not None}}
    return AugmentConfig(size=size, **chosen)


def augment_batch(
    images: Tensor,
    points: Tensor | None,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Augment float ``[N, 3, H, W]`` images in [0, 1] and their ``[N, K, 2]`` points.

    Points are (x, y) normalised to the input frame; they come back normalised to the
    output frame, and may fall outside [-1, 1] when the crop leaves them out.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], not {list(images.shape)}")
    batch = images.shape[0]
    affines = random_affines(batch, images.shape[-2:], config, generator)
    row = torch.tensor([[[0.0, 0.0, 1.0]]]).expand(batch, 1, 3)
    # Warp in the output frame first, then the affine into the input: output -> input.
    transforms = torch.cat([affines, row], dim=1) @ random_warps(batch, config, generator)
    out_h, out_w = config.size
    identity = torch.eye(2, 3, device=images.device)[None].expand(batch, 2, 3)
    base = F.affine_grid(identity, [batch, images.shape[1], out_h, out_w], False)
    grid = _apply(transforms.to(images.device), base.reshape(batch, -1, 2))
    grid = grid.reshape(batch, out_h, out_w, 2).to(images.dtype)
    output = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if config.max_lighting > 0 and config.p_lighting > 0:
        output = _lighting(output, config, generator)
    if points is None:
        return output, None
    # The grid maps output to input; points travel the other way. In float64 on the CPU:
    # half-precision images must not cost the points precision.
    inverse = torch.linalg.inv(transforms.double())
    moved = _apply(inverse, points.detach().cpu().double())
    return output, moved.to(device=points.device, dtype=points.dtype)


def random_affines(
    batch: int,
    input_hw: tuple[int, int] | torch.Size,
    config: AugmentConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``[N, 2, 3]`` matrices taking output coordinates to input coordinates (both normalised).

    Built in input pixels, where a rotation is a rotation whatever the aspect ratios.
    """
    height, width = float(input_hw[0]), float(input_hw[1])
    out_h, out_w = config.size
    out_aspect = out_w / out_h

    def uniform(low: float | Tensor, high: float | Tensor) -> Tensor:
        return low + (high - low) * _rand(batch, generator)

    # The largest box of the output's aspect that fits is scale 1; a zoom shrinks the box.
    full_area = min(width, height * out_aspect) * min(height, width / out_aspect)
    zoom = torch.where(
        _rand(batch, generator) < config.p_affine,
        uniform(1.0, config.max_zoom),
        torch.ones(batch),
    )
    area = full_area * uniform(config.min_scale, 1.0) / zoom**2
    # Aspect jitter, bounded so that the box still fits inside the input.
    log_low = torch.clamp(torch.log(area / height**2), min=math.log(out_aspect / MAX_ASPECT_JITTER))
    log_high = torch.clamp(torch.log(width**2 / area), max=math.log(out_aspect * MAX_ASPECT_JITTER))
    aspect = torch.exp(uniform(log_low, torch.maximum(log_low, log_high)))
    crop_w = torch.clamp(torch.sqrt(area * aspect), max=width)
    crop_h = torch.clamp(torch.sqrt(area / aspect), max=height)
    centre_x = uniform(crop_w / 2, width - crop_w / 2)
    centre_y = uniform(crop_h / 2, height - crop_h / 2)

    rotate = _rand(batch, generator) < config.p_affine
    angle = torch.where(
        rotate, uniform(-config.max_rotate, config.max_rotate), torch.zeros(batch)
    ) * (math.pi / 180.0)
    flip = torch.where(_rand(batch, generator) < config.flip_p, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # input_px = centre + R @ (flip * u * crop_w / 2, v * crop_h / 2), then normalised.
    half_w, half_h = flip * crop_w / 2, crop_h / 2
    theta = torch.stack(
        [
            torch.stack(
                [cos * half_w * 2 / width, -sin * half_h * 2 / width, 2 * centre_x / width - 1],
                dim=-1,
            ),
            torch.stack(
                [sin * half_w * 2 / height, cos * half_h * 2 / height, 2 * centre_y / height - 1],
                dim=-1,
            ),
        ],
        dim=1,
    )
    return theta


def random_warps(
    batch: int, config: AugmentConfig, generator: torch.Generator | None = None
) -> Tensor:
    """``[N, 3, 3]`` perspective tilts of the output frame (identity where none is drawn).

    A horizontal tilt stretches one side's height and shrinks the other's, a vertical tilt
    does the same to the top and bottom widths, as fastai's Warp moves the corners.
    """
    warp = _rand(batch, generator) < config.p_affine
    tilt_x = torch.where(warp, config.max_warp * (2 * _rand(batch, generator) - 1), 0.0)
    tilt_y = torch.where(warp, config.max_warp * (2 * _rand(batch, generator) - 1), 0.0)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    x, y = corners[:, 0], corners[:, 1]
    moved_x = x * (1 - y[None] * tilt_y[:, None])
    moved_y = y * (1 - x[None] * tilt_x[:, None])
    return _homography(corners, torch.stack([moved_x, moved_y], dim=-1))


def _homography(source: Tensor, target: Tensor) -> Tensor:
    """``[N, 3, 3]`` maps taking the 4 ``source`` corners to each image's ``[N, 4, 2]`` ones."""
    batch = target.shape[0]
    x, y = source[:, 0].double(), source[:, 1].double()
    tx, ty = target[..., 0].double(), target[..., 1].double()
    ones, zeros = torch.ones_like(tx), torch.zeros_like(tx)
    x, y = x.expand_as(tx), y.expand_as(tx)
    rows_x = torch.stack([x, y, ones, zeros, zeros, zeros, -tx * x, -tx * y], dim=-1)
    rows_y = torch.stack([zeros, zeros, zeros, x, y, ones, -ty * x, -ty * y], dim=-1)
    system = torch.cat([rows_x, rows_y], dim=1)
    solution = torch.linalg.solve(system, torch.cat([tx, ty], dim=1))
    full = torch.cat([solution, torch.ones(batch, 1, dtype=solution.dtype)], dim=1)
    return full.reshape(batch, 3, 3).float()


def _apply(transforms: Tensor, points: Tensor) -> Tensor:
    """``[N, 3, 3]`` projective maps applied to ``[N, P, 2]`` points."""
    ones = torch.ones(*points.shape[:-1], 1, dtype=points.dtype, device=points.device)
    mapped = torch.cat([points, ones], dim=-1) @ transforms.to(points.dtype).transpose(1, 2)
    return mapped[..., :2] / mapped[..., 2:]


def _lighting(images: Tensor, config: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    """fastai's Brightness and Contrast: shifts and scales in logit space, each with p_lighting."""
    batch = images.shape[0]
    brighten = _rand(batch, generator) < config.p_lighting
    change = 0.5 + config.max_lighting * (_rand(batch, generator) - 0.5)
    shift = torch.where(brighten, torch.logit(change), torch.zeros(batch))
    contrast = _rand(batch, generator) < config.p_lighting
    log_limit = -math.log(1 - config.max_lighting)
    scale = torch.where(
        contrast, torch.exp((2 * _rand(batch, generator) - 1) * log_limit), torch.ones(batch)
    )
    shift = shift.to(images.device)[:, None, None, None]
    scale = scale.to(images.device)[:, None, None, None]
    # In float32: 1 - eps rounds to 1 in half precision, and logit(1) is infinite.
    logits = torch.logit(images.float().clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))
    return torch.sigmoid(logits * scale + shift).to(images.dtype)


def _rand(count: int, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) draws on the CPU (a few numbers per image; cheap to move)."""
    if generator is not None and generator.device.type != "cpu":
        return torch.rand(count, generator=generator, device=generator.device).cpu()
    return torch.rand(count, generator=generator)
