"""Every accepted kind of image input reaches the model as the same pixels."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import NEWEST_TEMPERATURE, random_images
from tests.helpers.images import encode
from tests.helpers.onnx_models import channel_mean_scores
from tests.helpers.server import RunningServer
from visionrpc.client import Classification, Client, InvalidInputError
from visionrpc.client.inputs import to_proto_image

PIXELS = random_images(1, seed=21)[0]
PNG = encode(Image.fromarray(PIXELS), "PNG")
LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=20) as connected:
        yield connected


def assert_scores_of(client: Client, image: Any, rgb: np.ndarray) -> None:
    result = client.predict("colors", image, top_k=3)
    assert isinstance(result, Classification), result
    expected = channel_mean_scores(rgb[None], NEWEST_TEMPERATURE)[0]
    scores = {entry.label: entry.score for entry in result.top}
    assert [scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-5)


def png_file(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(PNG)
    return path


LOSSLESS_INPUTS: dict[str, Callable[[Path], Any]] = {
    "str path": lambda tmp_path: str(png_file(tmp_path)),
    "pathlib path": png_file,
    "bytes": lambda _: PNG,
    "bytearray": lambda _: bytearray(PNG),
    "memoryview": lambda _: memoryview(PNG),
    "binary file object": lambda _: io.BytesIO(PNG),
    "open file": lambda tmp_path: png_file(tmp_path).open("rb"),
    "PIL RGB": lambda _: Image.fromarray(PIXELS),
    "PIL RGBA opaque": lambda _: Image.fromarray(PIXELS).convert("RGBA"),
    "numpy HWC": lambda _: PIXELS,
    "numpy HWC4 opaque": lambda _: np.dstack([PIXELS, np.full(PIXELS.shape[:2], 255, np.uint8)]),
    "numpy non-contiguous": lambda _: np.ascontiguousarray(PIXELS[:, ::-1])[:, ::-1],
}


@pytest.mark.parametrize("kind", sorted(LOSSLESS_INPUTS))
def test_input_kind_reaches_the_model_unchanged(kind: str, client: Client, tmp_path: Path) -> None:
    image = LOSSLESS_INPUTS[kind](tmp_path)
    try:
        assert_scores_of(client, image, PIXELS)
    finally:
        if hasattr(image, "close") and not isinstance(image, Image.Image):
            image.close()


def test_grey_inputs_become_three_equal_channels(client: Client) -> None:
    grey = PIXELS[:, :, 0]
    as_rgb = np.dstack([grey, grey, grey])
    assert_scores_of(client, grey, as_rgb)
    assert_scores_of(client, Image.fromarray(grey), as_rgb)


def test_a_palette_image_without_transparency_is_sent_as_its_rgb_pixels(client: Client) -> None:
    palette = Image.fromarray(PIXELS).quantize(colors=16)
    message = to_proto_image(palette)
    assert (message.WhichOneof("data"), message.raw.channels) == ("raw", 3)
    assert_scores_of(client, palette, np.asarray(palette.convert("RGB")))


def test_a_cmyk_image_is_converted_like_the_server_would(client: Client) -> None:
    cmyk = Image.fromarray(PIXELS).convert("CMYK")
    assert_scores_of(client, cmyk, np.asarray(cmyk.convert("RGB")))


def test_a_jpeg_file_is_decoded_by_the_server(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "image.jpg"
    path.write_bytes(encode(Image.fromarray(PIXELS), "JPEG", quality=90))
    with Image.open(path) as decoded:
        assert_scores_of(client, path, np.asarray(decoded.convert("RGB")))


def test_pil_exif_orientation_is_applied_before_sending() -> None:
    tall = Image.new("RGB", (4, 6))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    tagged = Image.open(io.BytesIO(encode(tall, "JPEG", exif=exif.tobytes())))
    raw = to_proto_image(tagged).raw
    assert (raw.width, raw.height, raw.channels) == (6, 4, 3)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (np.zeros((8, 8, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "HxWx3"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "HxWx3"),
        (b"", "the image data is empty"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "HxWx3"),
        (io.StringIO("text"), "binary mode"),
        (12345, "unsupported image type int"),
    ],
)
def test_unusable_inputs_are_refused_before_any_call(image: Any, reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        to_proto_image(image)


def test_a_missing_path_is_invalid_input_saying_why(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read the file: No such file"):
        to_proto_image(tmp_path / "missing.png")
