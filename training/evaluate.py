"""``visionrpc evaluate``: a dataset's validation split through a running server.

    visionrpc evaluate --server 127.0.0.1:8001 --model pets --data ~/data/oxford-iiit-pet

Sends every validation image as its encoded file and scores the server's answers with
the metrics training printed offline, with and without test-time augmentation (``--tta``
or ``--no-tta`` runs one of them):

* classification: ``error_rate``, the share of images whose top-1 label is wrong;
* multilabel: ``accuracy_multi``, the share of (image, label) decisions that the served
  thresholds get right (the thresholds training chose, unless the request overrides);
* points: ``point_error_px``, the mean distance to the true point in original pixels.

Server and training decode and resize through the same ``visionrpc.server.preprocess``,
so without TTA these numbers match training's own (its summary is printed alongside).
Registration imports argparse only; the handler imports grpc and the dataset readers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionrpc.protos import task_from_proto

if TYPE_CHECKING:
    import grpc

    from visionrpc.protos import inference_pb2 as pb
    from visionrpc.protos import inference_pb2_grpc as pb_grpc

    from .datasets import Dataset, Item

KINDS = ("pets", "voc", "biwi")
# The dataset a task was trained on when neither --dataset nor the model's summary says.
KIND_OF_TASK = {"classification": "pets", "multilabel": "voc", "points": "biwi"}
METRIC_OF_TASK = {
    "classification": "error_rate",
    "multilabel": "accuracy_multi",
    "points": "point_error_px",
}


class EvaluationError(Exception):
    """A run that cannot be scored (a model and dataset that do not fit); says why."""


@dataclass(frozen=True)
class ServedAnswer:
    """One image's answer, reduced to what the metrics read."""

    # classification: the top-1 label; multilabel: the labels at or above threshold.
    labels: tuple[str, ...] = ()
    # points: (x, y) in original pixels, in the model's label order.
    points: tuple[tuple[float, float], ...] = ()


@dataclass
class EvaluationRun:
    tta: bool
    # Views blended per image, identity included.
    views: int
    images: int
    metrics: dict[str, float]
    failed: list[tuple[str, str]] = field(default_factory=list)


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``evaluate`` to the ``visionrpc`` parser."""
    parser = subcommands.add_parser(
        "evaluate",
        help="score a dataset's validation split through a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", default="127.0.0.1:8001", help="host:port of the server")
    parser.add_argument("--model", required=True, help="the served model's name")
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument("--data", type=Path, required=True, help="the dataset's root folder")
    parser.add_argument(
        "--dataset", choices=KINDS, help="layout of --data (default: the model's training dataset)"
    )
    parser.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=None,
        help="only with (--tta) or only without (--no-tta) test-time augmentation; default both",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="pets: the split's seed, as trained")
    parser.add_argument("--valid-pct", type=float, default=0.2, help="pets: the share held out")
    parser.add_argument("--valid-person", default="13", help="biwi: the person held out")
    parser.add_argument("--batch-size", type=int, default=16, help="images per Predict call")
    parser.add_argument("--in-flight", type=int, default=4, help="Predict calls at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    parser.set_defaults(handler=_evaluate_command)


def _evaluate_command(args: argparse.Namespace) -> int:
    import grpc

    from visionrpc.protos import inference_pb2 as pb
    from visionrpc.protos import inference_pb2_grpc as pb_grpc

    from .datasets import DatasetError, read_dataset

    if args.batch_size < 1 or args.in_flight < 1:
        print("visionrpc evaluate: --batch-size and --in-flight must be >= 1", file=sys.stderr)
        return 2
    with grpc.insecure_channel(args.server) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        try:
            info = stub.GetModelInfo(
                pb.GetModelInfoRequest(model=args.model, version=args.version),
                timeout=args.timeout,
            )
            kind = args.dataset or _dataset_kind(info)
            dataset = read_dataset(kind, args.data, **_reader_options(kind, args))
            runs = [
                evaluate_served(
                    stub,
                    info,
                    dataset,
                    tta=tta,
                    batch_size=args.batch_size,
                    in_flight=args.in_flight,
                    timeout=args.timeout,
                )
                for tta in _tta_modes(info, args.tta)
            ]
        except grpc.RpcError as exc:
            print(f"visionrpc evaluate: {_rpc_message(exc)}", file=sys.stderr)
            return 1
        except (DatasetError, EvaluationError) as exc:
            print(f"visionrpc evaluate: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([asdict(run) for run in runs], indent=2))
    else:
        print(report(info, dataset, runs))
    return 0 if all(run.images > len(run.failed) for run in runs) else 1


def evaluate_served(
    stub: pb_grpc.InferenceServiceStub,
    info: pb.ModelInfo,
    dataset: Dataset,
    *,
    tta: bool,
    batch_size: int = 16,
    in_flight: int = 4,
    timeout: float = 60.0,
) -> EvaluationRun:
    """Send the validation split through ``stub`` and score the answers."""
    _check_fit(info, dataset)
    answers: dict[int, ServedAnswer] = {}
    failed: list[tuple[str, str]] = []
    views = 1
    for first, response in _predict_all(
        stub, info, dataset.valid, tta, batch_size, in_flight, timeout
    ):
        for offset, result in enumerate(response.results):
            index = first + offset
            if result.WhichOneof("result") == "error":
                failed.append((str(dataset.valid[index].path), result.error.message))
                continue
            views = max(views, result.tta_views)
            answers[index] = _answer(result)
    scored = sorted(answers)
    metrics = score(
        task_from_proto(info.task),
        dataset,
        [dataset.valid[i] for i in scored],
        [answers[i] for i in scored],
    )
    return EvaluationRun(
        tta=tta, views=views, images=len(dataset.valid), metrics=metrics, failed=failed
    )


def score(
    task: str, dataset: Dataset, items: Sequence[Item], answers: Sequence[ServedAnswer]
) -> dict[str, float]:
    """The task's metric over the answered items (NaN when none was answered)."""
    if not items:
        return {METRIC_OF_TASK[task]: math.nan}
    if task == "classification":
        wrong = sum(
            answer.labels != (dataset.vocab[_index(item)],)
            for item, answer in zip(items, answers, strict=True)
        )
        return {"error_rate": wrong / len(items)}
    if task == "multilabel":
        right = sum(
            (label in answer.labels) == (index in _indices(item))
            for item, answer in zip(items, answers, strict=True)
            for index, label in enumerate(dataset.vocab)
        )
        return {"accuracy_multi": right / (len(items) * len(dataset.vocab))}
    distances = [
        math.dist(predicted, actual)
        for item, answer in zip(items, answers, strict=True)
        for predicted, actual in zip(answer.points, _pairs(item), strict=True)
    ]
    return {"point_error_px": sum(distances) / len(distances)}


def report(info: pb.ModelInfo, dataset: Dataset, runs: Sequence[EvaluationRun]) -> str:
    """A small table: one row per run, then training's own figure when it recorded one."""
    task = task_from_proto(info.task)
    metric = METRIC_OF_TASK[task]
    lines = [
        f"model {info.name} version {info.version} ({task}) on the {dataset.kind} "
        f"validation split of {dataset.root}: {len(dataset.valid)} images",
    ]
    if task_from_proto(info.task) == "multilabel":
        per_class = ", ".join(f"{k}={v:.3g}" for k, v in sorted(info.class_thresholds.items()))
        lines.append(
            f"served thresholds: {info.threshold:.3g}" + (f" ({per_class})" if per_class else "")
        )
    lines.append(f"{'':<26}{metric:>16}")
    for run in runs:
        name = f"served, TTA ({run.views} views)" if run.tta else "served, no TTA"
        failed = f"   {len(run.failed)} image(s) failed" if run.failed else ""
        lines.append(f"{name:<26}{run.metrics[metric]:>16.4f}{failed}")
    if metric in info.metrics:
        lines.append(f"{'training (offline)':<26}{info.metrics[metric]:>16.4f}")
    for run in runs:
        lines.extend(f"  failed: {path}: {message}" for path, message in run.failed)
    return "\n".join(lines)


def _predict_all(
    stub: pb_grpc.InferenceServiceStub,
    info: pb.ModelInfo,
    items: Sequence[Item],
    tta: bool,
    batch_size: int,
    in_flight: int,
    timeout: float,
) -> Iterable[tuple[int, pb.PredictResponse]]:
    """Responses with the index of their first item, keeping ``in_flight`` calls busy."""
    from visionrpc.protos import inference_pb2 as pb

    # Multilabel asks for nothing extra: the served labels already carry the served
    # thresholds' decisions, which is what accuracy_multi scores.
    options = pb.PredictionOptions(tta=tta)
    if task_from_proto(info.task) == "classification":
        options.top_k = 1
    pending: deque[tuple[int, grpc.Future[pb.PredictResponse]]] = deque()
    for first in range(0, len(items), batch_size):
        request = pb.PredictRequest(
            model=info.name,
            version=info.version,
            images=[
                pb.Image(encoded=item.path.read_bytes())
                for item in items[first : first + batch_size]
            ],
            options=options,
        )
        pending.append((first, stub.Predict.future(request, timeout=timeout)))
        if len(pending) >= in_flight:
            done_first, future = pending.popleft()
            yield done_first, future.result()
    while pending:
        done_first, future = pending.popleft()
        yield done_first, future.result()


def _answer(result: pb.ImageResult) -> ServedAnswer:
    kind = result.WhichOneof("result")
    if kind == "classification":
        return ServedAnswer(labels=tuple(s.label for s in result.classification.top[:1]))
    if kind == "multilabel":
        return ServedAnswer(labels=tuple(s.label for s in result.multilabel.labels))
    return ServedAnswer(points=tuple((p.x, p.y) for p in result.points.points))


def _check_fit(info: pb.ModelInfo, dataset: Dataset) -> None:
    task = task_from_proto(info.task)
    if task != dataset.task:
        raise EvaluationError(
            f"model {info.name} is a {task} model; the {dataset.kind} dataset is {dataset.task}"
        )
    if task != "points" and set(info.labels) != set(dataset.vocab):
        missing = sorted(set(dataset.vocab) - set(info.labels))
        extra = sorted(set(info.labels) - set(dataset.vocab))
        raise EvaluationError(
            f"model {info.name}'s labels differ from the dataset's: "
            f"missing {missing or 'none'}, not in the dataset {extra or 'none'}"
        )
    if task == "points" and len(info.labels) != len(_pairs(dataset.valid[0])):
        raise EvaluationError(
            f"model {info.name} predicts {len(info.labels)} point(s); "
            f"the dataset has {len(_pairs(dataset.valid[0]))}"
        )


def _dataset_kind(info: pb.ModelInfo) -> str:
    # Training records the dataset as "<kind>:<folder>".
    kind = info.dataset.split(":", 1)[0]
    return kind if kind in KINDS else KIND_OF_TASK[task_from_proto(info.task)]


def _reader_options(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "pets":
        return {"seed": args.seed, "valid_pct": args.valid_pct}
    if kind == "biwi":
        return {"valid_person": args.valid_person}
    return {}


def _tta_modes(info: pb.ModelInfo, asked: bool | None) -> list[bool]:
    if asked is not None:
        if asked and not info.tta.views:
            raise EvaluationError(f"model {info.name} declares no TTA views")
        return [asked]
    return [False, True] if info.tta.views else [False]


def _index(item: Item) -> int:
    if not isinstance(item.target, int):
        raise EvaluationError(f"{item.path}: expected a class index, not {item.target!r}")
    return item.target


def _indices(item: Item) -> set[int]:
    return {int(i) for i in item.target} if isinstance(item.target, tuple) else {item.target}


def _pairs(item: Item) -> list[tuple[float, float]]:
    values = item.target if isinstance(item.target, tuple) else (item.target,)
    return [(float(values[i]), float(values[i + 1])) for i in range(0, len(values), 2)]


def _rpc_message(error: grpc.RpcError) -> str:
    code = getattr(error, "code", lambda: None)()
    details = getattr(error, "details", lambda: str(error))()
    return f"{code.name if code is not None else 'error'}: {details}"
