"""Image decoding and resizing: the one path from a file to a model's input.

The server and the training module's validation path both call ``decode_for_model``
and ``prepare``, so a served prediction equals the validation prediction for the same
file. Nothing here knows about gRPC; bad input raises ``InvalidInput``.

A JPEG much larger than the model's input is decoded at a reduced scale (libjpeg
scales its DCT by 1/2, 1/4 or 1/8, Pillow's ``draft``), keeping at least
``DRAFT_MARGIN`` decoded pixels per input pixel for the exact resize that follows, as
Pillow's ``thumbnail`` does: a 4000x3000 photo for a 224 model decodes at 1000x750.

Coordinates are continuous pixels: pixel ``i`` covers ``[i, i + 1)``. Every prepared
view returns a ``Geometry`` that maps points in the model's input back to the
original image (after EXIF orientation), a flip and a zoom crop included.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from .errors import InvalidInput
from .model_config import InputSpec
from .views import IDENTITY, View, parse_view

# Re-exported: the views were defined here before they moved to a module of their own.
__all__ = [
    "IDENTITY",
    "DecodedImage",
    "Geometry",
    "ImageLimits",
    "View",
    "decode_for_model",
    "image_from_pixels",
    "input_geometry",
    "load_image",
    "parse_view",
    "prepare",
    "prepare_views",
    "to_rgb",
]

# The letterbox of a "pad" model is drawn at the image's own resolution, so its size grows
# with the aspect ratio: a 40000x400 image (a few KB of PNG) would need 1.6 G pixels. Past
# this many the image is shrunk first; the model sees a few hundred pixels a side anyway.
MAX_PAD_CANVAS_PIXELS = 64_000_000

# Decoded pixels kept per model-input pixel (each way) when a JPEG decodes at a reduced scale:
# the exact resize after it still averages at least 2x2 pixels (Pillow's reducing_gap).
DRAFT_MARGIN = 2.0

# The encoded formats the API accepts ("JPEG" opens cameras' multi-picture MPO files too).
# Naming them keeps Pillow's other decoders (EPS through Ghostscript, ...) out of reach.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# What callers see: MPO is decoded by the JPEG plugin but is a format of its own to them.
REPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF")

# Leading bytes of common formats, to say what an unusable file is. Header sniffing only:
# handing the bytes to Pillow's other plugins would put their parsers within reach.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (8, b"WEBP", "WEBP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"%PDF", "PDF"),
    (0, b"%!PS", "PostScript"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\xff\x0a", "JPEG XL"),
    (4, b"JXL ", "JPEG XL"),
    (4, b"ftypavif", "AVIF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"qoif", "QOI"),
)
_SVG = re.compile(rb"<svg[\s>]", re.IGNORECASE)
# Pillow names its input in some messages: "<_io.BytesIO object at 0x7f...>".
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def accepted_extensions() -> tuple[str, ...]:
    """File name suffixes of REPORTED_FORMATS, as Pillow registers them, sorted."""
    return tuple(
        sorted(
            extension
            for extension, image_format in Image.registered_extensions().items()
            if image_format in REPORTED_FORMATS
        )
    )


def detected_format(data: bytes) -> str | None:
    """The format the leading bytes announce, or None."""
    for offset, signature, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return name
    if _SVG.search(data[:4096]):
        return "SVG"
    return None


def _undecodable(data: bytes, reason: str) -> InvalidInput:
    """An unusable file: what it looks like, why it failed, and what is accepted."""
    accepted = f"accepted formats: {', '.join(REPORTED_FORMATS)}"
    found = detected_format(data)
    if found is None:
        return InvalidInput(f"not an image in a known format (none detected); {accepted}")
    if found not in REPORTED_FORMATS:
        return InvalidInput(f"unsupported image format {found}; {accepted}")
    reason = _OBJECT_REPR.sub("", reason).strip() or "unreadable data"
    return InvalidInput(
        f"the {found} data cannot be decoded ({reason}); the file may be truncated or damaged"
    )


@dataclass(frozen=True)
class ImageLimits:
    """Inputs beyond these are refused before they are decoded in full."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Geometry:
    """Maps model-input pixels to original-image pixels: ``orig = offset + scale * x``."""

    original_width: int
    original_height: int
    scale_x: float
    offset_x: float
    scale_y: float
    offset_y: float
    input_width: int
    input_height: int

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        return self.offset_x + self.scale_x * x, self.offset_y + self.scale_y * y

    def normalized_to_original(self, u: float, v: float) -> tuple[float, float]:
        """From the model's [-1, 1] coordinates (as fastai's TensorPoint) to original pixels."""
        x = (u + 1.0) / 2.0 * self.input_width
        y = (v + 1.0) / 2.0 * self.input_height
        return self.to_original(x, y)

    def original_to_normalized(self, x: float, y: float) -> tuple[float, float]:
        x_in = (x - self.offset_x) / self.scale_x
        y_in = (y - self.offset_y) / self.scale_y
        return x_in / self.input_width * 2.0 - 1.0, y_in / self.input_height * 2.0 - 1.0


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image and the original it came from (after EXIF orientation)."""

    image: Image.Image
    original_width: int
    original_height: int
    # Original pixels per pixel of ``image``: 2, 4 or 8 where a JPEG decoded at reduced scale.
    scale: int = 1


def load_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode an encoded image in full to RGB with its EXIF orientation applied."""
    return _decode(data, limits, None).image


def decode_for_model(
    data: bytes,
    spec: InputSpec,
    views: Sequence[View] = (IDENTITY,),
    limits: ImageLimits = ImageLimits(),
) -> DecodedImage:
    """Decode an encoded image for ``spec``'s views: at a reduced scale where that is enough."""
    return _decode(data, limits, (spec, views))


def header_pixels(data: bytes) -> int | None:
    """The pixel count an encoded image's header states (no decoding), or None if unreadable."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            return int(opened.width * opened.height)
    except Exception:
        return None


def input_geometry(data: bytes, spec: InputSpec, limits: ImageLimits = ImageLimits()) -> Geometry:
    """The geometry ``prepare(decode_for_model(data, spec), spec)`` gives, from the header."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            _check_pixels(opened.width, opened.height, limits)
            original_width, original_height = opened.size
            scale = _draft(opened, spec, (IDENTITY,))
            width, height = opened.size
            if opened.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
                original_width, original_height = original_height, original_width
    except InvalidInput:
        raise
    except Exception as exc:
        raise _undecodable(data, str(exc)) from exc
    # prepare's geometry depends only on the sizes, so a blank image of that size gives it.
    blank = DecodedImage(Image.new("L", (width, height)), original_width, original_height, scale)
    return prepare(blank, spec)[1]


_ORIENTATION = 0x0112


def _decode(
    data: bytes, limits: ImageLimits, target: tuple[InputSpec, Sequence[View]] | None
) -> DecodedImage:
    if not data:
        raise InvalidInput("the image is empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"the image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        # No warnings.catch_warnings() around this: it swaps the process-wide filter list
        # and is not thread-safe, and decoding runs in a thread pool. Pillow's
        # DecompressionBombWarning may show for a huge image that _check_pixels refuses.
        opened = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        _check_pixels(opened.width, opened.height, limits)
        width, height = opened.size
        # Orientations 5..8 turn the picture a quarter: exif_transpose swaps its sides.
        if opened.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        scale = 1 if target is None else _draft(opened, *target)
        opened.load()  # forces a full decode: truncated files fail here
        image = to_rgb(ImageOps.exif_transpose(opened))
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the image is too large: {exc}") from exc
    except Exception as exc:
        # Pillow's decoders fail on hostile bytes with many exception types (struct.error,
        # IndexError, ...): every one of them means the caller sent an undecodable file.
        raise _undecodable(data, str(exc)) from exc
    return DecodedImage(image, width, height, scale)


def _draft(opened: Image.Image, spec: InputSpec, views: Sequence[View]) -> int:
    """Let libjpeg decode at a reduced scale that still suits every view; returns it."""
    if not isinstance(opened, JpegImageFile):
        return 1
    # The views' boxes are fixed fractions of the image, so one ratio fits the whole image.
    needed = _needed_fraction(opened.width, opened.height, spec, views)
    if needed >= 0.5:
        return 1
    full_width = opened.width
    requested = (math.ceil(full_width * needed), math.ceil(opened.height * needed))
    # The mode as it is: draft may only convert between a few modes, to_rgb does the rest.
    drafted = opened.draft(opened.mode, requested)
    if drafted is None:  # a file draft cannot scale (several tiles)
        return 1
    _, box = drafted
    # box is the full image's size over the scale.
    return round(full_width / box[2])


def _needed_fraction(width: int, height: int, spec: InputSpec, views: Sequence[View]) -> float:
    """The smallest fraction of the image's size that keeps DRAFT_MARGIN pixels per input pixel."""
    canvas_w, canvas_h = (
        _canvas_size(width, height, spec) if spec.resize_method == "pad" else (width, height)
    )
    _, _, box_w, box_h = _base_box(canvas_w, canvas_h, spec)
    zoom = max(1.0, *(view.zoom for view in views))
    return DRAFT_MARGIN * zoom * max(spec.width / box_w, spec.height / box_h)


def image_from_pixels(
    pixels: bytes, height: int, width: int, channels: int, limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Wrap raw uint8 HWC pixels (1, 3 or 4 channels) as an RGB image."""
    if channels not in (1, 3, 4):
        raise InvalidInput(f"raw images need 1, 3 or 4 channels, not {channels}")
    if height < 1 or width < 1:
        raise InvalidInput(f"raw image size {width}x{height} is empty")
    array = _pixel_array(pixels, height, width, channels, limits)
    if channels == 1:
        return Image.fromarray(array[:, :, 0], mode="L").convert("RGB")
    return to_rgb(Image.fromarray(array, mode="RGBA" if channels == 4 else "RGB"))


def rows_from_input_size_pixels(
    pixels: bytes,
    height: int,
    width: int,
    spec: InputSpec,
    views: Sequence[View],
    limits: ImageLimits = ImageLimits(),
) -> list[tuple[np.ndarray, Geometry]]:
    """``prepare_views`` for raw RGB pixels at the input's size and views without a zoom.

    Every resize method maps such an image onto itself (PIL's resize gives the same bytes
    back), so a row is the pixels, mirrored for a flip view: no PIL image and no copies
    beyond the batch's own (the batcher stacks rows into a new array).
    """
    if (height, width) != (spec.height, spec.width) or any(v.zoom != 1.0 for v in views):
        raise ValueError("only for pixels at the input's size and views without a zoom")
    array = _pixel_array(pixels, height, width, 3, limits)
    rows = []
    for view in views:
        geometry = Geometry(width, height, 1.0, 0.0, 1.0, 0.0, width, height)
        if view.flip:
            geometry = replace(geometry, scale_x=-1.0, offset_x=float(width))
        rows.append((array[:, ::-1] if view.flip else array, geometry))
    return rows


def _pixel_array(
    pixels: bytes, height: int, width: int, channels: int, limits: ImageLimits
) -> np.ndarray:
    """The request's bytes as a read-only ``[H, W, C]`` view, once the size checks pass."""
    _check_pixels(width, height, limits)
    expected = height * width * channels
    if len(pixels) != expected:
        raise InvalidInput(
            f"raw image of {width}x{height}x{channels} needs {expected} bytes, got {len(pixels)}"
        )
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greys: convert('L') would clip at 255 instead of scaling.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        grey = np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if "transparency" in image.info or image.mode in ("PA", "LA", "La"):
        # A tRNS chunk (palette, grey or RGB key colour) becomes real alpha first.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def prepare(
    image: Image.Image | DecodedImage, spec: InputSpec, view: View = IDENTITY
) -> tuple[np.ndarray, Geometry]:
    """Resize (and crop, pad, zoom, flip) an RGB image to the model's input.

    Returns a C-contiguous uint8 HWC array and the geometry of this view, which maps to
    the original's pixels also where ``image`` was decoded at a reduced scale.
    """
    decoded = image if isinstance(image, DecodedImage) else DecodedImage(image, *image.size)
    source, pad_x, pad_y = decoded.image, 0, 0
    # Original pixels per pixel of ``source``: above 1 for a reduced-scale decode or a
    # shrunk letterbox. A reduced-scale pixel i covers original pixels [s*i, s*(i+1)).
    shrink_x = shrink_y = float(decoded.scale)
    if spec.resize_method == "pad":
        source, fit_x, fit_y = _fit_for_padding(source, spec)
        shrink_x, shrink_y = shrink_x * fit_x, shrink_y * fit_y
        source, pad_x, pad_y = _padded(source, spec)
    left, top, box_w, box_h = _base_box(source.width, source.height, spec)
    if view.zoom != 1.0:
        zoomed_w, zoomed_h = box_w / view.zoom, box_h / view.zoom
        left += (box_w - zoomed_w) * view.anchor[0]
        top += (box_h - zoomed_h) * view.anchor[1]
        box_w, box_h = zoomed_w, zoomed_h
    resized = source.resize(
        (spec.width, spec.height),
        resample=Image.Resampling.BILINEAR,
        box=(left, top, left + box_w, top + box_h),
    )
    array = np.asarray(resized, dtype=np.uint8)
    scale_x, scale_y = box_w / spec.width * shrink_x, box_h / spec.height * shrink_y
    offset_x, offset_y = (left - pad_x) * shrink_x, (top - pad_y) * shrink_y
    if view.flip:
        array = array[:, ::-1]
        # x_in of the flipped input is width - x of the unflipped one.
        offset_x += scale_x * spec.width
        scale_x = -scale_x
    geometry = Geometry(
        original_width=decoded.original_width,
        original_height=decoded.original_height,
        scale_x=scale_x,
        offset_x=offset_x,
        scale_y=scale_y,
        offset_y=offset_y,
        input_width=spec.width,
        input_height=spec.height,
    )
    return np.ascontiguousarray(array), geometry


def prepare_views(
    image: Image.Image | DecodedImage, spec: InputSpec, views: Sequence[View]
) -> list[tuple[np.ndarray, Geometry]]:
    return [prepare(image, spec, view) for view in views]


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise InvalidInput(
            f"the image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels}"
        )


def _base_box(width: int, height: int, spec: InputSpec) -> tuple[float, float, float, float]:
    """The box of the source that fills the model's input before any zoom."""
    if spec.resize_method != "crop":
        return 0.0, 0.0, float(width), float(height)
    target_aspect = spec.width / spec.height
    if width / height > target_aspect:
        box_w, box_h = height * target_aspect, float(height)
    else:
        box_w, box_h = float(width), width / target_aspect
    return (width - box_w) / 2.0, (height - box_h) / 2.0, box_w, box_h


def _canvas_size(width: int, height: int, spec: InputSpec) -> tuple[int, int]:
    """The letterbox around a ``width`` x ``height`` image at the input's aspect ratio."""
    target_aspect = spec.width / spec.height
    if width / height > target_aspect:
        return width, round(width / target_aspect)
    return round(height * target_aspect), height


def _fit_for_padding(image: Image.Image, spec: InputSpec) -> tuple[Image.Image, float, float]:
    """The image, shrunk first where its letterbox would exceed MAX_PAD_CANVAS_PIXELS.

    Returns it with the original pixels per pixel of the result along x and y.
    """
    canvas_w, canvas_h = _canvas_size(image.width, image.height, spec)
    if canvas_w * canvas_h <= MAX_PAD_CANVAS_PIXELS:
        return image, 1.0, 1.0
    factor = math.sqrt(canvas_w * canvas_h / MAX_PAD_CANVAS_PIXELS)
    width = max(1, math.floor(image.width / factor))
    height = max(1, math.floor(image.height / factor))
    shrunk = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    return shrunk, image.width / width, image.height / height


def _padded(image: Image.Image, spec: InputSpec) -> tuple[Image.Image, int, int]:
    """Letterbox with black to the input's aspect ratio, at the image's resolution."""
    canvas_w, canvas_h = _canvas_size(image.width, image.height, spec)
    pad_x, pad_y = (canvas_w - image.width) // 2, (canvas_h - image.height) // 2
    if (canvas_w, canvas_h) == image.size:
        return image, 0, 0
    canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
    canvas.paste(image, (pad_x, pad_y))
    return canvas, pad_x, pad_y
