"""The three demo models (pets, voc, biwi) through tritonclient equal visionrpc.v1's answers.

The demo's own recipe at test size trains real models; one real server serves them, and
every model is asked the same images through both protocols, with and without TTA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

from tests.helpers.demo import QUICK_RUNS
from tests.helpers.server import RunningServer, server_in_thread
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.training.datasets import read_dataset
from visionrpc.training.demo import build_demo


@dataclass(frozen=True)
class Demo:
    server: RunningServer
    # Three validation images of each model, as encoded files.
    images: dict[str, list[bytes]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    root = tmp_path_factory.mktemp("demo")
    repository = root / "demo-models"
    build_demo(repository, cache=root / "data", quiet=True, runs=QUICK_RUNS)
    samples = {
        kind: [
            Path(item.path).read_bytes()
            for item in read_dataset(kind, root / "data" / kind).valid[:3]
        ]
        for kind in QUICK_RUNS
    }
    with server_in_thread(repository) as server:
        yield Demo(server, samples)


def top_k(model: str) -> dict[str, int]:
    # Only the classifier takes top_k: the other tasks refuse it.
    return {"top_k": 3} if model == "pets" else {}


def v1_options(model: str, tta: bool) -> pb.PredictionOptions:
    options = pb.PredictionOptions(tta=tta)
    if model == "pets":
        options.top_k = top_k(model)["top_k"]
    return options


def v1_predict(demo: Demo, model: str, tta: bool) -> pb.PredictResponse:
    with grpc.insecure_channel(demo.server.address) as channel:
        return pb_grpc.InferenceServiceStub(channel).Predict(
            pb.PredictRequest(
                model=model,
                images=[pb.Image(encoded=data) for data in demo.images[model]],
                options=v1_options(model, tta),
            )
        )


def v2_infer(demo: Demo, model: str, tta: bool) -> triton.InferResult:
    tensor = triton.InferInput("images", [len(demo.images[model])], "BYTES")
    tensor.set_data_from_numpy(np.array(demo.images[model], dtype=np.object_))
    with triton.InferenceServerClient(url=demo.server.address) as client:
        assert client.is_model_ready(model)
        return client.infer(model, [tensor], parameters={"tta": tta, **top_k(model)})


@pytest.mark.parametrize("tta", [False, True])
def test_pets_classification_equals_visionrpc_v1(demo: Demo, tta: bool) -> None:
    expected = v1_predict(demo, "pets", tta)
    result = v2_infer(demo, "pets", tta)
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    for row, answer in enumerate(expected.results):
        assert [b.decode() for b in labels[row]] == [i.label for i in answer.classification.top]
        assert scores[row].tolist() == [i.score for i in answer.classification.top]
    assert result.as_numpy("tta_views").tolist() == [r.tta_views for r in expected.results]


@pytest.mark.parametrize("tta", [False, True])
def test_voc_multilabel_equals_visionrpc_v1(demo: Demo, tta: bool) -> None:
    expected = v1_predict(demo, "voc", tta)
    result = v2_infer(demo, "voc", tta)
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    predicted = result.as_numpy("predicted")
    for row, answer in enumerate(expected.results):
        chosen = [
            (b.decode(), float(s))
            for b, s, on in zip(labels[row], scores[row], predicted[row], strict=True)
            if on
        ]
        assert chosen == [(i.label, i.score) for i in answer.multilabel.labels]


@pytest.mark.parametrize("tta", [False, True])
def test_biwi_points_equal_visionrpc_v1(demo: Demo, tta: bool) -> None:
    expected = v1_predict(demo, "biwi", tta)
    result = v2_infer(demo, "biwi", tta)
    points = result.as_numpy("points")
    for row, answer in enumerate(expected.results):
        assert points[row].tolist() == [
            [np.float32(p.x), np.float32(p.y)] for p in answer.points.points
        ]


async def test_the_asyncio_client_gets_the_same_answer(demo: Demo) -> None:
    tensor = triton_aio.InferInput("images", [len(demo.images["pets"])], "BYTES")
    tensor.set_data_from_numpy(np.array(demo.images["pets"], dtype=np.object_))
    async with triton_aio.InferenceServerClient(url=demo.server.address) as client:
        metadata = await client.get_model_metadata("pets", as_json=True)
        assert [output["name"] for output in metadata["outputs"]][:2] == ["labels", "scores"]
        result = await client.infer("pets", [tensor], parameters={"top_k": 3})
    expected = v1_predict(demo, "pets", tta=False)
    assert [b.decode() for b in result.as_numpy("labels")[:, 0]] == [
        r.classification.top[0].label for r in expected.results
    ]
