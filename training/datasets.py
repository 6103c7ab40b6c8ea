"""Readers for the three datasets of the fastai book, each in its native layout.

* ``pets``: Oxford-IIIT Pet, ``<breed>_<n>.jpg`` files (in ``images/`` under the root or
  in the root itself); the breed is the file name less its number, a seeded random 20%
  is held out.
* ``voc``: PASCAL VOC 2007 as fastai ships it: ``train.csv`` (``fname,labels,is_valid``)
  and the images in ``train/``; labels are space separated. ``valid_pct`` replaces the
  ``is_valid`` column with a seeded random split (fastai's RandomSplitter), for a csv
  whose rows are all one split.
* ``biwi``: fastai's BIWI head pose sample: one folder per person (``01`` .. ``24``) with
  ``frame_NNNNN_rgb.jpg``, ``frame_NNNNN_pose.txt`` and the camera's ``rgb.cal``; the
  target is the head centre projected into the image, one person is held out (``1``
  names the folder ``01``).

A bad file is reported in ``Dataset.skipped`` (and logged), or raises ``DatasetError``
when ``strict=True``. With ``need_train=False`` (evaluation) only the validation split
must be there. A split left empty is an error that says which option fixes it. This
module imports no torch: evaluation tools read datasets with
only the server extra installed.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from visionrpc.server.preprocess import ImageLimits

from .kinds import get_kind

log = logging.getLogger(__name__)

PETS_NAME = re.compile(r"^(.+)_\d+\.jpg$")
VOC_HEADER = ["fname", "labels", "is_valid"]
BIWI_POINT_NAMES = ("head_center",)
# rgb.cal starts with the 3x3 intrinsics; distortion and extrinsics follow, unused here.
INTRINSICS_ROW_LENGTHS = (3, 3, 3)
# The limits training's load_image calls run under (training.data uses the defaults too).
DEFAULT_LIMITS = ImageLimits()
# Non-empty rows of frame_NNNNN_pose.txt: head rotation 3x3, then its centre in mm.
POSE_ROW_LENGTHS = (3, 3, 3, 3)

Target = int | tuple[int, ...] | tuple[float, ...]
T = TypeVar("T")


class DatasetError(ValueError):
    """A dataset that cannot be used, or a bad file under ``strict=True``; names the path."""


@dataclass(frozen=True)
class Item:
    """One example: pets, a class index; voc, label indices; biwi, (x, y) in original pixels."""

    path: Path
    target: Target


@dataclass(frozen=True)
class Dataset:
    kind: str
    task: str
    vocab: tuple[str, ...]
    train: list[Item]
    valid: list[Item]
    root: Path
    skipped: list[tuple[Path, str]]
    # How the validation split was chosen, in words (printed beside its numbers).
    split: str = ""


class _Skips:
    """Collects bad files, or raises at the first one in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.found: list[tuple[Path, str]] = []

    def add(self, path: Path, reason: str) -> None:
        if self.strict:
            raise DatasetError(f"{path}: {reason}")
        log.warning("skipping %s: %s", path, reason)
        self.found.append((path, reason))

    def add_error(self, path: Path, error: DatasetError, note: str = "") -> None:
        reason = str(error).removeprefix(f"{path}: ")
        self.add(path, reason if self.strict else reason + note)


def read_pets(
    root: Path,
    *,
    valid_pct: float = 0.2,
    seed: int = 42,
    strict: bool = False,
    need_train: bool = True,
) -> Dataset:
    _check_valid_pct(valid_pct)
    root = Path(root)
    folder = root / "images" if (root / "images").is_dir() else root
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of pet images")
    skips = _Skips(strict)
    labelled: list[tuple[Path, str]] = []
    # Sorted, so the split depends on the seed and never on the filesystem's order.
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".jpg" or not path.is_file():
            continue  # the real folder also holds a few .mat files
        match = PETS_NAME.match(path.name)
        if match is None:
            skips.add(path, "file name does not match <breed>_<number>.jpg")
        else:
            labelled.append((path, match.group(1)))
    labelled = _decodable(labelled, skips)
    if not labelled:
        raise DatasetError(f"{folder}: no <breed>_<number>.jpg images")
    vocab = tuple(sorted({breed for _, breed in labelled}))
    index = {breed: i for i, breed in enumerate(vocab)}
    items = [Item(path, index[breed]) for path, breed in labelled]
    train, valid = _random_split(items, valid_pct, seed)
    split = f"a random {valid_pct:.0%} (seed {seed})"
    _check_splits(folder, train, valid, need_train, "use --valid-pct between 0 and 1")
    return Dataset(
        kind="pets",
        task="classification",
        vocab=vocab,
        train=train,
        valid=valid,
        root=root,
        skipped=skips.found,
        split=split,
    )


def read_voc(
    root: Path,
    *,
    valid_pct: float | None = None,
    seed: int = 42,
    strict: bool = False,
    need_train: bool = True,
) -> Dataset:
    if valid_pct is not None:
        _check_valid_pct(valid_pct)
    root = Path(root)
    csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: missing (expected fname,labels,is_valid)")
    skips = _Skips(strict)
    rows: list[tuple[Path, tuple[tuple[str, ...], bool]]] = []
    with csv_path.open(newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header != VOC_HEADER:
            raise DatasetError(f"{csv_path}: header must be {','.join(VOC_HEADER)}, not {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            where = Path(f"{csv_path}:{line}")
            if len(row) != 3:
                skips.add(where, f"expected 3 fields, found {len(row)}")
                continue
            fname, labels, is_valid = row
            if is_valid not in ("True", "False"):
                skips.add(where, f"is_valid must be True or False, not {is_valid!r}")
                continue
            path = root / "train" / fname
            if not path.is_file():
                skips.add(path, "listed in train.csv but missing")
                continue
            rows.append((path, (tuple(labels.split()), is_valid == "True")))
    rows = _decodable(rows, skips)
    if not rows:
        raise DatasetError(f"{csv_path}: no usable rows")
    vocab = tuple(sorted({label for _, (labels, _) in rows for label in labels}))
    index = {label: i for i, label in enumerate(vocab)}

    def item(path: Path, labels: tuple[str, ...]) -> Item:
        return Item(path, tuple(sorted({index[label] for label in labels})))

    if valid_pct is not None:
        items = [item(path, labels) for path, (labels, _) in rows]
        train, valid = _random_split(items, valid_pct, seed)
        split = f"a random {valid_pct:.0%} (seed {seed}), not is_valid"
    else:
        train = [item(path, labels) for path, (labels, valid) in rows if not valid]
        valid = [item(path, labels) for path, (labels, valid) in rows if valid]
        split = "the is_valid=True rows"
        if not valid or (need_train and not train):
            only = "True" if valid else "False"
            raise DatasetError(
                f"{csv_path}: all {len(rows)} usable rows have is_valid={only}, so there is "
                f"nothing to {'train' if valid else 'validate'} on; pass --valid-pct 0.2 to "
                "hold out a random share instead (as fastai's RandomSplitter)"
            )
    _check_splits(csv_path, train, valid, need_train, "use --valid-pct between 0 and 1")
    return Dataset(
        kind="voc",
        task="multilabel",
        vocab=vocab,
        train=train,
        valid=valid,
        root=root,
        skipped=skips.found,
        split=split,
    )


def read_biwi(
    root: Path, *, valid_person: str = "13", strict: bool = False, need_train: bool = True
) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    people = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not people:
        hint = ""
        if any(root.glob("frame_*_rgb.jpg")):
            hint = f"; it holds frames itself, as one person's folder: use --data {root.parent}"
        raise DatasetError(f"{root}: no person folders (01, 02, ...){hint}")
    found = ", ".join(p.name for p in people)
    held_out = _person_folder(people, valid_person)
    if held_out is None:
        raise DatasetError(
            f"{root}: no folder for validation person {valid_person!r}; person folders "
            f"found: {found}. Choose the held-out one with --valid-person (1 matches 01)"
        )
    if need_train and len(people) == 1:
        raise DatasetError(
            f"{root}: the only person folder is {found}, the validation person; training "
            "needs frames of another person: add their folders, or point --data at the "
            "folder that holds all of them"
        )
    skips = _Skips(strict)
    train: list[Item] = []
    valid: list[Item] = []
    for person in people:
        if person != held_out and not need_train:
            continue  # evaluation reads only the held-out person
        try:
            intrinsics = read_calibration(person / "rgb.cal")
        except DatasetError as exc:
            skips.add_error(person / "rgb.cal", exc, "; all of this person's frames skipped")
            continue
        frames: list[tuple[Path, tuple[float, float]]] = []
        for image_path in sorted(person.glob("frame_*_rgb.jpg")):
            pose_path = image_path.with_name(image_path.name[: -len("rgb.jpg")] + "pose.txt")
            try:
                frames.append((image_path, project(read_pose_centre(pose_path), intrinsics)))
            except DatasetError as exc:
                skips.add_error(pose_path, exc)
        split = valid if person == held_out else train
        split.extend(Item(path, centre) for path, centre in _decodable(frames, skips))
    _check_splits(
        root / held_out.name, train, valid, need_train, "choose another with --valid-person"
    )
    return Dataset(
        kind="biwi",
        task="points",
        vocab=BIWI_POINT_NAMES,
        train=train,
        valid=valid,
        root=root,
        skipped=skips.found,
        split=f"person {held_out.name}",
    )


def read_dataset(kind: str, root: Path, **options: Any) -> Dataset:
    """Read a dataset by kind; options go to the reader (``strict``, ``valid_pct``, ...)."""
    try:
        reader: Callable[..., Dataset] = globals()[get_kind(kind).reader]
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    return reader(Path(root), **options)


def read_calibration(path: Path) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` of an ``rgb.cal`` file (its first three rows are the intrinsics)."""
    rows = _number_rows(path, INTRINSICS_ROW_LENGTHS, more_rows=True)
    fx, cx, fy, cy = rows[0][0], rows[0][2], rows[1][1], rows[1][2]
    if fx <= 0 or fy <= 0:
        raise DatasetError(f"{path}: focal lengths must be positive, not {fx}, {fy}")
    return fx, fy, cx, cy


def read_pose_centre(path: Path) -> tuple[float, float, float]:
    """The head centre in camera millimetres: the last row of a ``pose.txt`` file."""
    x, y, z = _number_rows(path, POSE_ROW_LENGTHS)[3]
    if z <= 0:
        raise DatasetError(f"{path}: the head must be in front of the camera (z = {z})")
    return x, y, z


def project(
    centre: tuple[float, float, float], intrinsics: tuple[float, float, float, float]
) -> tuple[float, float]:
    """Pinhole projection of a camera-space point to image pixels."""
    fx, fy, cx, cy = intrinsics
    return centre[0] * fx / centre[2] + cx, centre[1] * fy / centre[2] + cy


def image_problem(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> str | None:
    """Why ``load_image`` would refuse this file, or None.

    JPEGs are decoded in draft mode (DCT-scaled to 1/8), which still reads every
    entropy-coded byte, so truncated and corrupt files fail for a fraction of a full decode.
    """
    try:
        if path.stat().st_size > limits.max_bytes:
            return f"over the serving limit of {limits.max_bytes} bytes"
        with Image.open(path) as image:
            if image.width * image.height > limits.max_pixels:
                return f"{image.width}x{image.height} is over the serving limit of pixels"
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        return f"not a decodable image: {exc}"
    return None


def _check_valid_pct(valid_pct: float) -> None:
    if not 0.0 < valid_pct < 1.0:
        raise DatasetError(f"--valid-pct must be between 0 and 1, not {valid_pct}")


def _random_split(items: list[Item], valid_pct: float, seed: int) -> tuple[list[Item], list[Item]]:
    """fastai's RandomSplitter: a seeded shuffle, the first ``valid_pct`` held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    valid_ids = set(order[: round(valid_pct * len(items))])
    train = [item for i, item in enumerate(items) if i not in valid_ids]
    valid = [item for i, item in enumerate(items) if i in valid_ids]
    return train, valid


def _check_splits(
    where: Path, train: list[Item], valid: list[Item], need_train: bool, remedy: str
) -> None:
    if not valid:
        raise DatasetError(f"{where}: no usable validation images; {remedy}")
    if need_train and not train:
        raise DatasetError(f"{where}: no usable training images; {remedy}")


def _person_folder(people: list[Path], wanted: str) -> Path | None:
    """The folder named ``wanted``, or numbered like it (``1`` is ``01``)."""
    for person in people:
        if person.name == wanted:
            return person
    if wanted.isdigit():
        for person in people:
            if int(person.name) == int(wanted):
                return person
    return None


def _decodable(candidates: list[tuple[Path, T]], skips: _Skips) -> list[tuple[Path, T]]:
    """The candidates whose image decodes, in order; the others go to ``skips``."""
    # Decoders release the GIL, so threads check several files at once.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(image_problem, [path for path, _ in candidates]))
    kept = []
    for (path, value), problem in zip(candidates, problems, strict=True):
        if problem is None:
            kept.append((path, value))
        else:
            skips.add(path, problem)
    return kept


def _number_rows(
    path: Path, lengths: tuple[int, ...], *, more_rows: bool = False
) -> list[list[float]]:
    """The file's non-empty rows as numbers; the first rows must have these lengths."""
    try:
        lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read: {exc}") from exc
    found = tuple(len(line) for line in lines)
    if (found[: len(lengths)] if more_rows else found) != lengths:
        raise DatasetError(
            f"{path}: expected rows of {', '.join(map(str, lengths))} values, "
            f"found {'rows of ' + ', '.join(map(str, found)) if found else 'no rows'}"
        )
    try:
        rows = [[float(value) for value in line] for line in lines]
    except ValueError as exc:
        raise DatasetError(f"{path}: not a number: {exc}") from exc
    if not all(math.isfinite(value) for row in rows for value in row):
        raise DatasetError(f"{path}: holds a non-finite number")
    return rows
