"""``visionrpc evaluate``: a dataset's validation split through a running server.

    visionrpc evaluate --server 127.0.0.1:8001 --model pets --data ~/data/oxford-iiit-pet

Sends every validation image as its encoded file through ``visionrpc.client.Client``
(TLS, token and retries as for every other command) and scores the server's answers
with the metrics training printed offline, with and without test-time augmentation
(``--tta`` or ``--no-tta`` runs one of them):

* classification: ``error_rate``, the share of images whose top-1 label is wrong;
* multilabel: ``accuracy_multi``, the share of (image, label) decisions that the served
  thresholds get right (the thresholds training chose, unless the request overrides);
* points: ``point_error_px``, the mean distance to the true point in original pixels.

The dataset's kind and split come from the model's training summary (``--dataset``,
``--valid-pct``, ``--seed`` and ``--valid-person`` override them); only the validation
split has to be there. Each printed number says which split it comes from: training's
own figure is shown beside the served ones, marked when its split is not this one.
Server and training decode and resize through the same ``visionrpc.server.preprocess``,
so on the same split and without TTA the numbers match.
Registration imports argparse only; the handler imports the client and the readers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .kinds import KINDS, kind_of_task

if TYPE_CHECKING:
    from visionrpc.client import Client, ModelInfo

    from .datasets import Dataset, Item

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
    from visionrpc.client.cli import _connection_flags

    parser = subcommands.add_parser(
        "evaluate",
        parents=[_connection_flags()],
        help="score a dataset's validation split through a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="the served model's name")
    parser.add_argument("--version", default="", help="model version (default: newest)")
    parser.add_argument("--data", type=Path, required=True, help="the dataset's root folder")
    parser.add_argument(
        "--dataset", choices=tuple(KINDS), help="layout of --data (default: training's)"
    )
    parser.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=None,
        help="only with (--tta) or only without (--no-tta) test-time augmentation; default both",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="the random split's seed (default: training's)")
    parser.add_argument("--valid-pct", type=float, help="random split share (default: training's)")
    parser.add_argument("--valid-person", help="biwi: the person held out (default: training's)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per Predict call")
    parser.add_argument("--in-flight", type=int, default=4, help="Predict calls at once")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    parser.set_defaults(handler=_evaluate_command)


def _evaluate_command(args: argparse.Namespace) -> int:
    from visionrpc.client import VisionRPCError
    from visionrpc.client.commands import UsageError, connect

    from .datasets import DatasetError, read_dataset

    if args.batch_size < 1 or args.in_flight < 1:
        print("visionrpc evaluate: --batch-size and --in-flight must be >= 1", file=sys.stderr)
        return 2
    try:
        with connect(args) as client:
            info = client.model_info(args.model, version=args.version or None)
            kind, options = dataset_choice(info, args)
            dataset = read_dataset(kind, args.data, need_train=False, **options)
            runs = [
                evaluate_served(
                    client,
                    info,
                    dataset,
                    tta=tta,
                    batch_size=args.batch_size,
                    in_flight=args.in_flight,
                )
                for tta in _tta_modes(info, args.tta)
            ]
    except (VisionRPCError, DatasetError, EvaluationError, UsageError) as exc:
        print(f"visionrpc evaluate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([asdict(run) for run in runs], indent=2))
    else:
        print(report(info, dataset, runs, same_split=_same_split(info, dataset, kind, options)))
    return 0 if all(run.images > len(run.failed) for run in runs) else 1


def dataset_choice(info: ModelInfo, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The dataset kind and split options: training's, with the flags given on top."""
    training = _training_summary(info)
    kind = args.dataset or training.get("dataset_kind") or kind_of_task(info.task)
    recorded = training.get("dataset_options", {}) if kind == training.get("dataset_kind") else {}
    accepted = KINDS[kind].options
    options = {k: v for k, v in recorded.items() if k in accepted}
    for name in ("seed", "valid_pct", "valid_person"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in accepted:
            raise EvaluationError(f"--{name.replace('_', '-')} does not apply to {kind}")
        options[name] = value
    return kind, options


def evaluate_served(
    client: Client,
    info: ModelInfo,
    dataset: Dataset,
    *,
    tta: bool,
    batch_size: int = 16,
    in_flight: int = 4,
) -> EvaluationRun:
    """Send the validation split through ``client`` and score the answers."""
    from visionrpc.client import Classification, ImageError, MultiLabel

    _check_fit(info, dataset)
    results = client.predict_many(
        info.name,
        [item.path for item in dataset.valid],
        version=info.version,
        # Multilabel asks for nothing extra: the served labels already carry the served
        # thresholds' decisions, which is what accuracy_multi scores.
        top_k=1 if info.task == "classification" else None,
        tta=tta,
        batch_size=batch_size,
        max_in_flight=in_flight,
    )
    answers: dict[int, ServedAnswer] = {}
    failed: list[tuple[str, str]] = []
    views = 1
    for index, result in enumerate(results):
        if isinstance(result, ImageError):
            failed.append((str(dataset.valid[index].path), result.message))
            continue
        views = max(views, result.tta_views)
        if isinstance(result, Classification):
            answers[index] = ServedAnswer(labels=tuple(s.label for s in result.top[:1]))
        elif isinstance(result, MultiLabel):
            answers[index] = ServedAnswer(labels=tuple(s.label for s in result.labels))
        else:
            answers[index] = ServedAnswer(points=tuple((p.x, p.y) for p in result.points))
    scored = sorted(answers)
    metrics = score(
        info.task,
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


def report(
    info: ModelInfo, dataset: Dataset, runs: Sequence[EvaluationRun], *, same_split: bool
) -> str:
    """One row per run, then training's own figure, each naming the split it measures."""
    metric = METRIC_OF_TASK[info.task]
    here = f"{dataset.split or 'validation'} of {dataset.root}"
    lines = [
        f"model {info.name} version {info.version} ({info.task}) on the {dataset.kind} "
        f"validation split ({here}): {len(dataset.valid)} images",
    ]
    if info.task == "multilabel":
        per_class = ", ".join(f"{k}={v:.3g}" for k, v in sorted(info.class_thresholds.items()))
        lines.append(
            f"served thresholds: {info.threshold:.3g}" + (f" ({per_class})" if per_class else "")
        )
    lines.append(f"{'':<26}{metric:>16}   split")
    for run in runs:
        name = f"served, TTA ({run.views} views)" if run.tta else "served, no TTA"
        failed = f"   {len(run.failed)} image(s) failed" if run.failed else ""
        lines.append(f"{name:<26}{run.metrics[metric]:>16.4f}   this one{failed}")
    if metric in info.metrics:
        training = _training_summary(info)
        where = "the same" if same_split else _recorded_split(training) + ": a different one"
        lines.append(f"{'training (offline)':<26}{info.metrics[metric]:>16.4f}   {where}")
    for run in runs:
        lines.extend(f"  failed: {path}: {message}" for path, message in run.failed)
    return "\n".join(lines)


def _training_summary(info: ModelInfo) -> Mapping[str, Any]:
    training = info.config.get("training", {})
    return training if isinstance(training, Mapping) else {}


def _same_split(info: ModelInfo, dataset: Dataset, kind: str, options: Mapping[str, Any]) -> bool:
    training = _training_summary(info)
    if training.get("dataset_kind") != kind or not training.get("dataset"):
        return False
    same_root = Path(training["dataset"]).resolve() == Path(dataset.root).resolve()
    return same_root and dict(training.get("dataset_options", {})) == dict(options)


def _recorded_split(training: Mapping[str, Any]) -> str:
    options = ", ".join(f"{k}={v}" for k, v in sorted(training.get("dataset_options", {}).items()))
    kind = training.get("dataset_kind") or "unrecorded kind"
    return f"{kind} {training.get('dataset') or '(unrecorded folder)'} {options}".rstrip()


def _check_fit(info: ModelInfo, dataset: Dataset) -> None:
    if info.task != dataset.task:
        raise EvaluationError(
            f"model {info.name} is a {info.task} model; "
            f"the {dataset.kind} dataset is {dataset.task}"
        )
    if info.task != "points" and set(info.labels) != set(dataset.vocab):
        missing = sorted(set(dataset.vocab) - set(info.labels))
        extra = sorted(set(info.labels) - set(dataset.vocab))
        raise EvaluationError(
            f"model {info.name}'s labels differ from the dataset's: "
            f"missing {missing or 'none'}, not in the dataset {extra or 'none'}"
        )
    if info.task == "points" and len(info.labels) != len(_pairs(dataset.valid[0])):
        raise EvaluationError(
            f"model {info.name} predicts {len(info.labels)} point(s); "
            f"the dataset has {len(_pairs(dataset.valid[0]))}"
        )


def _tta_modes(info: ModelInfo, asked: bool | None) -> list[bool]:
    if asked is not None:
        if asked and not info.tta_views:
            raise EvaluationError(f"model {info.name} declares no TTA views")
        return [asked]
    return [False, True] if info.tta_views else [False]


def _index(item: Item) -> int:
    if not isinstance(item.target, int):
        raise EvaluationError(f"{item.path}: expected a class index, not {item.target!r}")
    return item.target


def _indices(item: Item) -> set[int]:
    return {int(i) for i in item.target} if isinstance(item.target, tuple) else {item.target}


def _pairs(item: Item) -> list[tuple[float, float]]:
    values = item.target if isinstance(item.target, tuple) else (item.target,)
    return [(float(values[i]), float(values[i + 1])) for i in range(0, len(values), 2)]
