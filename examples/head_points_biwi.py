"""Locate the head centre in photos with the ``biwi`` model of a running server.

    python examples/head_points_biwi.py frame_00003_rgb.jpg --draw marked/

Points come back in pixels of the original image (after EXIF orientation), whatever
resizing the model needed, so they can be drawn straight onto the photo. ``--draw``
writes a copy of each photo with a cross on each point (needs Pillow). Sizes print
as height x width. A photo that cannot be used is reported on stderr and the script
exits 1; a failed call (server down) prints one line and exits 2 for a mistake in the
arguments, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionrpc.client import Client, ImageError, InvalidInputError, Points, VisionRPCError


def draw_points(source: Path, result: Points, folder: Path) -> Path:
    from PIL import Image, ImageDraw, ImageOps

    with Image.open(source) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    pen = ImageDraw.Draw(image)
    arm = max(4, min(image.size) // 40)
    for point in result.points:
        pen.line([(point.x - arm, point.y), (point.x + arm, point.y)], fill="red", width=2)
        pen.line([(point.x, point.y - arm), (point.x, point.y + arm)], fill="red", width=2)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem}_points.png"
    image.save(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--server", help="host:port (default: $VISIONRPC_SERVER or 127.0.0.1:8001)")
    parser.add_argument("--model", default="biwi")
    parser.add_argument("--tta", action="store_true", help="blend flipped views too")
    parser.add_argument("--draw", type=Path, metavar="FOLDER", help="save marked copies here")
    args = parser.parse_args()

    try:
        with Client(args.server) as client:
            results = client.predict(args.model, list(args.images), tta=args.tta)
    except VisionRPCError as error:
        print(f"head_points_biwi: {error}", file=sys.stderr)
        return 2 if isinstance(error, InvalidInputError) else 1
    failed = 0
    for path, result in zip(args.images, results, strict=True):
        if isinstance(result, ImageError):
            failed += 1
            print(f"{path}: {result.code}: {result.message}", file=sys.stderr)
            continue
        assert isinstance(result, Points)
        where = ", ".join(f"{p.name} at ({p.x:.1f}, {p.y:.1f})" for p in result.points)
        size = f"{result.original_height}x{result.original_width}"
        print(f"{path} ({size}): {where}")
        if args.draw is not None:
            print(f"    drawn: {draw_points(path, result, args.draw)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
