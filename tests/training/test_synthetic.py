"""The generated datasets have the real datasets' layouts, file formats and signals."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionrpc.training.synthetic import (
    CAT_BREEDS,
    DOG_BREEDS,
    VOC_CLASSES,
    biwi_person_names,
    make_biwi,
    make_dataset,
    make_pets,
    make_voc,
)

PETS_FILE = re.compile(r"^(.+)_\d+\.jpg$")
BIWI_FRAME = re.compile(r"^frame_(\d{5})_rgb\.jpg$")


def test_pets_layout_is_oxford_iiit(tmp_path: Path) -> None:
    root = make_pets(tmp_path, breeds=12, per_breed=5)
    files = sorted((root / "images").iterdir())
    assert len(files) == 60
    breeds = {PETS_FILE.match(f.name).group(1) for f in files}  # type: ignore[union-attr]
    assert len(breeds) == 12
    cats, dogs = breeds & set(CAT_BREEDS), breeds & set(DOG_BREEDS)
    assert cats and dogs and cats | dogs == breeds
    assert all(name[0].isupper() for name in cats)
    assert all(name.islower() for name in dogs)
    sizes = set()
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.add(image.size)
            assert min(image.size) >= 120 and max(image.size) <= 400
    aspects = {w / h for w, h in sizes}
    assert min(aspects) < 0.8 and max(aspects) > 1.25


def test_pets_draws_each_breed_in_one_colour_of_eight(tmp_path: Path) -> None:
    root = make_pets(tmp_path, breeds=10, per_breed=4)
    # The drawn object is the saturated part of the picture; its hue is the breed's colour.
    hues: dict[str, list[float]] = {}
    for path in (root / "images").iterdir():
        hsv = np.asarray(Image.open(path).convert("HSV"), dtype=np.float64)
        saturated = (hsv[..., 1] > 150) & (hsv[..., 2] > 170)
        assert saturated.sum() > 0.03 * min(hsv.shape[:2]) ** 2
        breed = PETS_FILE.match(path.name).group(1)  # type: ignore[union-attr]
        hues.setdefault(breed, []).append(float(np.median(hsv[..., 0][saturated])))

    def hue_distance(a: float, b: float) -> float:  # PIL's hue wraps at 256
        return min(abs(a - b), 256 - abs(a - b))

    for breed, values in hues.items():
        assert max(hue_distance(values[0], h) for h in values) < 6, breed
    # Ten breeds, eight colours: at least eight clearly different hues.
    typical = [values[0] for values in hues.values()]
    distinct = [
        h for i, h in enumerate(typical) if all(hue_distance(h, g) > 12 for g in typical[:i])
    ]
    assert len(distinct) == 8


def test_voc_layout_is_fastai_pascal_2007(tmp_path: Path) -> None:
    root = make_voc(tmp_path, images=40)
    with (root / "train.csv").open(newline="") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["fname", "labels", "is_valid"]
    assert len(rows) == 41
    seen_labels: set[str] = set()
    for fname, labels, is_valid in rows[1:]:
        assert re.fullmatch(r"\d{6}\.jpg", fname)
        with Image.open(root / "train" / fname) as image:
            assert image.format == "JPEG"
        names = labels.split(" ")
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names)
        seen_labels.update(names)
        assert is_valid in ("True", "False")
    assert seen_labels <= set(VOC_CLASSES)
    assert {row[2] for row in rows[1:]} == {"True", "False"}
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(r[0] for r in rows[1:])


def test_biwi_layout_is_the_fastai_sample(tmp_path: Path) -> None:
    root = make_biwi(tmp_path, people=4, frames_per_person=3)
    people = sorted(p.name for p in root.iterdir())
    assert len(people) == 4 and "13" in people
    assert all(re.fullmatch(r"\d\d", name) for name in people)
    for person in people:
        folder = root / person
        frames = sorted(p.name for p in folder.glob("*_rgb.jpg"))
        assert len(frames) == 3 and all(BIWI_FRAME.match(name) for name in frames)
        for name in frames:
            assert (folder / name.replace("_rgb.jpg", "_pose.txt")).is_file()
            with Image.open(folder / name) as image:
                assert image.size == (640, 480) and image.format == "JPEG"
        assert (folder / "rgb.cal").is_file()


def test_biwi_files_work_with_the_fastai_book_recipe(tmp_path: Path) -> None:
    root = make_biwi(tmp_path, people=2, frames_per_person=2)
    for pose_file in root.glob("*/*_pose.txt"):
        cal = np.genfromtxt(pose_file.parent / "rgb.cal", skip_footer=6)
        ctr = np.genfromtxt(pose_file, skip_header=3)
        x = ctr[0] * cal[0][0] / ctr[2] + cal[0][2]
        y = ctr[1] * cal[1][1] / ctr[2] + cal[1][2]
        assert 0 < x < 640 and 0 < y < 480
        rotation = np.genfromtxt(pose_file, skip_footer=1)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)


@pytest.mark.parametrize(
    ("people", "expected"),
    [(1, ["13"]), (4, ["01", "09", "13", "24"]), (24, [f"{n:02d}" for n in range(1, 25)])],
)
def test_biwi_people_are_real_folder_names_including_13(people: int, expected: list[str]) -> None:
    assert biwi_person_names(people) == expected


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    def pictures(root: Path) -> list[bytes]:
        return [p.read_bytes() for p in sorted(root.rglob("*.jpg"))]

    first = pictures(make_dataset("voc", tmp_path / "a", images=4, seed=3))
    again = pictures(make_dataset("voc", tmp_path / "b", images=4, seed=3))
    other = pictures(make_dataset("voc", tmp_path / "c", images=4, seed=4))
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("kind", "options"),
    [("pets", {"breeds": 0}), ("pets", {"breeds": 38}), ("voc", {"images": 1}),
     ("biwi", {"people": 25}), ("biwi", {"frames_per_person": 0}), ("coco", {})],
)  # fmt: skip
def test_make_dataset_refuses_impossible_requests(
    tmp_path: Path, kind: str, options: dict[str, int]
) -> None:
    with pytest.raises(ValueError):
        make_dataset(kind, tmp_path, **options)
