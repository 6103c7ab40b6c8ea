"""Classify pet photos by breed with the ``pets`` model of a running visionrpc server.

    visionrpc serve --repository demo-models &          # or: make serve
    python examples/classify_pets.py photos/ cat.jpg --top-k 3 --min-confidence 0.5

Folders are searched recursively for the formats the server accepts (``model_info``
lists them); many images go through ``predict_many`` (a bidirectional stream, a few
batches in flight). A photo whose best breed scores under ``--min-confidence`` is
reported as "not a known breed". A photo that cannot be classified is reported on
stderr and the script exits 1; a failed call (server down, unknown model) prints one
line and exits 2 for a mistake in the arguments, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visionrpc.client import Classification, Client, ImageError, InvalidInputError, VisionRPCError


def image_paths(names: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    paths: list[Path] = []
    for name in map(Path, names):
        if name.is_dir():
            paths += sorted(p for p in name.rglob("*") if p.suffix.lower() in suffixes)
        else:
            paths.append(name)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--server", help="host:port (default: $VISIONRPC_SERVER or 127.0.0.1:8001)")
    parser.add_argument("--model", default="pets")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--min-confidence", type=float, help="default: the model's own")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation")
    args = parser.parse_args()

    try:
        with Client(args.server) as client:
            info = client.model_info(args.model)
            print(f"{info.name} v{info.version}: {len(info.labels)} breeds, {info.provider}")
            paths = image_paths(args.images, info.accepted_extensions)
            results = client.predict_many(
                args.model,
                paths,
                top_k=args.top_k,
                min_confidence=args.min_confidence,
                tta=args.tta,
            )
    except VisionRPCError as error:
        print(f"classify_pets: {error}", file=sys.stderr)
        return 2 if isinstance(error, InvalidInputError) else 1
    failed = 0
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, ImageError):
            failed += 1
            print(f"{path}: could not be classified: {result.message}", file=sys.stderr)
        elif isinstance(result, Classification):
            guesses = ", ".join(f"{entry.label} {entry.score:.1%}" for entry in result.top)
            verdict = result.label or "not a known breed"
            print(f"{path}: {verdict}  [{guesses}]")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
