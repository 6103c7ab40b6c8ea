"""What the server tests share: encoded test images and the exact model input they become."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from visionrpc.protos import inference_pb2 as pb
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import Geometry, load_image, prepare

SPEC_8 = InputSpec(height=8, width=8, resize_method="squish")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def solid(red: int, green: int, blue: int, width: int = 8, height: int = 8) -> np.ndarray:
    return np.tile(np.array([red, green, blue], dtype=np.uint8), (height, width, 1))


def random_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def model_input(encoded: bytes, spec: InputSpec = SPEC_8) -> tuple[np.ndarray, Geometry]:
    """The uint8 row the server feeds the model for this file, through the shared path."""
    return prepare(load_image(encoded), spec)


def encoded_request(model: str, *images: bytes, **fields: object) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        images=[pb.Image(encoded=data) for data in images],
        **fields,  # type: ignore[arg-type]
    )
