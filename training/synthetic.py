"""Small generated datasets in the exact layouts of the real ones, with a learnable signal.

They stand in for Oxford-IIIT Pet, PASCAL VOC 2007 and BIWI head pose in tests and smoke
runs (``visionrpc train make-data pets DIR``): the readers cannot tell them from the real
layouts, and a small model learns them in a few epochs.

* pets: each breed is a coloured shape (hue and outline both differ between breeds) on a
  noisy low-saturation background, at random sizes, rotations and image aspect ratios.
* voc: each class is a shape/colour pair; one to three objects per image.
* biwi: 640x480 frames of a cool-toned room with a warm-toned head (hair, skin, eyes,
  mouth) centred exactly where the frame's pose.txt and the person's rgb.cal project it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Oxford-IIIT Pet: cat breeds are capitalised, dog breeds lower case.
CAT_BREEDS = (
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
    "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
)  # fmt: skip
DOG_BREEDS = (
    "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "boxer",
    "chihuahua", "english_cocker_spaniel", "english_setter", "german_shorthaired",
    "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger",
    "miniature_pinscher", "newfoundland", "pomeranian", "pug", "saint_bernard", "samoyed",
    "scottish_terrier", "shiba_inu", "staffordshire_bull_terrier", "wheaten_terrier",
    "yorkshire_terrier",
)  # fmt: skip
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# Eight well separated hues and five outlines: item j gets colour j % 8 and shape j % 5,
# so the first 40 items all differ, and two that share one attribute differ a lot in the other.
COLOURS = (
    (220, 40, 40), (240, 140, 20), (230, 220, 30), (40, 180, 60),
    (30, 200, 210), (40, 70, 220), (140, 50, 200), (240, 90, 190),
)  # fmt: skip
SHAPES = ("disc", "square", "triangle", "star", "cross")
BIWI_PEOPLE = 24
BIWI_SIZE = (640, 480)
JPEG_QUALITY = 90

Rgb = tuple[int, int, int]


def make_pets(root: Path, *, breeds: int = 10, per_breed: int = 30, seed: int = 0) -> Path:
    """Write ``root/images/<breed>_<n>.jpg``; returns ``root``."""
    # Alternate cats and dogs so that any count has both spellings.
    names = [name for pair in zip(CAT_BREEDS, DOG_BREEDS, strict=False) for name in pair]
    names += DOG_BREEDS[len(CAT_BREEDS) :]
    if not 1 <= breeds <= len(names):
        raise ValueError(f"breeds must be in 1..{len(names)}, not {breeds}")
    if per_breed < 1:
        raise ValueError(f"per_breed must be positive, not {per_breed}")
    rng = random.Random(seed)
    folder = Path(root) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for j, breed in enumerate(names[:breeds]):
        for n in range(1, per_breed + 1):
            size = (rng.randint(120, 400), rng.randint(120, 400))
            image = _noisy_background(rng, size, _muted_colour(rng))
            draw = ImageDraw.Draw(image)
            radius = rng.uniform(0.22, 0.32) * min(size)
            # Near the middle, so that a centre crop of any aspect keeps most of it.
            centre = (
                size[0] / 2 + rng.uniform(-0.12, 0.12) * min(size),
                size[1] / 2 + rng.uniform(-0.12, 0.12) * min(size),
            )
            _draw_shape(draw, SHAPES[j % 5], centre, radius, rng.uniform(0, 360), COLOURS[j % 8])
            image.save(folder / f"{breed}_{n}.jpg", quality=JPEG_QUALITY)
    return Path(root)


def make_voc(root: Path, *, images: int = 300, seed: int = 0) -> Path:
    """Write ``root/train.csv`` (fname,labels,is_valid) and ``root/train/NNNNNN.jpg``."""
    if images < 2:
        raise ValueError(f"images must be at least 2 (a train and a valid one), not {images}")
    rng = random.Random(seed)
    folder = Path(root) / "train"
    folder.mkdir(parents=True, exist_ok=True)
    valid_ids = set(rng.sample(range(images), max(1, round(0.3 * images))))
    rows = ["fname,labels,is_valid"]
    for i in range(images):
        size = rng.choice(((500, 375), (375, 500), (500, 333), (400, 400), (333, 500)))
        image = _noisy_background(rng, size, _muted_colour(rng))
        draw = ImageDraw.Draw(image)
        classes = rng.sample(range(len(VOC_CLASSES)), rng.randint(1, 3))
        # One object per quadrant, so objects never hide each other.
        quadrants = rng.sample(range(4), len(classes))
        for class_index, quadrant in zip(classes, quadrants, strict=True):
            cell_w, cell_h = size[0] / 2, size[1] / 2
            centre = (
                (quadrant % 2 + rng.uniform(0.4, 0.6)) * cell_w,
                (quadrant // 2 + rng.uniform(0.4, 0.6)) * cell_h,
            )
            radius = rng.uniform(0.3, 0.42) * min(cell_w, cell_h)
            shape, colour = SHAPES[class_index % 5], COLOURS[class_index % 8]
            _draw_shape(draw, shape, centre, radius, rng.uniform(0, 360), colour)
        fname = f"{2 * i + 5:06d}.jpg"  # VOC 2007 ids are six digits with gaps
        image.save(folder / fname, quality=JPEG_QUALITY)
        labels = " ".join(sorted(VOC_CLASSES[c] for c in classes))
        rows.append(f"{fname},{labels},{i in valid_ids}")
    (Path(root) / "train.csv").write_text("\n".join(rows) + "\n")
    return Path(root)


def make_biwi(root: Path, *, people: int = 4, frames_per_person: int = 30, seed: int = 0) -> Path:
    """Write ``root/NN/{rgb.cal, frame_NNNNN_rgb.jpg, frame_NNNNN_pose.txt}``.

    Folder names are those of the real dataset (01 .. 24), spread out and always
    including 13, the default validation person.
    """
    if not 1 <= people <= BIWI_PEOPLE:
        raise ValueError(f"people must be in 1..{BIWI_PEOPLE}, not {people}")
    if frames_per_person < 1:
        raise ValueError(f"frames_per_person must be positive, not {frames_per_person}")
    rng = random.Random(seed)
    for person in biwi_person_names(people):
        folder = Path(root) / person
        folder.mkdir(parents=True, exist_ok=True)
        fx, cx, cy = rng.uniform(505, 530), rng.uniform(312, 328), rng.uniform(232, 248)
        intrinsics = ((fx, 0.0, cx), (0.0, fx, cy), (0.0, 0.0, 1.0))
        (folder / "rgb.cal").write_text(_calibration_text(rng, intrinsics))
        fx, cx, cy = (float(_number(v)) for v in (fx, cx, cy))  # what the reader will parse
        skin = rng.choice(((224, 172, 140), (198, 134, 96), (160, 100, 70), (240, 196, 166)))
        hair = rng.choice(((80, 45, 20), (120, 70, 30), (55, 30, 15), (150, 100, 50)))
        frame = rng.randint(3, 9)
        for _ in range(frames_per_person):
            yaw, pitch, roll = rng.uniform(-40, 40), rng.uniform(-20, 20), rng.uniform(-10, 10)
            z = rng.uniform(750, 1100)
            # Keep the whole head in the frame: its half-height is about 100 mm.
            margin = 110 * fx / z
            x_px = rng.uniform(margin, BIWI_SIZE[0] - margin)
            y_px = rng.uniform(margin, BIWI_SIZE[1] - margin)
            centre = tuple(
                float(_number(v)) for v in ((x_px - cx) * z / fx, (y_px - cy) * z / fx, z)
            )
            stem = folder / f"frame_{frame:05d}"
            (stem.parent / f"{stem.name}_pose.txt").write_text(
                _pose_text(_rotation(yaw, pitch, roll), centre)
            )
            head = (centre[0] * fx / centre[2] + cx, centre[1] * fx / centre[2] + cy)
            image = _biwi_frame(rng, head, fx / centre[2], yaw, pitch, skin, hair)
            image.save(stem.parent / f"{stem.name}_rgb.jpg", quality=JPEG_QUALITY)
            frame += rng.randint(1, 3)
    return Path(root)


def make_dataset(kind: str, root: Path, **options: int) -> Path:
    """Generate a dataset by kind (``pets``, ``voc``, ``biwi``); options go to its maker."""
    makers: dict[str, Callable[..., Path]] = {
        "pets": make_pets,
        "voc": make_voc,
        "biwi": make_biwi,
    }
    if kind not in makers:
        raise ValueError(f"unknown dataset kind {kind!r}: use one of {', '.join(makers)}")
    return makers[kind](Path(root), **options)


def biwi_person_names(people: int) -> list[str]:
    """``people`` real BIWI folder names spread over 01..24, always including 13."""
    spread = {round(1 + i * (BIWI_PEOPLE - 1) / max(1, people - 1)) for i in range(people)}
    if 13 not in spread:
        spread.remove(min(spread, key=lambda n: (abs(n - 13), n)))
        spread.add(13)
    return [f"{n:02d}" for n in sorted(spread)]


def _muted_colour(rng: random.Random) -> Rgb:
    grey = rng.randint(70, 190)
    return (
        grey + rng.randint(-20, 20),
        grey + rng.randint(-20, 20),
        grey + rng.randint(-20, 20),
    )


def _noisy_background(
    rng: random.Random, size: tuple[int, int], colour: Rgb, noise: int = 20
) -> Image.Image:
    """A flat colour with uniform per-pixel noise in [-noise, noise]."""
    generator = np.random.default_rng(rng.getrandbits(32))
    jitter = generator.integers(-noise, noise + 1, (size[1], size[0], 3), dtype=np.int16)
    pixels = np.clip(jitter + np.asarray(colour, dtype=np.int16), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    angle_deg: float,
    colour: Rgb,
) -> None:
    cx, cy = centre
    if shape == "disc":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        # A dark core makes a ring: a texture as well as a colour.
        core = radius * 0.4
        draw.ellipse((cx - core, cy - core, cx + core, cy + core), fill=(20, 20, 20))
        return
    outline: Sequence[tuple[float, float]]
    if shape == "square":
        outline = _polygon(4, radius, 45)
    elif shape == "triangle":
        outline = _polygon(3, radius, 90)
    elif shape == "star":
        outline = [_polar(radius if k % 2 == 0 else radius * 0.45, 90 + 36 * k) for k in range(10)]
    else:  # cross: a plus sign made of twelve corners
        a, b = radius, radius * 0.35
        outline = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        outline += [(-x, -y) for x, y in outline]
    turn = math.radians(angle_deg)
    cos, sin = math.cos(turn), math.sin(turn)
    draw.polygon([(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in outline], colour)


def _polygon(corners: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [_polar(radius, start_deg + 360 * k / corners) for k in range(corners)]


def _polar(radius: float, angle_deg: float) -> tuple[float, float]:
    turn = math.radians(angle_deg)
    return radius * math.cos(turn), -radius * math.sin(turn)


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _matrix_rows(rows: Sequence[Sequence[float]]) -> str:
    return "".join(" ".join(_number(v) for v in row) + " \n" for row in rows)


def _calibration_text(rng: random.Random, intrinsics: Sequence[Sequence[float]]) -> str:
    # As BIWI's rgb.cal: intrinsics, distortion, then the RGB camera's extrinsics
    # relative to the depth camera (a small rotation and a few centimetres).
    rotation = _rotation(rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-1, 1))
    translation = [rng.uniform(-30, 30), rng.uniform(-10, 10), rng.uniform(-15, 15)]
    return (
        _matrix_rows(intrinsics)
        + "\n0 0 0 0 \n\n"
        + _matrix_rows(rotation)
        + "\n"
        + _matrix_rows([translation])
    )


def _pose_text(rotation: Sequence[Sequence[float]], centre: Sequence[float]) -> str:
    return _matrix_rows(rotation) + "\n" + _matrix_rows([centre])


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> list[list[float]]:
    y, p, r = (math.radians(a) for a in (yaw_deg, pitch_deg, roll_deg))
    about_y = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    about_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    about_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    rows: list[list[float]] = (about_z @ about_y @ about_x).tolist()
    return rows


def _biwi_frame(
    rng: random.Random,
    head: tuple[float, float],
    pixels_per_mm: float,
    yaw_deg: float,
    pitch_deg: float,
    skin: Rgb,
    hair: Rgb,
) -> Image.Image:
    # Drawn at twice the size and box-reduced: anti-aliased edges and a sub-pixel exact centre.
    up = 2
    width, height = BIWI_SIZE
    wall = (rng.randint(70, 120), rng.randint(110, 160), rng.randint(150, 200))
    # Noise at the final resolution, then blown up: reduce() gives the same pixels back.
    background = _noisy_background(rng, (width, height), wall, noise=10)
    image = background.resize((width * up, height * up), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    # Cool-toned walls and furniture, warm-toned head: blue exceeds red only off the head.
    for _ in range(rng.randint(2, 5)):
        left, top = rng.uniform(0, width * up), rng.uniform(0, height * up)
        grey = rng.randint(40, 150)
        box = (left, top, left + rng.uniform(60, 400), top + rng.uniform(60, 400))
        draw.rectangle(box, fill=(grey, grey + rng.randint(0, 20), grey + rng.randint(25, 50)))
    cx, cy = head[0] * up, head[1] * up
    rx, ry = 80 * pixels_per_mm * up, 100 * pixels_per_mm * up
    draw.ellipse(_ellipse_box(cx, cy, rx, ry), fill=hair)
    # The face: an inner ellipse just above the head's bottom, leaving hair above and beside.
    face_cy = cy + 0.15 * ry
    draw.ellipse(_ellipse_box(cx, face_cy, 0.9 * rx, 0.83 * ry), fill=skin)
    turn_x = 0.27 * rx * math.sin(math.radians(yaw_deg))
    turn_y = 0.17 * ry * math.sin(math.radians(pitch_deg))
    for side in (-1, 1):
        eye = (cx + side * 0.35 * rx + turn_x, face_cy - 0.1 * ry + turn_y)
        draw.ellipse(_ellipse_box(*eye, 0.13 * rx, 0.08 * ry), fill=(70, 40, 30))
    mouth = (cx + turn_x, face_cy + 0.4 * ry + turn_y)
    draw.ellipse(_ellipse_box(*mouth, 0.3 * rx, 0.06 * ry), fill=(170, 50, 50))
    return image.reduce(up)


def _ellipse_box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    """Integer corners for ImageDraw.ellipse whose pixels centre on (cx, cy) within half a pixel.

    PIL floors float corners and fills x0 .. x1 inclusive, that is the continuous span
    [x0, x1 + 1) with pixel i covering [i, i + 1); so round here, knowingly.
    """
    width, height = max(1, round(2 * rx)), max(1, round(2 * ry))
    left, top = round(cx - width / 2), round(cy - height / 2)
    return left, top, left + width - 1, top + height - 1
