"""Find every PASCAL VOC object class in photos with the ``voc`` model of a running server.

    python examples/multilabel_voc.py street.jpg --threshold 0.4 --class-threshold person=0.6

Each label has a threshold chosen on the validation set (``model_info`` shows them);
``--threshold`` replaces them all and ``--class-threshold`` one label's. With
``--all-scores`` every class's score is printed, not only those above threshold.
A photo that cannot be used is reported on stderr and the script exits 1; a failed
call prints one line and exits 2 for a mistake in the arguments, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from visionrpc.client import Client, ImageError, InvalidInputError, MultiLabel, VisionRPCError


def label_threshold(text: str) -> tuple[str, float]:
    label, _, value = text.rpartition("=")
    return label, float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--server", help="host:port (default: $VISIONRPC_SERVER or 127.0.0.1:8001)")
    parser.add_argument("--model", default="voc")
    parser.add_argument("--threshold", type=float, help="one threshold for every class")
    parser.add_argument(
        "--class-threshold", type=label_threshold, action="append", default=[], metavar="LABEL=T"
    )
    parser.add_argument("--all-scores", action="store_true")
    args = parser.parse_args()

    try:
        with Client(args.server) as client:
            info = client.model_info(args.model)
            tuned = ", ".join(f"{k} {v:.2f}" for k, v in sorted(info.class_thresholds.items()))
            print(f"{info.name} v{info.version}: default threshold {info.threshold:.2f}; {tuned}")
            results = client.predict(
                args.model,
                list(args.images),
                threshold=args.threshold,
                thresholds=dict(args.class_threshold),
                all_scores=args.all_scores,
            )
    except VisionRPCError as error:
        print(f"multilabel_voc: {error}", file=sys.stderr)
        return 2 if isinstance(error, InvalidInputError) else 1
    failed = 0
    for path, result in zip(args.images, results, strict=True):
        if isinstance(result, ImageError):
            failed += 1
            print(f"{path}: {result.code}: {result.message}", file=sys.stderr)
            continue
        assert isinstance(result, MultiLabel)
        found = ", ".join(f"{e.label} {e.score:.2f} (>= {e.threshold:.2f})" for e in result.labels)
        print(f"{path}: {found or 'nothing above threshold'}")
        for entry in result.all_scores:
            print(f"    {entry.label:12s} {entry.score:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
