"""``AsyncClient``, the asyncio twin, against a real server serving analytic models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.client.conftest import NEWEST_TEMPERATURE, random_images, solid
from tests.helpers.onnx_models import centroid_points, channel_mean_scores
from tests.helpers.server import RunningServer
from visionrpc.client import (
    AsyncClient,
    Classification,
    HealthStatus,
    ImageError,
    ImageInput,
    InvalidInputError,
    ModelNotFoundError,
    MultiLabel,
    Points,
)

LABELS = ("red", "green", "blue")


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.address, timeout=20) as connected:
        yield connected


async def test_one_image_in_one_result_out(client: AsyncClient) -> None:
    image = random_images(1, seed=11)[0]
    result = await client.predict("colors", image, top_k=3)
    assert isinstance(result, Classification)
    expected = channel_mean_scores(image[None], NEWEST_TEMPERATURE)[0]
    scores = {entry.label: entry.score for entry in result.top}
    assert [scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)


async def test_a_list_in_a_list_out_with_options(client: AsyncClient) -> None:
    image = solid((200, 100, 20))
    results = await client.predict(
        "channels", [image, b"broken"], threshold=0.3, thresholds={"red": 0.9}, all_scores=True
    )
    assert isinstance(results, list)
    first, second = results
    assert isinstance(first, MultiLabel)
    assert first.names == ("green",)
    assert len(first.all_scores) == 3
    assert isinstance(second, ImageError)
    assert second.index == 1


async def test_points_and_tta(client: AsyncClient) -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[5, 2] = 255
    result = await client.predict("centroid", image, tta=True)
    assert isinstance(result, Points)
    assert (result.tta_applied, result.tta_views) == (True, 2)
    u, v = centroid_points(image[None])[0]
    # The flipped view's point is mapped back before blending, so it lands in the same place.
    assert (result.points[0].x, result.points[0].y) == pytest.approx(
        ((u + 1) * 4, (v + 1) * 4), abs=1e-3
    )


async def test_predict_many_keeps_input_order_under_concurrency(client: AsyncClient) -> None:
    images = random_images(90, seed=12)
    seen: list[int] = []
    results = await client.predict_many(
        "colors",
        images,
        batch_size=5,
        max_in_flight=3,
        top_k=1,
        progress=lambda done, total: seen.append(done),
    )
    expected = channel_mean_scores(np.stack(images), NEWEST_TEMPERATURE)
    for result, scores in zip(results, expected, strict=True):
        assert isinstance(result, Classification)
        assert result.label == LABELS[int(np.argmax(scores))]
        assert result.score == pytest.approx(float(scores.max()), abs=1e-5)
    assert seen == sorted(seen)
    assert seen[-1] == 90


async def test_predict_many_with_unknown_model_raises_not_found(client: AsyncClient) -> None:
    with pytest.raises(ModelNotFoundError):
        await client.predict_many("nope", random_images(4), batch_size=2)


async def test_predict_many_gives_an_unreadable_file_its_own_error(client: AsyncClient) -> None:
    images: list[ImageInput] = [*random_images(6), "/nonexistent/image.png", *random_images(6)]
    results = await client.predict_many("colors", images, batch_size=2, max_in_flight=2)
    assert [isinstance(result, ImageError) for result in results] == [i == 6 for i in range(13)]
    missing = results[6]
    assert isinstance(missing, ImageError)
    assert missing.message.startswith("image 6 (/nonexistent/image.png): cannot read the file")


async def test_predict_many_raise_on_error(client: AsyncClient) -> None:
    images: list[ImageInput] = [*random_images(3), b"broken"]
    with pytest.raises(InvalidInputError) as caught:
        await client.predict_many("colors", images, batch_size=2, raise_on_error=True)
    assert caught.value.index == 3


async def test_concurrent_calls_share_one_client(client: AsyncClient) -> None:
    images = random_images(12, seed=13)
    results = await asyncio.gather(*(client.predict("colors", image) for image in images))
    expected = channel_mean_scores(np.stack(images), NEWEST_TEMPERATURE)
    for result, scores in zip(results, expected, strict=True):
        assert isinstance(result, Classification)
        assert result.score == pytest.approx(float(scores.max()), abs=1e-5)


async def test_models_info_and_health(client: AsyncClient) -> None:
    assert [model.name for model in await client.models()] == ["centroid", "channels", "colors"]
    info = await client.model_info("channels")
    assert info.task == "multilabel"
    assert info.threshold == pytest.approx(0.5)
    assert await client.health() is HealthStatus.SERVING
    assert await client.health("centroid")
    with pytest.raises(ModelNotFoundError):
        await client.model_info("channels", "7")
