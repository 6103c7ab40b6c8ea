"""Large JPEGs decode at a reduced DCT scale, and geometry still maps to original pixels."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from PIL import Image

from tests.helpers import images
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import (
    View,
    decode_for_model,
    input_geometry,
    load_image,
    parse_view,
    prepare,
)

PHOTO = (4000, 3000)
SPEC = InputSpec(224, 224, "crop")


@cache
def photo_jpeg() -> bytes:
    """A phone-sized photo with smooth content, as a camera's would be."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    return images.encode(coarse.resize(PHOTO, Image.Resampling.BICUBIC), "JPEG", quality=90)


def test_a_photo_much_larger_than_the_input_decodes_at_a_reduced_scale() -> None:
    decoded = decode_for_model(photo_jpeg(), SPEC)
    # 3000 rows crop to a 3000x3000 box; a quarter keeps 750 >= 2 x 224 of them.
    assert decoded.scale == 4
    assert decoded.image.size == (1000, 750)
    assert (decoded.original_width, decoded.original_height) == PHOTO


def test_the_reduced_decode_gives_nearly_the_pixels_of_a_full_one() -> None:
    full, full_geometry = prepare(load_image(photo_jpeg()), SPEC)
    reduced, reduced_geometry = prepare(decode_for_model(photo_jpeg(), SPEC), SPEC)
    difference = np.abs(full.astype(np.int16) - reduced.astype(np.int16))
    assert float(difference.mean()) < 1.5
    assert reduced_geometry == full_geometry


@pytest.mark.parametrize(
    ("size", "spec", "expected_scale"),
    [
        ((500, 375), SPEC, 1),  # a typical photo: 375 < 2 x 224, decoded in full
        ((1000, 750), SPEC, 1),
        ((2000, 1500), SPEC, 2),
        ((4000, 3000), InputSpec(32, 32, "crop"), 8),  # libjpeg scales by 1/8 at most
        ((4000, 1000), InputSpec(224, 224, "pad"), 8),  # its 4000-wide letterbox: 500 >= 448
        ((4000, 3000), InputSpec(224, 224, "squish"), 4),
    ],
)
def test_the_scale_keeps_two_decoded_pixels_per_input_pixel(
    size: tuple[int, int], spec: InputSpec, expected_scale: int
) -> None:
    data = images.encode(Image.new("RGB", size, images.GREY), "JPEG")
    assert decode_for_model(data, spec).scale == expected_scale


def test_zoomed_views_keep_their_margin_too() -> None:
    zoom = parse_view("zoom_center", zoom=2.0)
    assert decode_for_model(photo_jpeg(), SPEC, (View(), zoom)).scale == 2


def test_large_png_is_decoded_in_full() -> None:
    data = images.encode(Image.new("RGB", (2400, 1800), images.GREY), "PNG")
    decoded = decode_for_model(data, SPEC)
    assert (decoded.scale, decoded.image.size) == (1, (2400, 1800))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_dot_in_a_large_photo_maps_back_to_its_original_pixel(orientation: int) -> None:
    centre = (2600.5, 1300.5)
    picture = images.dot(*PHOTO, centre=centre, radius=120.0)
    data = images.exif_jpeg(picture, orientation)
    decoded = decode_for_model(data, SPEC)
    assert decoded.scale == 4
    pixels, geometry = prepare(decoded, SPEC)
    # The displayed picture: EXIF turns the stored pixels, so turn the expectation too.
    displayed = load_image(data)
    assert (geometry.original_width, geometry.original_height) == displayed.size
    assert geometry == input_geometry(data, SPEC)
    expected = images.brightness_centroid(np.asarray(displayed))
    found = geometry.to_original(*images.brightness_centroid(pixels))
    # One input pixel is 13.4 original pixels: the centroid lands well inside one.
    assert found == pytest.approx(expected, abs=geometry.scale_y / 2)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_photos_decode_reduced_to_rgb(mode: str) -> None:
    picture = Image.new("RGB", PHOTO, (200, 60, 20)).convert(mode)
    decoded = decode_for_model(images.encode(picture, "JPEG", quality=95), SPEC)
    assert (decoded.scale, decoded.image.mode) == (4, "RGB")
    full = load_image(images.encode(picture, "JPEG", quality=95))
    assert decoded.image.getpixel((500, 375)) == pytest.approx(full.getpixel((2000, 1500)), abs=3)
