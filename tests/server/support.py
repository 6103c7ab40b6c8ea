"""What the server tests share: encoded test images and the exact model input they become."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from PIL import Image

from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
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


async def fill_queue(
    stub: pb_grpc.InferenceServiceAsyncStub, request: pb.PredictRequest
) -> list[Any]:
    """Calls (without retries) until one is refused while two are pending, one running and
    one queued: a slow model with a queue of one is then full. Returns the pending calls."""
    fillers = []
    while True:
        filler = stub.Predict(request, timeout=60)
        fillers.append(filler)
        await asyncio.sleep(0.05)
        pending = [call for call in fillers if not call.done()]
        if len(pending) >= 2 and filler.done():
            assert await filler.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return fillers


def predict_as_stream(channel: grpc.aio.Channel) -> Any:
    """Predict called as a client stream: the headers go out at once and the one message
    when the request iterator yields it (with ``sent_when``: a large upload on its way)."""
    return channel.stream_unary(
        "/visionrpc.v1.InferenceService/Predict",
        request_serializer=pb.PredictRequest.SerializeToString,
        response_deserializer=pb.PredictResponse.FromString,
    )


async def sent_when(release: asyncio.Event, request: pb.PredictRequest) -> AsyncIterator[Any]:
    await release.wait()
    yield request
