"""``Client`` against a real server serving analytic models, checked against numpy."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import (
    COLORS_TTA_VIEWS,
    NEWEST_TEMPERATURE,
    OLD_TEMPERATURE,
    random_images,
    solid,
)
from tests.helpers.images import encode
from tests.helpers.onnx_models import centroid_points, channel_mean_scores, channel_means
from tests.helpers.server import RunningServer
from visionrpc.client import (
    Classification,
    Client,
    HealthStatus,
    ImageError,
    InvalidInputError,
    ModelNotFoundError,
    MultiLabel,
    Points,
    Prediction,
)

LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=20) as connected:
        yield connected


def as_classification(result: Prediction) -> Classification:
    assert isinstance(result, Classification), result
    return result


def as_multilabel(result: Prediction) -> MultiLabel:
    assert isinstance(result, MultiLabel), result
    return result


def test_one_image_in_gives_one_result_matching_the_reference(client: Client) -> None:
    image = random_images(1, seed=1)[0]
    result = as_classification(client.predict("colors", image, top_k=3))
    expected = channel_mean_scores(image[None], NEWEST_TEMPERATURE)[0]
    assert [entry.label for entry in result.top] == [LABELS[i] for i in np.argsort(-expected)]
    scores = {entry.label: entry.score for entry in result.top}
    assert [scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)
    assert (result.model, result.version) == ("colors", "2")
    assert (result.original_width, result.original_height) == (8, 8)
    assert (result.tta_applied, result.tta_views) == (False, 1)


def test_a_list_in_gives_a_list_out_in_order(client: Client) -> None:
    images = random_images(5, seed=2)
    results = client.predict("channels", images)
    assert isinstance(results, list)
    expected = channel_means(np.stack(images))
    for result, means in zip(results, expected, strict=True):
        labels = as_multilabel(result).labels
        assert {entry.label for entry in labels} == {
            label for label, mean in zip(LABELS, means, strict=True) if mean >= 0.5
        }


def test_version_selects_an_older_model(client: Client) -> None:
    image = solid((200, 40, 10))
    old = as_classification(client.predict("colors", image, version="1"))
    expected = channel_mean_scores(image[None], OLD_TEMPERATURE)[0]
    assert old.version == "1"
    assert old.score == pytest.approx(float(expected.max()), abs=1e-5)


def test_top_k_limits_the_labels(client: Client) -> None:
    image = solid((200, 40, 10))
    assert len(as_classification(client.predict("colors", image, top_k=1)).top) == 1
    assert len(as_classification(client.predict("colors", image, top_k=10)).top) == 3


def test_min_confidence_turns_an_unsure_answer_into_none(client: Client) -> None:
    grey = solid((90, 90, 90))
    unsure = as_classification(client.predict("colors", grey, min_confidence=0.5))
    assert unsure.below_min_confidence
    assert unsure.label is None
    assert unsure.min_confidence == pytest.approx(0.5)
    sure = as_classification(client.predict("colors", solid((255, 0, 0)), min_confidence=0.5))
    assert sure.label == "red"


def test_threshold_and_per_label_thresholds(client: Client) -> None:
    # Channel means 0.78, 0.39, 0.08.
    image = solid((200, 100, 20))
    default = as_multilabel(client.predict("channels", image))
    assert default.names == ("red",)
    lowered = as_multilabel(client.predict("channels", image, threshold=0.3))
    assert lowered.names == ("red", "green")
    per_label = as_multilabel(
        client.predict("channels", image, threshold=0.3, thresholds={"red": 0.9, "blue": 0.05})
    )
    assert per_label.names == ("green", "blue")
    assert {entry.label: entry.threshold for entry in per_label.labels} == pytest.approx(
        {"green": 0.3, "blue": 0.05}
    )


def test_all_scores_returns_every_label_in_vocabulary_order(client: Client) -> None:
    image = solid((200, 100, 20))
    result = as_multilabel(client.predict("channels", image, all_scores=True))
    assert [entry.label for entry in result.all_scores] == list(LABELS)
    expected = channel_means(image[None])[0]
    assert [entry.score for entry in result.all_scores] == pytest.approx(expected, abs=1e-5)
    assert as_multilabel(client.predict("channels", image)).all_scores == ()


def test_tta_and_tta_views(client: Client) -> None:
    image = solid((30, 200, 60))
    full = as_classification(client.predict("colors", image, tta=True))
    assert (full.tta_applied, full.tta_views) == (True, 1 + len(COLORS_TTA_VIEWS))
    one_view = as_classification(client.predict("colors", image, tta=True, tta_views=1))
    assert (one_view.tta_applied, one_view.tta_views) == (True, 2)
    # A uniform image looks the same from every view, so TTA keeps the plain scores.
    expected = channel_mean_scores(image[None], NEWEST_TEMPERATURE)[0]
    assert full.score == pytest.approx(float(expected.max()), abs=1e-5)
    plain = as_classification(client.predict("colors", image, tta=False))
    assert not plain.tta_applied


def test_points_come_back_in_original_pixels(client: Client) -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[1, 6] = 255
    result = client.predict("centroid", image)
    assert isinstance(result, Points)
    (point,) = result.points
    u, v = centroid_points(image[None])[0]
    assert (point.x_normalized, point.y_normalized) == pytest.approx((u, v), abs=1e-5)
    assert (point.x, point.y) == pytest.approx(((u + 1) * 4, (v + 1) * 4), abs=1e-4)
    assert (point.x, point.y) == pytest.approx((6.5, 1.5), abs=1e-4)


def test_a_bad_image_fails_alone(client: Client) -> None:
    good, bad = client.predict("colors", [solid((255, 0, 0)), b"not an image"])
    assert as_classification(good).label == "red"
    assert isinstance(bad, ImageError)
    assert (bad.code, bad.index) == ("INVALID_ARGUMENT", 1)


def test_raise_on_error_raises_the_image_error(client: Client) -> None:
    with pytest.raises(InvalidInputError) as caught:
        client.predict("colors", [solid((255, 0, 0)), b"not an image"], raise_on_error=True)
    assert caught.value.index == 1


def test_predict_many_keeps_input_order_under_concurrency(client: Client) -> None:
    # 7 * 3 = 21 images in flight at most, so 100 images need many waves.
    images = random_images(100, seed=3)
    seen: list[tuple[int, int]] = []
    results = client.predict_many(
        "colors",
        images,
        batch_size=7,
        max_in_flight=3,
        top_k=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    expected = channel_mean_scores(np.stack(images), NEWEST_TEMPERATURE)
    assert len(results) == len(images)
    for result, scores in zip(results, expected, strict=True):
        by_label = {entry.label: entry.score for entry in as_classification(result).top}
        assert [by_label[label] for label in LABELS] == pytest.approx(scores.tolist(), abs=1e-5)
    assert seen[-1] == (100, 100)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) == 15


def test_predict_many_never_exceeds_max_in_flight(client: Client) -> None:
    # Images are read only when their request is built, so reads count built requests.
    lock = threading.Lock()
    images_read = 0
    answered_requests = 0
    peak_unanswered = 0

    class CountedFile(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            nonlocal images_read, peak_unanswered
            with lock:
                images_read += 1
                built_requests = -(-images_read // 4)
                peak_unanswered = max(peak_unanswered, built_requests - answered_requests)
            return super().read(size)

    def progress(done: int, total: int) -> None:
        nonlocal answered_requests
        with lock:
            answered_requests += 1

    files = [CountedFile(encode(Image.fromarray(image), "PNG")) for image in random_images(40)]
    results = client.predict_many("colors", files, batch_size=4, max_in_flight=2, progress=progress)
    assert len(results) == 40
    assert all(isinstance(result, Classification) for result in results)
    assert peak_unanswered == 2


def test_predict_many_with_unknown_model_raises_not_found(client: Client) -> None:
    with pytest.raises(ModelNotFoundError, match="no model named"):
        client.predict_many("nope", random_images(3), batch_size=2)


def test_predict_many_of_nothing_is_empty(client: Client) -> None:
    assert client.predict_many("colors", []) == []


def test_predict_many_gives_an_unreadable_file_its_own_error(client: Client) -> None:
    results = client.predict_many(
        "colors", [*random_images(5), "/nonexistent/image.png"], batch_size=2
    )
    *answered, missing = results
    assert all(isinstance(result, Classification) for result in answered)
    assert isinstance(missing, ImageError)
    assert (missing.index, missing.code) == (5, "INVALID_ARGUMENT")
    assert missing.message == (
        "image 5 (/nonexistent/image.png): cannot read the file: No such file or directory"
    )


def test_models_lists_every_model_with_versions(client: Client) -> None:
    models = {model.name: model for model in client.models()}
    assert set(models) == {"colors", "channels", "centroid"}
    assert models["colors"].versions == ("1", "2")
    assert models["channels"].task == "multilabel"
    assert models["centroid"].provider == "CPUExecutionProvider"


def test_model_info_reports_the_configuration(client: Client) -> None:
    info = client.model_info("colors")
    assert (info.name, info.version, info.task) == ("colors", "2", "classification")
    assert info.labels == LABELS
    assert (info.input_width, info.input_height, info.resize_method) == (8, 8, "squish")
    assert info.tta_views == tuple(COLORS_TTA_VIEWS)
    assert info.config["name"] == "colors"
    assert client.model_info("colors", "1").version == "1"
    assert "colors v2 (classification)" in str(info)


def test_model_info_of_an_unknown_model_raises_not_found(client: Client) -> None:
    with pytest.raises(ModelNotFoundError):
        client.model_info("nope")


def test_health_of_server_and_models(client: Client) -> None:
    assert client.health() is HealthStatus.SERVING
    assert client.health("colors")
    with pytest.raises(ModelNotFoundError, match="no health for 'nope'"):
        client.health("nope")


def test_channel_settings_are_accepted_and_the_message_limit_holds(
    server: RunningServer,
) -> None:
    with Client(
        server.address, load_balancing="round_robin", keepalive_seconds=30, max_message_bytes=8000
    ) as tuned:
        assert as_classification(tuned.predict("colors", solid((255, 0, 0)))).label == "red"
        too_big = tuned.predict("colors", np.zeros((64, 64, 3), dtype=np.uint8))
        assert isinstance(too_big, ImageError)
        assert "over max_message_bytes=8000" in too_big.message
        with pytest.raises(InvalidInputError, match="over max_message_bytes=8000"):
            tuned.predict("colors", np.zeros((64, 64, 3), dtype=np.uint8), raise_on_error=True)
