"""Batch augmentation: one affine per image, points moving with the pixels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from visionrpc.training.augment import (
    AugmentConfig,
    augment_batch,
    augment_for_task,
    random_affines,
    random_warps,
)

STILL = {"min_scale": 1.0, "flip_p": 0.0, "p_affine": 0.0, "max_lighting": 0.0}


def dot_images(count: int, height: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    """Dark images with one bright Gaussian dot each, and the dots' normalised centres.

    The dots stay in the middle 60%, far from the edges that reflection padding mirrors.
    """
    generator = torch.Generator().manual_seed(seed)
    x = (0.2 + 0.6 * torch.rand(count, generator=generator)) * width
    y = (0.2 + 0.6 * torch.rand(count, generator=generator)) * height
    rows = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    cols = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    squared = (cols - x[:, None, None]) ** 2 + (rows - y[:, None, None]) ** 2
    dots = 0.9 * torch.exp(-squared / (2 * 1.5**2))
    points = torch.stack([x / width * 2 - 1, y / height * 2 - 1], dim=-1)[:, None, :]
    return dots[:, None].repeat(1, 3, 1, 1), points


@pytest.mark.parametrize(
    ("input_hw", "output_hw", "warp", "zoom"),
    [
        ((96, 96), (64, 64), 0.0, 1.0),
        ((96, 120), (64, 80), 0.0, 1.0),
        ((100, 100), (48, 80), 0.0, 1.0),
        ((72, 54), (96, 72), 0.0, 1.0),
        ((96, 120), (64, 80), 0.4, 1.3),
    ],
    ids=["square", "same-aspect", "other-aspect", "upsampling", "warped-and-zoomed"],
)
def test_a_drawn_dot_stays_under_its_transformed_point(
    input_hw: tuple[int, int], output_hw: tuple[int, int], warp: float, zoom: float
) -> None:
    images, points = dot_images(200, *input_hw, seed=1)
    config = AugmentConfig(
        size=output_hw,
        max_rotate=30.0,
        p_affine=1.0,
        max_lighting=0.0,
        max_warp=warp,
        max_zoom=zoom,
    )
    generator = torch.Generator().manual_seed(2)
    output, moved = augment_batch(images, points, config, generator)
    assert output.shape == (200, 3, *output_hw) and moved is not None
    out_h, out_w = output_hw
    checked = 0
    for image, point in zip(output, moved[:, 0], strict=True):
        x, y = (float(point[0]) + 1) / 2 * out_w, (float(point[1]) + 1) / 2 * out_h
        if not (3 < x < out_w - 3 and 3 < y < out_h - 3):
            continue  # cropped out: the point moves off the picture with its dot
        row, col = divmod(int(image[0].argmax()), out_w)
        assert math.hypot(col + 0.5 - x, row + 0.5 - y) <= 1.5
        checked += 1
    assert checked > 150


def test_affines_include_flips_rotations_and_crops() -> None:
    config = AugmentConfig(size=(64, 64), max_rotate=30.0, min_scale=0.5)
    theta = random_affines(400, (96, 96), config, torch.Generator().manual_seed(0))
    determinant = torch.linalg.det(theta[:, :, :2])
    flipped = determinant < 0
    assert 0.4 < flipped.float().mean() < 0.6
    # A rotation shows as a non-zero off-diagonal term; about p_affine of the images rotate.
    rotated = theta[:, 0, 1].abs() > 1e-6
    assert 0.65 < rotated.float().mean() < 0.85
    area = determinant.abs()  # the crop's share of the input's area
    assert area.min() >= 0.5 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.max() - area.min() > 0.3


def test_warps_move_the_corners_by_at_most_the_magnitude() -> None:
    config = AugmentConfig(size=(64, 64), max_warp=0.3, p_affine=1.0)
    warps = random_warps(300, config, torch.Generator().manual_seed(0))
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    mapped = corners @ warps.transpose(1, 2)
    moved = (mapped[..., :2] / mapped[..., 2:] - corners[:, :2]).abs()
    assert float(moved.max()) <= 0.3 + 1e-5 and float(moved.max()) > 0.2
    # A projective (not affine) map has a non-zero bottom row; every image got one.
    assert bool((warps[:, 2, :2].abs().sum(dim=1) > 1e-4).all())
    still = random_warps(10, AugmentConfig(size=(64, 64)), torch.Generator().manual_seed(0))
    torch.testing.assert_close(still, torch.eye(3).expand(10, 3, 3))


def test_point_defaults_zoom_and_warp_the_whole_frame_while_classifiers_also_crop() -> None:
    points = augment_for_task("points", (48, 64))
    assert (points.min_scale, points.max_zoom, points.max_warp) == (1.0, 1.1, 0.2)
    theta = random_affines(400, (48, 64), points, torch.Generator().manual_seed(0))
    # The crop is the whole frame, shrunk only by the zoom: area 1 unzoomed, down to 1/1.1^2.
    area = torch.linalg.det(theta[:, :, :2]).abs()
    assert area.min() >= 1 / 1.1**2 - 1e-5 and area.max() <= 1 + 1e-5
    assert 0.15 < float((area > 1 - 1e-5).float().mean()) < 0.35  # a quarter not zoomed
    warps = random_warps(400, points, torch.Generator().manual_seed(0))
    assert 0.65 < float((warps[:, 2, :2].abs().sum(dim=1) > 1e-4).float().mean()) < 0.85
    pets = augment_for_task("classification", (64, 64))
    assert pets.min_scale == 0.75 and (pets.max_warp, pets.max_zoom) == (0.2, 1.1)
    chosen = augment_for_task("points", (48, 64), max_zoom=1.0, max_warp=0.0, max_rotate=None)
    assert (chosen.max_zoom, chosen.max_warp, chosen.max_rotate) == (1.0, 0.0, points.max_rotate)


def test_without_augmentation_the_batch_is_only_resized() -> None:
    images = torch.rand(4, 3, 90, 120, generator=torch.Generator().manual_seed(0))
    points = torch.rand(4, 2, 2) * 2 - 1
    config = AugmentConfig(size=(60, 80), **STILL)
    output, moved = augment_batch(images, points, config)
    resized = F.interpolate(images, size=(60, 80), mode="bilinear", align_corners=False)
    torch.testing.assert_close(output, resized, atol=1e-5, rtol=0)
    assert moved is not None
    torch.testing.assert_close(moved, points, atol=1e-6, rtol=0)


def test_a_flip_mirrors_pixels_and_points() -> None:
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[[0.5, -0.25]], [[-0.9, 0.1]], [[0.0, 0.75]]])
    config = AugmentConfig(size=(40, 40), **{**STILL, "flip_p": 1.0})
    output, moved = augment_batch(images, points, config)
    torch.testing.assert_close(output, images.flip(-1), atol=1e-5, rtol=0)
    assert moved is not None
    torch.testing.assert_close(moved, points * torch.tensor([-1.0, 1.0]), atol=1e-6, rtol=0)


def test_lighting_changes_brightness_and_contrast_but_keeps_the_order_of_pixels() -> None:
    images = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    lit = {**STILL, "max_lighting": 0.5, "p_lighting": 1.0}
    output, _ = augment_batch(images, None, AugmentConfig(size=(24, 24), **lit))
    assert output.min() >= 0 and output.max() <= 1
    means = output.mean(dim=(1, 2, 3))
    assert means.max() - means.min() > 0.05
    for before, after in zip(images, output, strict=True):
        order = before.flatten().argsort()
        assert bool((after.flatten()[order].diff() >= -1e-6).all())


def test_the_generator_makes_augmentation_repeatable() -> None:
    images, points = dot_images(8, 48, 48, seed=0)
    config = AugmentConfig(size=(32, 32))
    first = augment_batch(images, points, config, torch.Generator().manual_seed(5))
    again = augment_batch(images, points, config, torch.Generator().manual_seed(5))
    other = augment_batch(images, points, config, torch.Generator().manual_seed(6))
    torch.testing.assert_close(first, again)
    assert not torch.equal(first[0], other[0])


def test_no_points_in_no_points_out() -> None:
    output, points = augment_batch(torch.rand(2, 3, 16, 16), None, AugmentConfig(size=(8, 8)))
    assert points is None and output.shape == (2, 3, 8, 8) and output.dtype == torch.float32


def test_a_config_outside_its_ranges_is_refused() -> None:
    with pytest.raises(ValueError, match="min_scale"):
        AugmentConfig(size=(8, 8), min_scale=0.0)
    with pytest.raises(ValueError, match="max_lighting"):
        AugmentConfig(size=(8, 8), max_lighting=1.0)
    with pytest.raises(ValueError, match="max_warp"):
        AugmentConfig(size=(8, 8), max_warp=-0.1)
    with pytest.raises(ValueError, match="max_zoom"):
        AugmentConfig(size=(8, 8), max_zoom=0.9)


def test_half_precision_images_keep_full_precision_points() -> None:
    images, points = dot_images(16, 48, 48, seed=3)
    config = AugmentConfig(size=(32, 32), max_lighting=0.3, p_lighting=1.0)
    full = augment_batch(images, points, config, torch.Generator().manual_seed(4))
    half = augment_batch(images.half(), points, config, torch.Generator().manual_seed(4))
    assert half[0].dtype == torch.float16 and bool(torch.isfinite(half[0]).all())
    torch.testing.assert_close(half[0].float(), full[0], atol=2e-2, rtol=0)
    assert full[1] is not None and half[1] is not None
    torch.testing.assert_close(half[1], full[1])
