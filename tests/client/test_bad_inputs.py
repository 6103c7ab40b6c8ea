"""One bad input never fails its neighbours, and every error says what went wrong.

Real server, real files of the odd kinds users hold (written with Pillow here), the real
``Client``/``AsyncClient`` and the ``visionrpc`` command in a subprocess.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.client.conftest import NEWEST_TEMPERATURE, random_images, solid
from tests.client.test_cli import visionrpc
from tests.helpers.images import encode, noisy, truncated
from tests.helpers.onnx_models import channel_mean_scores
from tests.helpers.server import RunningServer
from visionrpc.client import (
    AsyncClient,
    Classification,
    Client,
    ImageError,
    ImageInput,
    InvalidInputError,
    Prediction,
)

GOOD = solid((200, 30, 30))
LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=20) as connected:
        yield connected


def scores(result: Prediction) -> list[float]:
    assert isinstance(result, Classification), result
    by_label = {entry.label: entry.score for entry in result.top}
    return [by_label[label] for label in LABELS]


def two_frame_mpo(first: Image.Image) -> bytes:
    """A camera's multi-picture file: two JPEG frames, the first one shown."""
    second = Image.new("RGB", first.size, (0, 0, 255))
    return encode(first, "MPO", save_all=True, append_images=[second])


def rgb_with_colour_key() -> Image.Image:
    """RGB whose left half is the tRNS key colour: transparent there, white once composited."""
    image = Image.new("RGB", (16, 16), (0, 160, 0))
    image.paste((10, 20, 30), (0, 0, 8, 16))
    image.info["transparency"] = (10, 20, 30)
    return image


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([10, 20, 30, 0, 0, 200] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, 6, 16))
    image.info["transparency"] = 0
    return image


def grey_alpha() -> Image.Image:
    image = Image.new("LA", (16, 16), (90, 255))
    image.paste((200, 40), (0, 0, 16, 8))
    return image


def sixteen_bit_grey() -> Image.Image:
    levels = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    return Image.fromarray(levels)


def cmyk() -> Image.Image:
    return Image.new("CMYK", (16, 16), (0, 200, 200, 30))


# Files whose decoded pixels only match an in-memory PIL image if the client keeps its
# transparency and mode handling exactly as the server does for the file.
ODD_MODE_FILES = {
    "p_trns.png": lambda: encode(palette_with_transparency(), "PNG"),
    "rgb_trns.png": lambda: encode(rgb_with_colour_key(), "PNG"),
    "la.png": lambda: encode(grey_alpha(), "PNG"),
    "i16.png": lambda: encode(sixteen_bit_grey(), "PNG"),
    "cmyk.jpg": lambda: encode(cmyk(), "JPEG", quality=95),
}


@pytest.mark.parametrize("name", sorted(ODD_MODE_FILES))
def test_a_pil_image_scores_exactly_as_its_file(name: str, client: Client, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(ODD_MODE_FILES[name]())
    from_file = client.predict("colors", path, top_k=3)
    with Image.open(path) as opened:
        from_object = client.predict("colors", opened, top_k=3)
    assert scores(from_object) == scores(from_file)


def test_transparency_changes_the_answer_so_the_parity_above_can_fail(client: Client) -> None:
    keyed = rgb_with_colour_key()
    without_key = keyed.copy()
    without_key.info.pop("transparency")
    assert scores(client.predict("colors", keyed)) != scores(client.predict("colors", without_key))


def truncated_png_image() -> Image.Image:
    return Image.open(io.BytesIO(truncated(encode(noisy(64, 64), "PNG"))))


def unsendable_inputs(tmp_path: Path) -> list[tuple[ImageInput, str]]:
    """Inputs the client cannot send, with what each one's message must say."""
    return [
        (b"", "image 1: the image data is empty"),
        (str(tmp_path / "missing.jpg"), f"image 2 ({tmp_path / 'missing.jpg'}): cannot read"),
        (np.zeros((8, 8, 3), dtype=np.float32), "image 3: a numpy image must be uint8"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "image 4: a numpy image must be HxW"),
        (truncated_png_image(), "image 5: the PIL image cannot be read"),
    ]


def check_in_place(results: list[Prediction], expected: list[tuple[ImageInput, str]]) -> None:
    assert len(results) == len(expected) + 2
    for result in (results[0], results[-1]):
        assert scores(result) == pytest.approx(
            channel_mean_scores(GOOD[None], NEWEST_TEMPERATURE)[0].tolist(), abs=1e-5
        )
    for index, (_, message) in enumerate(expected, start=1):
        failed = results[index]
        assert isinstance(failed, ImageError), failed
        assert (failed.index, failed.code) == (index, "INVALID_ARGUMENT")
        assert failed.message.startswith(message), failed.message


def test_each_unsendable_input_fails_alone_in_its_place(client: Client, tmp_path: Path) -> None:
    expected = unsendable_inputs(tmp_path)
    images = [GOOD, *(image for image, _ in expected), GOOD]
    check_in_place(client.predict("colors", images), expected)
    check_in_place(client.predict_many("colors", images, batch_size=2), expected)


async def test_the_async_client_keeps_unsendable_inputs_in_place_too(
    server: RunningServer, tmp_path: Path
) -> None:
    expected = unsendable_inputs(tmp_path)
    images = [GOOD, *(image for image, _ in expected), GOOD]
    async with AsyncClient(server.address, timeout=20) as client:
        check_in_place(await client.predict("colors", images), expected)
        check_in_place(await client.predict_many("colors", images, batch_size=3), expected)


def test_raise_on_error_raises_once_naming_the_first_failed_input(
    client: Client, tmp_path: Path
) -> None:
    images: list[ImageInput] = [GOOD, GOOD, str(tmp_path / "gone.png"), b"", GOOD]
    for call in (client.predict, client.predict_many):
        with pytest.raises(InvalidInputError) as caught:
            call("colors", images, raise_on_error=True)
        assert caught.value.index == 2
        assert str(caught.value).startswith(
            f"INVALID_ARGUMENT: image 2 ({tmp_path / 'gone.png'}): cannot read the file"
        )


def test_indices_are_the_callers_positions_across_requests(client: Client) -> None:
    images: list[ImageInput] = [*random_images(12)]
    images[9] = b"GIF89a and then nothing an image needs"
    results = client.predict_many("colors", images, batch_size=4)
    failed = results[9]
    assert isinstance(failed, ImageError)
    assert failed.index == 9
    assert failed.message.startswith("image 9: the GIF data cannot be decoded")
    with pytest.raises(InvalidInputError) as caught:
        client.predict_many("colors", images, batch_size=4, raise_on_error=True)
    assert str(caught.value).startswith("INVALID_ARGUMENT: image 9: the GIF data")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (encode(Image.new("RGB", (8, 8)), "TIFF"), "unsupported image format TIFF"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "format SVG"),
        (encode(Image.new("RGB", (8, 8)), "PDF"), "unsupported image format PDF"),
        (bytes(range(7, 250)), "not an image in a known format (none detected)"),
    ],
    ids=["tiff", "svg", "pdf", "random"],
)
def test_an_unusable_file_names_its_format_and_the_accepted_ones(
    client: Client, data: bytes, says: str
) -> None:
    result = client.predict("colors", data)
    assert isinstance(result, ImageError)
    assert says in result.message
    assert "accepted formats: JPEG, MPO, PNG, WEBP, BMP, GIF" in result.message
    assert " at 0x" not in result.message


@pytest.mark.parametrize(
    ("model", "options", "says"),
    [
        ("colors", {"threshold": 0.5}, "options.threshold: does not apply to classification"),
        ("colors", {"thresholds": {"red": 0.5}}, "options.class_thresholds: does not apply"),
        ("channels", {"top_k": 2}, "options.top_k: does not apply to multilabel models"),
        ("channels", {"min_confidence": 0.2}, "options.min_confidence: does not apply"),
        ("centroid", {"top_k": 1}, "options.top_k: does not apply to points models"),
        ("centroid", {"threshold": 0.1}, "options.threshold: does not apply to points models"),
    ],
)
def test_an_option_of_another_task_is_refused_naming_option_and_task(
    client: Client, model: str, options: dict[str, Any], says: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        client.predict(model, GOOD, **options)
    assert caught.value.message.startswith(says)
    assert caught.value.request_id


def write_odd_folder(root: Path) -> dict[str, str]:
    """Every kind of file a camera roll holds, and what the CLI must do with each."""
    picture = Image.fromarray(np.asarray(noisy(24, 24)))
    files = {
        "photo.jpg": (encode(picture, "JPEG", quality=90), "ok"),
        "scan.png": (encode(picture, "PNG"), "ok"),
        "web.webp": (encode(picture, "WEBP", quality=90), "ok"),
        "anim.gif": (encode(picture, "GIF"), "ok"),
        "old.bmp": (encode(picture, "BMP"), "ok"),
        "camera.mpo": (two_frame_mpo(picture), "ok"),
        "keyed.png": (encode(rgb_with_colour_key(), "PNG"), "ok"),
        "cmyk.jpg": (encode(cmyk(), "JPEG"), "ok"),
        "deep.png": (encode(sixteen_bit_grey(), "PNG"), "ok"),
        "empty.jpg": (b"", "failed"),
        "cut.png": (truncated(encode(noisy(64, 64), "PNG")), "failed"),
        "fax.tif": (encode(picture, "TIFF"), "skipped"),
        "notes.txt": (b"not an image", "skipped"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: outcome for name, (_, outcome) in files.items()}


def test_the_cli_predicts_every_accepted_file_and_names_each_failure_and_skip(
    server: RunningServer, tmp_path: Path
) -> None:
    outcomes = write_odd_folder(tmp_path)
    done = visionrpc("predict", "colors", str(tmp_path), "--json", server=server.address)
    assert done.returncode == 1, done.stderr
    printed = {Path(line["path"]).name: line for line in map(json.loads, done.stdout.splitlines())}
    assert set(printed) == {name for name, outcome in outcomes.items() if outcome != "skipped"}
    for name, line in printed.items():
        expected_type = "ImageError" if outcomes[name] == "failed" else "Classification"
        assert line["type"] == expected_type, (name, line)
    stderr = done.stderr.splitlines()
    assert stderr[0] == (
        "visionrpc predict: skipped 2 files not in a format the server accepts: "
        f"{tmp_path / 'fax.tif'}, {tmp_path / 'notes.txt'}"
    )
    failures = stderr[1:-1]
    assert len(failures) == 2
    assert any(f"({tmp_path / 'empty.jpg'}): the image data is empty" in f for f in failures)
    assert any(f"({tmp_path / 'cut.png'}): the PNG data cannot be decoded" in f for f in failures)
    assert stderr[-1] == "visionrpc predict: 2 of 11 images failed"


def test_a_file_named_on_the_command_line_is_sent_whatever_its_suffix(
    server: RunningServer, tmp_path: Path
) -> None:
    tiff = tmp_path / "fax.tif"
    tiff.write_bytes(encode(Image.new("RGB", (8, 8)), "TIFF"))
    done = visionrpc("predict", "colors", str(tiff), server=server.address)
    assert done.returncode == 1
    assert "unsupported image format TIFF; accepted formats: JPEG, MPO" in done.stderr


def test_model_info_lists_the_accepted_formats_and_their_suffixes(client: Client) -> None:
    info = client.model_info("colors")
    assert info.accepted_formats == ("JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF")
    assert {".jpg", ".jpeg", ".mpo", ".png", ".webp", ".bmp", ".gif"} <= set(
        info.accepted_extensions
    )
    assert ".tif" not in info.accepted_extensions
