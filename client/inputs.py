"""Turning the many ways a caller can hold an image into a ``visionrpc.v1.Image``.

``ImageInput`` is any of:

- a path (``str`` or ``pathlib.Path``): the file's bytes are sent, decoded by the server;
- encoded bytes (any format the server accepts, see ``ModelInfo.accepted_formats``), or a
  binary file object opened for reading;
- a ``PIL.Image.Image``: sent so that it scores exactly as the file it came from would
  (EXIF orientation applied; transparency, from an alpha band or a tRNS colour key, kept
  so that the server composites it over white as it does for files; 16-bit grey sent as
  lossless PNG so that the server scales it as it does for files; other modes such as
  CMYK or P converted to RGB, as the server converts decoded files);
- a ``numpy.ndarray`` of uint8, HxW (grey), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA): raw pixels.

An input that cannot be sent (missing file, empty bytes, truncated image, wrong array
shape or dtype) raises ``InvalidInputError`` naming it; the clients turn that into that
input's own ``ImageError`` so that its neighbours are still predicted.

Pillow and numpy are optional: they are only touched when the caller passes one of
their objects, and such an object can only exist if its library is already imported,
so this module looks them up in ``sys.modules`` instead of importing them.
"""

from __future__ import annotations

import io
import os
import sys
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias

import grpc

from visionrpc.protos import inference_pb2 as pb

from .errors import InvalidInputError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    ImageInput: TypeAlias = (
        str
        | os.PathLike[str]
        | bytes
        | bytearray
        | memoryview
        | BinaryIO
        | PILImage.Image
        | np.ndarray[Any, Any]
    )
else:
    ImageInput: TypeAlias = Any

_RAW_PIL_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
# Modes whose transparency the server composites over white; sent as RGBA, which is the
# conversion the server applies to such a decoded file before compositing.
_ALPHA_PIL_MODES = {"LA", "La", "PA", "RGBa"}
# 16-bit grey: the server scales it to 8 bits; PNG keeps it exactly, so the server
# sees what it would see in the file.
_SIXTEEN_BIT_PIL_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# Longest text of a caller's object quoted in an error message.
_MAX_NAME_CHARS = 200


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(message, grpc.StatusCode.INVALID_ARGUMENT)


def describe(image: object) -> str:
    """An input's file name for messages (its path, or its file's name), else ""."""
    name: object = image
    if not isinstance(image, str | os.PathLike):
        name = getattr(image, "filename", None) or getattr(image, "name", None)
    if isinstance(name, str | os.PathLike) and str(name):
        text = os.fspath(name)
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return text if len(text) <= _MAX_NAME_CHARS else f"...{text[-_MAX_NAME_CHARS:]}"
    return ""


def _is_instance_of(value: object, module_name: str, class_name: str) -> bool:
    module = sys.modules.get(module_name)
    return module is not None and isinstance(value, getattr(module, class_name))


def _raw(pixels: bytes, height: int, width: int, channels: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=height, width=width, channels=channels))


def _from_array(array: Any) -> pb.Image:
    numpy = sys.modules["numpy"]
    if array.dtype != numpy.uint8:
        raise _invalid(
            f"a numpy image must be uint8, got {array.dtype} "
            "(scale floats to 0..255 and use .astype(numpy.uint8))"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise _invalid(
            f"a numpy image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(array.shape)}"
        )
    height, width, channels = (int(size) for size in array.shape)
    return _raw(numpy.ascontiguousarray(array).tobytes(), height, width, channels)


def _from_pil(image: Any) -> pb.Image:
    from PIL import ImageOps

    try:
        # A lazily opened file is read here: a truncated one fails now, as it would on
        # the server, instead of halfway through encoding.
        image.load()
        image = ImageOps.exif_transpose(image)
        if "transparency" in image.info or image.mode in _ALPHA_PIL_MODES:
            image = image.convert("RGBA")
        elif image.mode in _SIXTEEN_BIT_PIL_MODES:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return pb.Image(encoded=buffer.getvalue())
        elif image.mode not in _RAW_PIL_MODES:
            image = image.convert("RGB")
        return _raw(image.tobytes(), image.height, image.width, _RAW_PIL_MODES[image.mode])
    except (OSError, ValueError, SyntaxError) as error:
        # Pillow reports broken files as OSError ("image file is truncated"), and a few
        # plugins as ValueError or SyntaxError.
        raise _invalid(f"the PIL image cannot be read: {error}") from None


def _encoded(data: bytes) -> pb.Image:
    if not data:
        raise _invalid("the image data is empty (0 bytes)")
    return pb.Image(encoded=data)


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise _invalid(f"cannot read the file: {reason}") from None


def to_proto_image(image: ImageInput) -> pb.Image:
    """Encode one caller-side image as the API's ``Image`` message.

    Raises:
        InvalidInputError: the input cannot be sent (unreadable or empty file, truncated
            PIL image, wrong type, dtype or shape); the message says what is wrong.
    """
    if isinstance(image, str | os.PathLike):
        return _encoded(_read_file(image))
    if isinstance(image, bytes | bytearray | memoryview):
        return _encoded(bytes(image))
    if _is_instance_of(image, "numpy", "ndarray"):
        return _from_array(image)
    if _is_instance_of(image, "PIL.Image", "Image"):
        return _from_pil(image)
    read = getattr(image, "read", None)
    if callable(read):
        try:
            data = read()
        except OSError as error:
            raise _invalid(f"cannot read the file object: {error}") from None
        if not isinstance(data, bytes):
            raise _invalid("a file object must be opened in binary mode ('rb')")
        return _encoded(data)
    raise _invalid(
        f"unsupported image type {type(image).__name__}: pass a path, bytes, a binary "
        "file object, a PIL image or a uint8 numpy array"
    )
