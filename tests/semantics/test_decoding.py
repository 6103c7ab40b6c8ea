"""load_image and image_from_pixels on real files of every awkward kind callers send."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import images
from visionrpc.server.errors import InvalidInput
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import (
    ImageLimits,
    image_from_pixels,
    load_image,
    prepare,
    rows_from_input_size_pixels,
)
from visionrpc.server.views import IDENTITY, View, parse_view

WHITE = (255, 255, 255)


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    value = image.getpixel((x, y))
    assert isinstance(value, tuple)
    return value


def assert_colour(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert len(actual) == len(expected) and all(
        abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)
    ), f"{actual} is not {expected} (±{tolerance})"


# EXIF orientation: stored 60x40 with red in the stored top-left corner.


@pytest.mark.parametrize(
    ("orientation", "size", "red_corner"),
    [
        (1, (60, 40), (2, 2)),
        (3, (60, 40), (57, 37)),  # rotated 180: bottom-right
        (6, (40, 60), (37, 2)),  # rotated 90 clockwise: top-right
        (8, (40, 60), (2, 57)),  # rotated 90 counter-clockwise: bottom-left
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], red_corner: tuple[int, int]
) -> None:
    decoded = load_image(images.exif_jpeg(images.marked_corner(60, 40), orientation))
    assert decoded.mode == "RGB"
    assert decoded.size == size
    assert_colour(pixel(decoded, *red_corner), images.RED, tolerance=24)
    width, height = size
    for corner in [(2, 2), (width - 3, 2), (2, height - 3), (width - 3, height - 3)]:
        if corner != red_corner:
            assert_colour(pixel(decoded, *corner), images.GREY, tolerance=24)


def test_progressive_jpeg_decodes_like_a_baseline_one() -> None:
    source = images.marked_corner(64, 48)
    decoded = load_image(images.progressive_jpeg(source))
    assert decoded.size == (64, 48)
    assert_colour(pixel(decoded, 2, 2), images.RED, tolerance=24)
    assert_colour(pixel(decoded, 40, 30), images.GREY, tolerance=8)


def test_an_mpo_from_a_camera_decodes_its_first_picture() -> None:
    first, second = (Image.new("RGB", (16, 16), c) for c in (images.BLUE, images.GREEN))
    data = images.encode(first, "MPO", save_all=True, append_images=[second])
    assert_colour(pixel(load_image(data), 8, 8), images.BLUE, tolerance=8)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_greyscale_becomes_three_equal_channels(image_format: str) -> None:
    data = images.encode(Image.new("L", (10, 10), 77), image_format)
    decoded = load_image(data)
    assert decoded.mode == "RGB"
    assert_colour(pixel(decoded, 5, 5), (77, 77, 77), tolerance=1 if image_format == "JPEG" else 0)


def test_cmyk_jpeg_is_converted_to_its_rgb_colour() -> None:
    decoded = load_image(images.cmyk_jpeg(12, 12, (0, 255, 255, 0)))  # no cyan: red
    assert_colour(pixel(decoded, 6, 6), images.RED, tolerance=8)


def test_palette_transparency_is_composited_over_white() -> None:
    decoded = load_image(images.palette_png_with_transparency(20, 10))
    assert_colour(pixel(decoded, 2, 5), images.BLUE)
    # Palette index 0 is red but transparent: white must show, not red.
    assert_colour(pixel(decoded, 17, 5), WHITE)


def test_rgba_is_composited_over_white() -> None:
    decoded = load_image(images.rgba_png(8, 8, images.BLUE, alpha=128))
    # 128/255 blue over white: red and green keep 127/255 of white's 255.
    assert_colour(pixel(decoded, 4, 4), (127, 127, 255), tolerance=1)
    assert_colour(pixel(load_image(images.rgba_png(8, 8, images.BLUE, 0)), 4, 4), WHITE)


@pytest.mark.parametrize(("alpha", "expected"), [(255, 200), (0, 255), (128, 228)])
def test_grey_with_alpha_is_composited_over_white(alpha: int, expected: int) -> None:
    decoded = load_image(images.grey_alpha_png(8, 8, level=200, alpha=alpha))
    assert_colour(pixel(decoded, 4, 4), (expected,) * 3, tolerance=1)


@pytest.mark.parametrize("colour", [(10, 20, 30), (200, 100, 50)])
def test_key_colour_transparency_of_rgb_png_is_composited_over_white(
    colour: tuple[int, int, int],
) -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    decoded = load_image(images.encode(image, "PNG", transparency=colour))
    assert_colour(pixel(decoded, 4, 4), WHITE if colour == (10, 20, 30) else (10, 20, 30))


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    decoded = np.asarray(load_image(images.sixteen_bit_png(levels)))
    # 1000 of 65535 is 3.9 of 255: clipping would have made it 255.
    assert decoded[0, :, 0].tolist() == [0, 4, 128, 255]
    assert (decoded[..., 0] == decoded[..., 2]).all()


@pytest.mark.parametrize("size", [(2000, 50), (50, 2000)])
@pytest.mark.parametrize("resize_method", ["crop", "squish", "pad"])
def test_very_wide_and_very_tall_images_prepare_to_the_input_size(
    size: tuple[int, int], resize_method: str
) -> None:
    decoded = load_image(images.encode(images.noisy(*size), "PNG"))
    assert decoded.size == size
    array, geometry = prepare(decoded, InputSpec(32, 48, resize_method))
    assert array.shape == (32, 48, 3) and array.dtype == np.uint8
    assert (geometry.original_width, geometry.original_height) == size


@pytest.mark.parametrize(
    ("image_format", "params", "tolerance"),
    [
        ("WEBP", {"lossless": True}, 0),
        ("BMP", {}, 0),
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 24),
    ],
)
def test_common_formats_decode_to_their_pixels(
    image_format: str, params: dict[str, object], tolerance: int
) -> None:
    decoded = load_image(images.encode(images.marked_corner(40, 30), image_format, **params))
    assert decoded.size == (40, 30)
    assert_colour(pixel(decoded, 1, 1), images.RED, tolerance)
    assert_colour(pixel(decoded, 30, 20), images.GREY, tolerance)


def test_gif_gives_its_first_frame() -> None:
    decoded = load_image(images.animated_gif(images.GREEN, images.BLUE))
    assert decoded.mode == "RGB"
    assert_colour(pixel(decoded, 8, 8), images.GREEN)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_invalid_input(image_format: str) -> None:
    whole = images.encode(images.noisy(64, 64), image_format)
    load_image(whole)
    with pytest.raises(InvalidInput, match=f"the {image_format} data cannot be decoded"):
        load_image(images.truncated(whole))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the image is empty"),
        (b"GIF89a but not really an image" * 4, "the GIF data cannot be decoded"),
        (b"{'json': 'is not an image'}", "none detected"),
        (bytes(range(256)) * 4, "none detected"),
        (images.encode(Image.new("RGB", (8, 8)), "TIFF"), "unsupported image format TIFF"),
        (images.encode(Image.new("RGB", (16, 16)), "ICO"), "unsupported image format ICO"),
        (images.encode(Image.new("RGB", (8, 8)), "PDF"), "unsupported image format PDF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "format SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "format HEIC"),
    ],
    ids=["empty", "gif-magic-garbage", "text", "random", "tiff", "ico", "pdf", "svg", "heic"],
)
def test_unusable_bytes_say_what_they_are_and_what_is_accepted(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        load_image(data)
    assert " at 0x" not in caught.value.message
    if data:
        assert "accepted formats: JPEG, MPO, PNG, WEBP, BMP, GIF" in caught.value.message or (
            "cannot be decoded" in caught.value.message
        )


def test_pixel_limit_refuses_before_decoding() -> None:
    data = images.grey_png(300, 200, 0)
    assert load_image(data, ImageLimits(max_pixels=60_000)).size == (300, 200)
    with pytest.raises(InvalidInput, match="300x200 = 60000 pixels, over the limit of 59999"):
        load_image(data, ImageLimits(max_pixels=59_999))


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    # 8000x8000 of one grey level compresses to a file of a few dozen kilobytes.
    data = images.grey_png(8000, 8000, 0)
    assert len(data) < 100_000
    with pytest.raises(InvalidInput, match="over the limit of 40000000"):
        load_image(data)


def test_byte_limit_refuses_larger_files() -> None:
    data = images.grey_png(30, 30, 9)
    load_image(data, ImageLimits(max_bytes=len(data)))
    with pytest.raises(InvalidInput, match=f"{len(data)} bytes, over the limit of {len(data) - 1}"):
        load_image(data, ImageLimits(max_bytes=len(data) - 1))


# raw pixels


def test_raw_grey_pixels_become_rgb() -> None:
    decoded = image_from_pixels(bytes(range(6)), height=2, width=3, channels=1)
    assert decoded.size == (3, 2)
    assert np.asarray(decoded)[1, 2].tolist() == [5, 5, 5]


def test_raw_rgb_pixels_are_row_major_hwc() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    decoded = image_from_pixels(pixels.tobytes(), height=2, width=3, channels=3)
    assert (np.asarray(decoded) == pixels).all()


def test_raw_rgba_pixels_are_composited_over_white() -> None:
    pixels = np.array([[[0, 0, 255, 255], [0, 0, 255, 0]]], dtype=np.uint8)
    decoded = np.asarray(image_from_pixels(pixels.tobytes(), height=1, width=2, channels=4))
    assert decoded.tolist() == [[[0, 0, 255], [255, 255, 255]]]


@pytest.mark.parametrize("method", ["crop", "squish", "pad"])
@pytest.mark.parametrize(("height", "width"), [(224, 224), (96, 128), (7, 5)])
def test_raw_pixels_at_the_input_size_give_the_rows_and_geometry_prepare_gives(
    method: str, height: int, width: int
) -> None:
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    spec = InputSpec(height, width, method)
    views = (IDENTITY, View(name="flip", flip=True))
    fast = rows_from_input_size_pixels(pixels.tobytes(), height, width, spec, views)
    image = image_from_pixels(pixels.tobytes(), height, width, 3)
    for view, (row, geometry) in zip(views, fast, strict=True):
        expected_row, expected_geometry = prepare(image, spec, view)
        assert np.array_equal(row, expected_row)
        assert geometry == expected_geometry


def test_raw_pixels_at_the_input_size_keep_the_size_checks() -> None:
    spec = InputSpec(2, 2, "crop")
    with pytest.raises(InvalidInput, match="needs 12 bytes, got 11"):
        rows_from_input_size_pixels(bytes(11), 2, 2, spec, (IDENTITY,))
    with pytest.raises(InvalidInput, match="over the limit of 3"):
        rows_from_input_size_pixels(bytes(12), 2, 2, spec, (IDENTITY,), ImageLimits(max_pixels=3))
    with pytest.raises(ValueError, match="without a zoom"):
        rows_from_input_size_pixels(bytes(12), 2, 2, spec, (parse_view("zoom_center", zoom=1.2),))


@pytest.mark.parametrize(
    ("length", "height", "width", "channels", "message"),
    [
        (11, 2, 2, 3, "needs 12 bytes, got 11"),
        (13, 2, 2, 3, "needs 12 bytes, got 13"),
        (8, 2, 2, 2, "1, 3 or 4 channels, not 2"),
        (0, 0, 2, 3, "is empty"),
        (3 * 300 * 200, 200, 300, 3, "over the limit of 59999"),
    ],
)
def test_bad_raw_pixels_are_invalid_input(
    length: int, height: int, width: int, channels: int, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        image_from_pixels(bytes(length), height, width, channels, ImageLimits(max_pixels=59_999))
