"""Dataset readers on generated datasets, on real-format files, and on broken files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionrpc.training.datasets import (
    DatasetError,
    read_biwi,
    read_calibration,
    read_dataset,
    read_pets,
    read_pose_centre,
    read_voc,
)
from visionrpc.training.synthetic import make_biwi, make_pets, make_voc

# The first person's rgb.cal and one pose.txt of the real BIWI sample, as fastai ships it.
REAL_RGB_CAL = """517.679 0 320 
0 517.679 240.5 
0 0 1 

0 0 0 0 

0.999947 0.00432361 0.00929419 
-0.00446314 0.999877 0.0150443 
-0.00922719 -0.0150855 0.999843 

-24.0198 5.8411 -13.2372 
"""  # noqa: W291
REAL_POSE = """0.990691 0.0313107 -0.132489 
-0.0330898 0.999379 -0.0111854 
0.131992 0.0154563 0.991132 

61.0645 20.3211 961.624 
"""  # noqa: W291


@pytest.fixture(scope="module")
def pets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pets(tmp_path_factory.mktemp("pets"), breeds=10, per_breed=10)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), images=40)


@pytest.fixture(scope="module")
def biwi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_biwi(tmp_path_factory.mktemp("biwi"), people=4, frames_per_person=5)


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / root.name))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# pets


def test_pets_labels_come_from_file_names(pets_root: Path) -> None:
    dataset = read_pets(pets_root)
    assert (dataset.kind, dataset.task) == ("pets", "classification")
    assert len(dataset.vocab) == 10 and list(dataset.vocab) == sorted(dataset.vocab)
    assert len(dataset.train) + len(dataset.valid) == 100
    assert len(dataset.valid) == 20
    for item in dataset.train + dataset.valid:
        assert item.path.name.startswith(dataset.vocab[item.target] + "_")  # type: ignore[index]
    assert dataset.skipped == []


def test_pets_accepts_the_root_or_its_images_folder(pets_root: Path) -> None:
    assert read_pets(pets_root).valid == read_pets(pets_root / "images").valid


def test_pets_split_is_fixed_by_the_seed_not_the_folder_order(
    pets_root: Path, tmp_path: Path
) -> None:
    first = read_pets(pets_root, seed=7)
    # The same files, created in the reverse order, so a directory listing differs.
    other = tmp_path / "images"
    other.mkdir()
    for path in sorted((pets_root / "images").iterdir(), reverse=True):
        shutil.copyfile(path, other / path.name)
    again = read_pets(tmp_path, seed=7)
    assert [i.path.name for i in again.valid] == [i.path.name for i in first.valid]
    reseeded = read_pets(pets_root, seed=8)
    assert {i.path for i in reseeded.valid} != {i.path for i in first.valid}
    assert {i.path for i in first.train}.isdisjoint(i.path for i in first.valid)


def test_pets_valid_pct_sets_the_split_size(pets_root: Path) -> None:
    assert len(read_pets(pets_root, valid_pct=0.5).valid) == 50
    with pytest.raises(DatasetError):
        read_pets(pets_root, valid_pct=1.0)


def test_pets_skips_and_reports_bad_files(pets_root: Path, tmp_path: Path) -> None:
    root = copy_of(pets_root, tmp_path)
    images = root / "images"
    (images / "Bengal_999.jpg").write_bytes(b"this is not a jpeg")
    truncate(images / "Bengal_1.jpg")
    (images / "nonumber.jpg").write_bytes((images / "Bengal_2.jpg").read_bytes())
    (images / "Bengal_3.mat").write_bytes(b"matlab")  # the real folder has these: ignored
    # More pixels than the server's load_image accepts (a PNG: the real folder has a few).
    Image.new("1", (6400, 6400)).save(images / "Bengal_4.jpg", format="PNG")
    dataset = read_pets(root)
    skipped = {path.name: reason for path, reason in dataset.skipped}
    assert set(skipped) == {"Bengal_999.jpg", "Bengal_1.jpg", "nonumber.jpg", "Bengal_4.jpg"}
    assert "decodable" in skipped["Bengal_1.jpg"]
    assert "limit" in skipped["Bengal_4.jpg"]
    assert len(dataset.train) + len(dataset.valid) == 98
    with pytest.raises(DatasetError, match=re.escape("nonumber.jpg")):
        read_pets(root, strict=True)
    (images / "nonumber.jpg").unlink()
    with pytest.raises(DatasetError, match=re.escape("Bengal_1.jpg: not a decodable image")):
        read_pets(root, strict=True)


def test_pets_without_images_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        read_pets(tmp_path)


# voc


def test_voc_reads_labels_and_split_from_the_csv(voc_root: Path) -> None:
    dataset = read_voc(voc_root)
    assert (dataset.kind, dataset.task) == ("voc", "multilabel")
    assert list(dataset.vocab) == sorted(dataset.vocab)
    rows = [line.split(",") for line in (voc_root / "train.csv").read_text().splitlines()[1:]]
    expected = {
        fname: (set(labels.split()), is_valid == "True") for fname, labels, is_valid in rows
    }
    for valid, items in ((False, dataset.train), (True, dataset.valid)):
        for item in items:
            assert isinstance(item.target, tuple)
            labels = {dataset.vocab[int(i)] for i in item.target}
            assert expected[item.path.name] == (labels, valid)
    assert len(dataset.train) + len(dataset.valid) == 40
    assert set(dataset.vocab) == {label for labels, _ in expected.values() for label in labels}


def test_voc_skips_rows_naming_missing_or_broken_files(voc_root: Path, tmp_path: Path) -> None:
    root = copy_of(voc_root, tmp_path)
    with (root / "train.csv").open("a") as stream:
        stream.write("999999.jpg,dog,False\n000005.jpg,cat,maybe\n000005.jpg,cat\n")
    first_image = sorted((root / "train").iterdir())[0]
    truncate(first_image)
    dataset = read_voc(root)
    reasons = [reason for _, reason in dataset.skipped]
    # Row problems as the csv is read, then images that do not decode.
    assert [path.name for path, _ in dataset.skipped] == [
        "999999.jpg",
        "train.csv:43",
        "train.csv:44",
        first_image.name,
    ]
    assert "missing" in reasons[0] and "is_valid" in reasons[1]
    assert "3 fields" in reasons[2] and "decodable" in reasons[3]
    assert len(dataset.train) + len(dataset.valid) == 39
    with pytest.raises(DatasetError, match=re.escape("999999.jpg: listed in train.csv but")):
        read_voc(root, strict=True)
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{first_image.name}: not a decodable")):
        read_voc(root, strict=True)


def test_voc_with_every_row_valid_says_so_and_splits_at_random_on_request(
    voc_root: Path, tmp_path: Path
) -> None:
    # fastai's PASCAL_2007 test csv, or a user's own: every row is is_valid=True.
    root = copy_of(voc_root, tmp_path)
    lines = (root / "train.csv").read_text().splitlines()
    rows = [line.rsplit(",", 1)[0] + ",True" for line in lines[1:]]
    (root / "train.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    with pytest.raises(DatasetError) as refused:
        read_voc(root)
    message = str(refused.value)
    assert "all 40 usable rows have is_valid=True" in message
    assert "nothing to train on" in message and "--valid-pct" in message
    split = read_voc(root, valid_pct=0.25, seed=3)
    assert (len(split.train), len(split.valid)) == (30, 10)
    assert "random 25%" in split.split
    assert read_voc(root, valid_pct=0.25, seed=3).valid == split.valid
    # Evaluation needs only the validation split: all 40 rows.
    assert len(read_voc(root, need_train=False).valid) == 40
    with pytest.raises(DatasetError, match="valid-pct"):
        read_voc(root, valid_pct=1.0)


def test_voc_refuses_a_csv_without_its_header(voc_root: Path, tmp_path: Path) -> None:
    root = copy_of(voc_root, tmp_path)
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[1:]))
    with pytest.raises(DatasetError, match="header"):
        read_voc(root)
    (root / "train.csv").unlink()
    with pytest.raises(DatasetError, match=re.escape("train.csv")):
        read_voc(root)


# biwi


def test_biwi_holds_out_one_person(biwi_root: Path) -> None:
    dataset = read_biwi(biwi_root)
    assert (dataset.kind, dataset.task, dataset.vocab) == ("biwi", "points", ("head_center",))
    assert {item.path.parent.name for item in dataset.valid} == {"13"}
    assert {item.path.parent.name for item in dataset.train} == {"01", "09", "24"}
    assert len(dataset.valid) == 5 and len(dataset.train) == 15
    other = read_biwi(biwi_root, valid_person="09")
    assert {item.path.parent.name for item in other.valid} == {"09"}
    with pytest.raises(DatasetError, match="05"):
        read_biwi(biwi_root, valid_person="05")


def test_biwi_valid_person_matches_its_folder_by_number(biwi_root: Path) -> None:
    people = sorted(p.name for p in biwi_root.iterdir() if p.is_dir())
    first = people[0]
    assert first.startswith("0")
    dataset = read_biwi(biwi_root, valid_person=str(int(first)))
    assert {item.path.parent.name for item in dataset.valid} == {first}
    assert dataset.split == f"person {first}"


def test_biwi_missing_person_lists_the_folders_found(biwi_root: Path) -> None:
    with pytest.raises(DatasetError) as refused:
        read_biwi(biwi_root, valid_person="21")
    message = str(refused.value)
    people = sorted(p.name for p in biwi_root.iterdir() if p.is_dir())
    assert f"person folders found: {', '.join(people)}" in message
    assert "--valid-person" in message


def test_biwi_with_one_person_trains_nowhere_but_evaluates(biwi_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "one"
    shutil.copytree(biwi_root / "13", root / "13")
    with pytest.raises(DatasetError, match="the only person folder is 13, the validation"):
        read_biwi(root)
    held_out = read_biwi(root, need_train=False)
    assert held_out.train == [] and len(held_out.valid) == 5
    # Pointed at the person's folder itself, it says to use the parent.
    with pytest.raises(DatasetError, match=re.escape(f"use --data {root}")):
        read_biwi(root / "13")


def test_biwi_targets_are_the_centre_of_the_drawn_head(biwi_root: Path) -> None:
    dataset = read_biwi(biwi_root)
    for item in dataset.train + dataset.valid:
        assert isinstance(item.target, tuple)
        pixels = np.asarray(Image.open(item.path), dtype=np.int32)
        # The room is cool-toned and the head warm-toned: red over blue marks the head.
        head = pixels[..., 0] - pixels[..., 2] > 20
        ys, xs = np.nonzero(head)
        centre = xs.mean() + 0.5, ys.mean() + 0.5  # pixel i covers [i, i + 1)
        assert np.hypot(centre[0] - item.target[0], centre[1] - item.target[1]) < 1.0


def test_biwi_targets_follow_the_fastai_book_recipe(tmp_path: Path) -> None:
    (tmp_path / "rgb.cal").write_text(REAL_RGB_CAL)
    (tmp_path / "pose.txt").write_text(REAL_POSE)
    cal = np.genfromtxt(tmp_path / "rgb.cal", skip_footer=6)
    ctr = np.genfromtxt(tmp_path / "pose.txt", skip_header=3)
    fx, fy, cx, cy = read_calibration(tmp_path / "rgb.cal")
    assert (fx, fy, cx, cy) == (cal[0][0], cal[1][1], cal[0][2], cal[1][2])
    assert read_pose_centre(tmp_path / "pose.txt") == tuple(ctr)


@pytest.mark.parametrize(
    "pose_text",
    ["", "1 0 0\n0 1 0\n0 0 1\n\n61.0 20.3\n", "1 0 0\n0 1 0\n0 0 1\n\n61.0 x 961.6\n",
     "1 0 0\n0 1 0\n0 0 1\n\n61.0 20.3 -5\n", "1 0 0\n0 1 0\n0 0 1\n\n61.0 nan 961.6\n"],
    ids=["empty", "short", "text", "behind-camera", "nan"],
)  # fmt: skip
def test_biwi_skips_frames_with_a_malformed_pose(
    biwi_root: Path, tmp_path: Path, pose_text: str
) -> None:
    root = copy_of(biwi_root, tmp_path)
    pose = sorted((root / "09").glob("*_pose.txt"))[0]
    pose.write_text(pose_text)
    dataset = read_biwi(root)
    assert [path for path, _ in dataset.skipped] == [pose]
    assert str(pose) not in dataset.skipped[0][1]  # the reason, without the path again
    assert len(dataset.train) == 14
    with pytest.raises(DatasetError, match=re.escape(pose.name)):
        read_biwi(root, strict=True)


def test_biwi_skips_a_person_with_a_malformed_calibration(biwi_root: Path, tmp_path: Path) -> None:
    root = copy_of(biwi_root, tmp_path)
    lines = (root / "24" / "rgb.cal").read_text().splitlines()
    (root / "24" / "rgb.cal").write_text("\n".join(lines[:2]) + "\n")
    dataset = read_biwi(root)
    assert [path for path, _ in dataset.skipped] == [root / "24" / "rgb.cal"]
    assert {item.path.parent.name for item in dataset.train} == {"01", "09"}
    with pytest.raises(DatasetError, match=re.escape("rgb.cal")):
        read_biwi(root, strict=True)


def test_biwi_skips_broken_images_and_missing_poses(biwi_root: Path, tmp_path: Path) -> None:
    root = copy_of(biwi_root, tmp_path)
    frames = sorted((root / "01").glob("*_rgb.jpg"))
    truncate(frames[0])
    missing_pose = frames[1].with_name(frames[1].name.replace("rgb.jpg", "pose.txt"))
    missing_pose.unlink()
    dataset = read_biwi(root)
    assert [path for path, _ in dataset.skipped] == [missing_pose, frames[0]]
    assert len(dataset.train) == 13


# dispatch


def test_read_dataset_dispatches_by_kind(pets_root: Path, biwi_root: Path) -> None:
    assert (
        read_dataset("pets", pets_root, valid_pct=0.5).valid
        == read_pets(pets_root, valid_pct=0.5).valid
    )
    assert read_dataset("biwi", biwi_root).kind == "biwi"
    with pytest.raises(DatasetError, match="coco"):
        read_dataset("coco", pets_root)


def test_reading_datasets_needs_no_torch() -> None:
    # Evaluation tools read datasets where only the server extra is installed.
    code = "import sys, visionrpc.training.datasets; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
