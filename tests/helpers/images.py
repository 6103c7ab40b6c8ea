"""Real image files of the awkward kinds callers send, written with Pillow.

Every generator returns encoded bytes (or a PIL image to encode) whose decoded
content the tests know exactly: a marked corner to follow through EXIF rotations,
a dot at a known pixel to follow through resizing, 16-bit levels to check scaling.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
GREY = (128, 128, 128)

# EXIF tag 0x0112: how a viewer must turn the stored pixels to display them.
ORIENTATION_TAG = 0x0112


def encode(image: Image.Image, image_format: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def marked_corner(width: int, height: int, corner: int = 8) -> Image.Image:
    """Grey RGB with a red block in the top-left corner of the stored pixels."""
    image = Image.new("RGB", (width, height), GREY)
    image.paste(RED, (0, 0, corner, corner))
    return image


def exif_jpeg(image: Image.Image, orientation: int, **params: Any) -> bytes:
    """A JPEG of ``image``'s stored pixels, tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95, **params)


def progressive_jpeg(image: Image.Image) -> bytes:
    return encode(image, "JPEG", progressive=True, quality=95)


def cmyk_jpeg(width: int, height: int, cmyk: tuple[int, int, int, int]) -> bytes:
    return encode(Image.new("CMYK", (width, height), cmyk), "JPEG", quality=95)


def grey_png(width: int, height: int, level: int) -> bytes:
    return encode(Image.new("L", (width, height), level), "PNG")


def grey_alpha_png(width: int, height: int, level: int, alpha: int) -> bytes:
    return encode(Image.new("LA", (width, height), (level, alpha)), "PNG")


def rgba_png(width: int, height: int, colour: tuple[int, int, int], alpha: int) -> bytes:
    return encode(Image.new("RGBA", (width, height), (*colour, alpha)), "PNG")


def palette_png_with_transparency(width: int, height: int) -> bytes:
    """Left half opaque blue (palette index 1), right half transparent (index 0)."""
    image = Image.new("P", (width, height), 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, width // 2, height))
    return encode(image, "PNG", transparency=0)


def sixteen_bit_png(levels: np.ndarray) -> bytes:
    """A 16-bit grey PNG (Pillow mode I;16) of a uint16 array."""
    return encode(Image.fromarray(levels.astype(np.uint16)), "PNG")


def animated_gif(first: tuple[int, int, int], second: tuple[int, int, int]) -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (first, second)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first part of a file, as a broken upload leaves it."""
    return data[: int(len(data) * keep)]


def noisy(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB content: compresses badly, so truncation lands inside pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def dot(width: int, height: int, centre: tuple[float, float], radius: float = 6.0) -> Image.Image:
    """Black RGB with a white disc of the pixels whose centres lie within ``radius``.

    ``centre`` is in continuous pixels; at ``k + 0.5`` the disc is symmetric, so its
    brightness centroid is exactly ``centre``.
    """
    rows, cols = np.indices((height, width))
    inside = (cols + 0.5 - centre[0]) ** 2 + (rows + 0.5 - centre[1]) ** 2 <= radius**2
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[inside] = 255
    return Image.fromarray(array)


def brightness_centroid(array: np.ndarray) -> tuple[float, float]:
    """The intensity-weighted centre of an HWC uint8 array, in continuous pixels."""
    weights = array.astype(np.float64).sum(axis=2)
    rows, cols = np.indices(weights.shape)
    total = weights.sum()
    return (
        float((weights * (cols + 0.5)).sum() / total),
        float((weights * (rows + 0.5)).sum() / total),
    )


def odd_encodings(image: Image.Image) -> dict[str, bytes]:
    """One RGB picture in every awkward encoding the server accepts, by a short name."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    alpha = Image.linear_gradient("L").resize((width, height))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    grey = rgb.convert("L")
    grey_alpha = grey.copy()
    grey_alpha.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    sixteen = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    return {
        "jpeg": encode(rgb, "JPEG", quality=90),
        "jpeg-exif-rotated": exif_jpeg(rgb, 6),
        "jpeg-exif-upside-down": exif_jpeg(rgb, 3),
        "jpeg-progressive": progressive_jpeg(rgb),
        "jpeg-grey": encode(grey, "JPEG", quality=90),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "png-rgba": encode(rgba, "PNG"),
        "png-grey-alpha": encode(grey_alpha, "PNG"),
        "png-palette-transparent": encode(palette, "PNG", transparency=0),
        "png-16-bit": encode(sixteen, "PNG"),
        "webp": encode(rgb, "WEBP", quality=90),
        "bmp": encode(rgb, "BMP"),
        "gif": encode(rgb, "GIF"),
        "png-very-wide": encode(rgb.resize((width * 8, max(1, height // 4))), "PNG"),
    }
