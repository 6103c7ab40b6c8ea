"""Turning the many ways a caller can hold an image into a ``visionrpc.v1.Image``.

``ImageInput`` is any of:

- a path (``str`` or ``pathlib.Path``): the file's bytes are sent, decoded by the server;
- encoded bytes (JPEG, PNG, WebP, BMP, GIF), or a binary file object opened for reading;
- a ``PIL.Image.Image``: sent as raw pixels when it is L, RGB or RGBA, otherwise as a
  lossless PNG; its EXIF orientation is applied first, as the server does for files;
- a ``numpy.ndarray`` of uint8, HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA): raw pixels.

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
# Modes Pillow's PNG writer keeps losslessly; anything else (CMYK, YCbCr, F, ...) is
# converted to RGB first, which is what the server would do after decoding it.
_PNG_PIL_MODES = {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}


def _invalid(message: str) -> InvalidInputError:
    return InvalidInputError(message, grpc.StatusCode.INVALID_ARGUMENT)


def _is_instance_of(value: object, module_name: str, class_name: str) -> bool:
    module = sys.modules.get(module_name)
    return module is not None and isinstance(value, getattr(module, class_name))


def _raw(pixels: bytes, height: int, width: int, channels: int) -> pb.Image:
    return pb.Image(raw=pb.RawImage(pixels=pixels, height=height, width=width, channels=channels))


def _from_array(array: Any) -> pb.Image:
    numpy = sys.modules["numpy"]
    if array.dtype != numpy.uint8:
        raise _invalid(f"a numpy image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise _invalid(f"a numpy image must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    height, width, channels = (int(size) for size in array.shape)
    return _raw(numpy.ascontiguousarray(array).tobytes(), height, width, channels)


def _from_pil(image: Any) -> pb.Image:
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in _RAW_PIL_MODES:
        return _raw(image.tobytes(), image.height, image.width, _RAW_PIL_MODES[image.mode])
    if image.mode not in _PNG_PIL_MODES:
        image = image.convert("RGB")
        return _raw(image.tobytes(), image.height, image.width, 3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pb.Image(encoded=buffer.getvalue())


def _encoded(data: bytes) -> pb.Image:
    if not data:
        raise _invalid("empty image data")
    return pb.Image(encoded=data)


def to_proto_image(image: ImageInput) -> pb.Image:
    """Encode one caller-side image as the API's ``Image`` message.

    Raises:
        InvalidInputError: the object is not a supported image (wrong type, dtype or shape).
        OSError: a path could not be read.
    """
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as file:
            return _encoded(file.read())
    if isinstance(image, bytes | bytearray | memoryview):
        return _encoded(bytes(image))
    if _is_instance_of(image, "numpy", "ndarray"):
        return _from_array(image)
    if _is_instance_of(image, "PIL.Image", "Image"):
        return _from_pil(image)
    read = getattr(image, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, bytes):
            raise _invalid("a file object must be opened in binary mode ('rb')")
        return _encoded(data)
    raise _invalid(f"unsupported image type {type(image).__name__}")
