"""prepare's geometry: a dot drawn at a known original pixel lands where Geometry says."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import images
from visionrpc.server.model_config import InputSpec
from visionrpc.server.preprocess import IDENTITY, load_image, parse_view, prepare

VIEWS = ["identity", "flip", "zoom_center", "zoom_tl", "zoom_br", "flip+zoom_tr", "flip+zoom_bl"]
METHODS = ["crop", "squish", "pad"]
# A non-square input so that crop and pad differ along both axes.
SPEC_SIZE = (48, 64)


@pytest.mark.parametrize("view_name", VIEWS)
@pytest.mark.parametrize("resize_method", METHODS)
@pytest.mark.parametrize(
    ("size", "centre"),
    [((300, 200), (140.5, 90.5)), ((200, 300), (110.5, 160.5))],
    ids=["wide", "tall"],
)
def test_a_dot_lands_where_the_geometry_predicts(
    view_name: str, resize_method: str, size: tuple[int, int], centre: tuple[float, float]
) -> None:
    spec = InputSpec(*SPEC_SIZE, resize_method)
    view = parse_view(view_name, zoom=1.15)
    array, geometry = prepare(images.dot(*size, centre, radius=8), spec, view)
    assert array.shape == (*SPEC_SIZE, 3) and array.flags.c_contiguous

    u, v = geometry.original_to_normalized(*centre)
    predicted = ((u + 1) / 2 * spec.width, (v + 1) / 2 * spec.height)
    found = images.brightness_centroid(array)
    # Centred off the middle of the image: a wrong flip or offset misses by pixels.
    assert found == pytest.approx(predicted, abs=0.1)
    assert geometry.to_original(*found) == pytest.approx(centre, abs=0.1 * max(size) / 48)


@pytest.mark.parametrize("view_name", VIEWS)
@pytest.mark.parametrize("resize_method", METHODS)
def test_normalized_and_original_coordinates_round_trip(view_name: str, resize_method: str) -> None:
    image = images.noisy(300, 200)
    _, geometry = prepare(
        image, InputSpec(*SPEC_SIZE, resize_method), parse_view(view_name, zoom=1.3)
    )
    for point in [(0.0, 0.0), (300.0, 200.0), (17.25, 133.5), (-40.0, 250.0)]:
        assert geometry.normalized_to_original(
            *geometry.original_to_normalized(*point)
        ) == pytest.approx(point)


def test_the_flip_view_is_the_identity_view_mirrored() -> None:
    image = images.noisy(90, 70)
    spec = InputSpec(32, 32, "crop")
    plain, _ = prepare(image, spec)
    flipped, _ = prepare(image, spec, parse_view("flip", zoom=1.15))
    assert (flipped == plain[:, ::-1]).all()


def test_the_model_input_corners_map_to_the_crop_box() -> None:
    # 300x200 to 64x48 by crop: the centre 266.7x200 box, scale 200/48.
    _, geometry = prepare(images.noisy(300, 200), InputSpec(48, 64, "crop"))
    assert geometry.normalized_to_original(-1, -1) == pytest.approx((50 / 3, 0))
    assert geometry.normalized_to_original(1, 1) == pytest.approx((300 - 50 / 3, 200))


def test_pad_letterboxes_with_black_and_maps_through_the_border() -> None:
    # 300x100 padded to 1:1 becomes 300x300 with 100 black rows above and below.
    image = images.noisy(300, 100)
    array, geometry = prepare(image, InputSpec(30, 30, "pad"))
    assert (array[:9] == 0).all() and (array[21:] == 0).all()
    assert array[11:19].mean() > 60
    assert geometry.normalized_to_original(-1, -1) == pytest.approx((0, -100))
    assert geometry.normalized_to_original(1, 1) == pytest.approx((300, 200))


def test_zoom_views_crop_the_anchored_part_of_the_base_box() -> None:
    image = images.noisy(100, 100)
    spec = InputSpec(20, 20, "squish")
    _, top_left = prepare(image, spec, parse_view("zoom_tl", zoom=1.25))
    _, bottom_right = prepare(image, spec, parse_view("zoom_br", zoom=1.25))
    _, centre = prepare(image, spec, parse_view("zoom_center", zoom=1.25))
    assert top_left.normalized_to_original(-1, -1) == pytest.approx((0, 0))
    assert top_left.normalized_to_original(1, 1) == pytest.approx((80, 80))
    assert bottom_right.normalized_to_original(-1, -1) == pytest.approx((20, 20))
    assert centre.normalized_to_original(0, 0) == pytest.approx((50, 50))


def test_geometry_is_in_the_exif_oriented_frame() -> None:
    # Stored 120x80 with a dot at stored (30.5, 20.5); orientation 6 turns it clockwise,
    # so the displayed image is 80x120 and the dot sits at (80 - 20.5, 30.5).
    stored = images.dot(120, 80, (30.5, 20.5), radius=8)
    decoded = load_image(images.exif_jpeg(stored, 6))
    array, geometry = prepare(decoded, InputSpec(60, 40, "squish"), IDENTITY)
    assert (geometry.original_width, geometry.original_height) == (80, 120)
    found = geometry.to_original(*images.brightness_centroid(array))
    assert found == pytest.approx((59.5, 30.5), abs=0.5)


def test_prepare_is_deterministic_uint8() -> None:
    image = images.noisy(123, 77)
    spec = InputSpec(40, 40, "crop")
    first, _ = prepare(image, spec)
    second, _ = prepare(image, spec)
    assert first.dtype == np.uint8
    assert (first == second).all()
