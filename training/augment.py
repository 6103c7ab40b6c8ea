"""Batch augmentation on the device, as fastai's ``aug_transforms`` after presizing.

Each image gets one affine: a random-resized crop (area scale in ``[min_scale, 1]`` with
a little aspect jitter), a horizontal flip and a small rotation, composed into a single
``affine_grid`` + ``grid_sample`` over the whole batch, so the presized image is
resampled once, with reflection padding. Then brightness and contrast in logit space.
Points move with the same affine.

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
    p_affine: float = 0.75
    p_lighting: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], not {self.min_scale}")
        if not 0.0 <= self.max_lighting < 1.0:
            raise ValueError(f"max_lighting must be in [0, 1), not {self.max_lighting}")


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
    affines = random_affines(images.shape[0], images.shape[-2:], config, generator)
    theta = affines.to(device=images.device, dtype=images.dtype)
    out_h, out_w = config.size
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], out_h, out_w], False)
    output = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if config.max_lighting > 0 and config.p_lighting > 0:
        output = _lighting(output, config, generator)
    if points is None:
        return output, None
    # From the float32 affines: half-precision images must not cost the points precision.
    return output, _points_to_output(points, affines.to(points.device))


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

    # The largest box of the output's aspect that fits is scale 1.
    full_area = min(width, height * out_aspect) * min(height, width / out_aspect)
    area = full_area * uniform(config.min_scale, 1.0)
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


def _points_to_output(points: Tensor, theta: Tensor) -> Tensor:
    """Invert each affine: the grid maps output to input, points travel the other way."""
    linear, shift = theta[:, :, :2], theta[:, :, 2]
    inverse: Tensor = torch.linalg.inv(linear.to(torch.float64))
    relative = (points.to(torch.float64) - shift.to(torch.float64)[:, None, :]).transpose(1, 2)
    moved: Tensor = inverse @ relative
    return moved.transpose(1, 2).to(points.dtype)


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
