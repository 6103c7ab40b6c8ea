"""Triton's own client (tritonclient 2.73) against a real server, over the Open Inference Protocol.

Every call a Triton user's first try makes, and inference on all three tasks through
both input paths, with answers equal to visionrpc.v1's for the same images. Counts are
read at the server (its Prometheus registry) as well as at the client.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.helpers import images
from tests.helpers.onnx_models import (
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
)
from tests.helpers.server import RunningServer, running_server, server_in_thread
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2
from visionrpc.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc

COLOURS = [(200, 30, 40), (20, 180, 60), (30, 40, 220)]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oip") / "models"
    write_channel_mean_classifier(root)
    write_channel_mean_multilabel(root, tta={"enabled": False, "views": ["flip"]})
    write_centroid_points(root)
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    with server_in_thread(repository) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=server.address) as connected:
        yield connected


@pytest.fixture
def v1(server: RunningServer) -> Iterator[pb_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    return images.encode(Image.new("RGB", size, colour), "PNG")


def dot_png(centre: tuple[float, float]) -> bytes:
    return images.encode(images.dot(32, 24, centre, radius=4.0), "PNG")


def encoded_input(data: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("images", [len(data)], "BYTES")
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_))
    return tensor


def count(server: RunningServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_health_metadata_config_and_index_calls_answer(
    client: triton.InferenceServerClient,
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("colors")
    assert not client.is_model_ready("no-such-model")
    server_metadata = client.get_server_metadata(as_json=True)
    assert server_metadata["name"] == "visionrpc"
    assert "model_configuration" in server_metadata["extensions"]

    metadata = client.get_model_metadata("colors", as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx"
    assert {(t["name"], t["datatype"]) for t in metadata["inputs"]} == {
        ("images", "BYTES"),
        ("pixels", "UINT8"),
    }
    assert [t["name"] for t in metadata["outputs"]][:2] == ["labels", "scores"]

    # Triton's model configuration carries the mapping in words, as its parameters.
    config = client.get_model_config("colors", as_json=True)["config"]
    assert config["name"] == "colors"
    assert int(config["max_batch_size"]) >= 1
    assert {i["name"] for i in config["input"]} == {"images", "pixels"}
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert json.loads(parameters["labels"]) == ["red", "green", "blue"]
    assert parameters["parameter.threshold.<label>"].startswith("number: ")
    assert parameters["output.scores"].startswith("FP32 [N, *]: ")

    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} == {
        ("centroid", "READY"),
        ("channels", "READY"),
        ("colors", "READY"),
    }


def test_classification_answers_equal_visionrpc_v1(
    client: triton.InferenceServerClient, v1: pb_grpc.InferenceServiceStub
) -> None:
    data = [png(colour) for colour in COLOURS]
    result = client.infer("colors", [encoded_input(data)], parameters={"top_k": 2})
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == (3, 2) and scores.shape == (3, 2) and scores.dtype == np.float32
    expected = v1.Predict(
        pb.PredictRequest(
            model="colors",
            images=[pb.Image(encoded=item) for item in data],
            options=pb.PredictionOptions(top_k=2),
        )
    )
    for row, answer in enumerate(expected.results):
        top = answer.classification.top
        assert [label.decode() for label in labels[row]] == [item.label for item in top]
        assert scores[row].tolist() == [item.score for item in top]
    assert [label.decode() for label in labels[:, 0]] == ["red", "green", "blue"]
    assert result.as_numpy("error").tolist() == [b"", b"", b""]


def test_multilabel_answers_equal_visionrpc_v1_with_per_class_thresholds(
    client: triton.InferenceServerClient, v1: pb_grpc.InferenceServiceStub
) -> None:
    data = [png((200, 150, 40)), png((20, 30, 220))]
    result = client.infer(
        "channels",
        [encoded_input(data)],
        parameters={"threshold": 0.5, "threshold.blue": 0.95},
    )
    expected = v1.Predict(
        pb.PredictRequest(
            model="channels",
            images=[pb.Image(encoded=item) for item in data],
            options=pb.PredictionOptions(threshold=0.5, class_thresholds={"blue": 0.95}),
        )
    )
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    predicted, thresholds = result.as_numpy("predicted"), result.as_numpy("thresholds")
    assert labels.shape == scores.shape == predicted.shape == thresholds.shape == (2, 3)
    for row, answer in enumerate(expected.results):
        chosen = [
            label.decode() for label, on in zip(labels[row], predicted[row], strict=True) if on
        ]
        assert chosen == [item.label for item in answer.multilabel.labels]
        chosen_scores = [float(s) for s, on in zip(scores[row], predicted[row], strict=True) if on]
        assert chosen_scores == [item.score for item in answer.multilabel.labels]
        by_label = dict(
            zip([label.decode() for label in labels[row]], thresholds[row], strict=True)
        )
        assert by_label["blue"] == pytest.approx(0.95) and by_label["red"] == pytest.approx(0.5)
    # The blue image's blue channel passes 0.5 but not its own 0.95 threshold.
    assert b"blue" not in set(labels[1][predicted[1]].tolist())


def test_points_answer_in_original_pixels_equal_visionrpc_v1(
    client: triton.InferenceServerClient, v1: pb_grpc.InferenceServiceStub
) -> None:
    data = [dot_png((8.5, 6.5)), dot_png((20.5, 15.5))]
    result = client.infer("centroid", [encoded_input(data)])
    points, normalized = result.as_numpy("points"), result.as_numpy("points_normalized")
    assert points.shape == normalized.shape == (2, 1, 2)
    expected = v1.Predict(
        pb.PredictRequest(model="centroid", images=[pb.Image(encoded=item) for item in data])
    )
    for row, answer in enumerate(expected.results):
        point = answer.points.points[0]
        assert points[row, 0].tolist() == [np.float32(point.x), np.float32(point.y)]
        assert normalized[row, 0].tolist() == [
            np.float32(point.x_normalized),
            np.float32(point.y_normalized),
        ]
    assert result.as_numpy("original_size").tolist() == [[32, 24], [32, 24]]


def test_raw_uint8_pixels_answer_as_their_encoded_image(
    client: triton.InferenceServerClient,
) -> None:
    pixels = np.stack([np.full((8, 8, 3), colour, dtype=np.uint8) for colour in COLOURS])
    raw = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    raw.set_data_from_numpy(pixels)
    from_pixels = client.infer("colors", [raw])
    from_png = client.infer("colors", [encoded_input([png(colour) for colour in COLOURS])])
    assert from_pixels.as_numpy("labels").tolist() == from_png.as_numpy("labels").tolist()
    assert from_pixels.as_numpy("scores").tolist() == from_png.as_numpy("scores").tolist()


def test_model_metadata_parameters_describe_the_mapping(server: RunningServer) -> None:
    """ModelMetadataResponse.parameters (our extension) holds what get_model_config shows."""
    with grpc.insecure_channel(server.address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(v2.ModelMetadataRequest(name="centroid"))
    parameters = {key: value.string_param for key, value in metadata.parameters.items()}
    assert parameters["task"] == "points"
    assert parameters["output.points"].startswith("FP32 [N, 1, 2]: ")
    assert parameters["input.pixels"].startswith("UINT8 [N, H, W, C]")
    assert {"parameter.top_k", "parameter.tta", "one_bad_image"} <= set(parameters)


def test_typed_contents_answer_as_raw_contents(server: RunningServer) -> None:
    """Clients that fill ``contents`` instead of ``raw_input_contents`` get the same answer."""
    data = [png(colour) for colour in COLOURS]
    pixels = np.full((1, 8, 8, 3), COLOURS[2], dtype=np.uint8)
    with grpc.insecure_channel(server.address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        request = v2.ModelInferRequest(model_name="colors", id="req-7")
        request.inputs.add(
            name="images", datatype="BYTES", shape=[3], contents={"bytes_contents": data}
        )
        request.outputs.add(name="labels")
        answer = stub.ModelInfer(request)
        pixels_request = v2.ModelInferRequest(model_name="colors")
        pixels_request.inputs.add(
            name="pixels",
            datatype="UINT8",
            shape=list(pixels.shape),
            contents={"uint_contents": pixels.reshape(-1).tolist()},
        )
        pixels_answer = stub.ModelInfer(pixels_request)
    assert answer.id == "req-7"
    assert [output.name for output in answer.outputs] == ["labels"]
    assert list(answer.outputs[0].shape) == [3, 3]
    assert pixels_answer.model_name == "colors" and pixels_answer.model_version == "1"


def test_requested_outputs_alone_come_back(client: triton.InferenceServerClient) -> None:
    result = client.infer(
        "colors",
        [encoded_input([png(COLOURS[0])])],
        outputs=[triton.InferRequestedOutput("scores")],
    )
    response = result.get_response()
    assert [output.name for output in response.outputs] == ["scores"]
    assert result.as_numpy("labels") is None


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"top_k": 0}, "'top_k'"),
        ({"top_k": "three"}, "'top_k'"),
        ({"threshold": 1.5}, "'threshold'"),
        ({"threshold.purple": 0.3}, "'threshold.purple'"),
        ({"tta": 1}, "'tta'"),
        ({"topk": 2}, "'topk'"),
    ],
)
def test_a_bad_parameter_is_invalid_argument_naming_it(
    client: triton.InferenceServerClient, parameters: dict[str, Any], named: str
) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("channels", [encoded_input([png(COLOURS[0])])], parameters=parameters)
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"parameters[{named}]" in raised.value.message()


def test_a_parameter_of_another_task_is_invalid_argument_naming_it(
    client: triton.InferenceServerClient,
) -> None:
    for model, parameters, named in (
        ("centroid", {"threshold.x": 0.3}, "'threshold.<label>'"),
        ("channels", {"top_k": 2}, "'top_k'"),
        ("colors", {"threshold": 0.5}, "'threshold'"),
    ):
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, [encoded_input([png(COLOURS[0])])], parameters=parameters)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert raised.value.message().startswith(f"parameters[{named}]: does not apply")


def test_an_unknown_output_is_refused_before_any_image_is_decoded(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    decoded = count(server, "visionrpc_preprocess_seconds_count", model="colors")
    with pytest.raises(InferenceServerException) as raised:
        client.infer(
            "colors",
            [encoded_input([png(COLOURS[0])])],
            outputs=[triton.InferRequestedOutput("probabilities")],
        )
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'probabilities'" in raised.value.message() and "labels" in raised.value.message()
    assert count(server, "visionrpc_preprocess_seconds_count", model="colors") == decoded


def test_one_bad_image_fails_only_its_own_row(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    before_ok = count(server, "visionrpc_images_total", model="colors", version="1", code="OK")
    before_bad = count(
        server, "visionrpc_images_total", model="colors", version="1", code="INVALID_ARGUMENT"
    )
    data = [png(COLOURS[0]), b"not an image at all", png(COLOURS[2])]
    result = client.infer(
        "colors", [encoded_input(data)], outputs=[triton.InferRequestedOutput("labels")]
    )
    labels, errors = result.as_numpy("labels"), result.as_numpy("error")
    assert labels[0, 0] == b"red" and labels[2, 0] == b"blue"
    assert labels[1].tolist() == [b""] * labels.shape[1]
    assert errors[0] == b"" and errors[2] == b""
    assert errors[1].decode().startswith("INVALID_ARGUMENT: image 1: ")
    after_ok = count(server, "visionrpc_images_total", model="colors", version="1", code="OK")
    after_bad = count(
        server, "visionrpc_images_total", model="colors", version="1", code="INVALID_ARGUMENT"
    )
    assert (after_ok - before_ok, after_bad - before_bad) == (2, 1)


def test_a_request_whose_every_image_is_bad_fails(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.infer("colors", [encoded_input([b"\x89PNG broken"])])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "image 0" in raised.value.message()


def test_an_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "StatusCode.NOT_FOUND"


def test_load_and_unload_say_how_to_enable_them_when_model_control_is_off(
    client: triton.InferenceServerClient,
) -> None:
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as raised:
            call("colors")
        assert raised.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "--model-control-api on" in raised.value.message()
    assert client.is_model_ready("colors")


async def test_load_and_unload_control_the_models_with_the_control_token_alone(
    repository: Path,
) -> None:
    inference, control = "inference-token-1234", "control-token-5678"
    settings: dict[str, Any] = {
        "model_control": "explicit",
        "model_control_api": "on",
        "load_model": ("colors",),
        "auth_token": inference,
        "model_control_token": control,
    }
    as_inference = {"authorization": f"Bearer {inference}"}
    as_control = {"authorization": f"Bearer {control}"}
    async with (
        running_server(repository, **settings) as served,
        triton_aio.InferenceServerClient(url=served.address) as client,
    ):
        index = await client.get_model_repository_index(headers=as_inference, as_json=True)
        states = {m["name"]: m.get("state") for m in index["models"]}
        assert states["colors"] == "READY" and states["channels"] != "READY"
        assert not await client.is_model_ready("channels", headers=as_inference)

        with pytest.raises(InferenceServerException) as refused:
            await client.load_model("channels", headers=as_inference)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        await client.load_model("channels", headers=as_control)
        assert await client.is_model_ready("channels", headers=as_inference)
        answer = await client.infer(
            "channels", [encoded_input([png(COLOURS[2])])], headers=as_inference
        )
        assert b"blue" in answer.as_numpy("labels")[0].tolist()

        await client.unload_model("colors", headers=as_control)
        assert not await client.is_model_ready("colors", headers=as_inference)
        with pytest.raises(InferenceServerException) as gone:
            await client.infer("colors", [encoded_input([png(COLOURS[0])])], headers=as_inference)
        assert gone.value.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
        after = await client.get_model_repository_index(headers=as_inference, as_json=True)
        assert "channels" in {m["name"] for m in after["models"] if m.get("state") == "READY"}

        with pytest.raises(InferenceServerException) as missing:
            await client.load_model("no-such-model", headers=as_control)
        assert missing.value.status() == "StatusCode.NOT_FOUND"


async def test_asyncio_client_infers_and_is_counted(repository: Path) -> None:
    async with running_server(repository) as served:
        async with triton_aio.InferenceServerClient(url=served.address) as client:
            assert await client.is_server_ready()
            result = await client.infer("colors", [encoded_input([png(COLOURS[1])])])
            assert result.as_numpy("labels")[0, 0] == b"green"
        answered = count(served, "visionrpc_requests_total", model="colors", version="1", code="OK")
        assert answered == 1


async def test_a_draining_server_is_not_ready(repository: Path) -> None:
    async with (
        running_server(repository) as served,
        triton_aio.InferenceServerClient(url=served.address) as client,
    ):
        assert await client.is_server_ready() and await client.is_model_ready("colors")
        await served.app.health.enter_graceful_shutdown()
        assert not await client.is_server_ready()
        assert not await client.is_model_ready("colors")
        assert await client.is_server_live()


def test_inference_needs_the_bearer_token_when_one_is_set(repository: Path) -> None:
    token = "s3cret-token-for-tests"
    with server_in_thread(repository, auth_token=token) as served:
        with triton.InferenceServerClient(url=served.address) as client:
            with pytest.raises(InferenceServerException) as raised:
                client.infer("colors", [encoded_input([png(COLOURS[0])])])
            assert raised.value.status() == "StatusCode.UNAUTHENTICATED"
            result = client.infer(
                "colors",
                [encoded_input([png(COLOURS[0])])],
                headers={"authorization": f"Bearer {token}"},
            )
            assert result.as_numpy("labels")[0, 0] == b"red"
        refused = count(
            served, "visionrpc_requests_total", model="_unknown", version="",
            code="UNAUTHENTICATED",
        )  # fmt: skip
        assert refused == 1


def _infer_request(name: str, datatype: str, shape: list[int]) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="colors")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "raw", "says"),
    [
        ("image", "BYTES", [1], b"\x03\x00\x00\x00abc", "'image' of 'BYTES'"),
        ("images", "FP32", [1], b"\x00" * 4, "'images' of 'FP32'"),
        ("images", "BYTES", [2], b"\x03\x00\x00\x00abc", "says 2 images"),
        ("images", "BYTES", [1], b"\xff\x00\x00\x00abc", "runs past the end"),
        ("images", "BYTES", [1, 2], b"", "[N] or [N, 1]"),
        ("pixels", "UINT8", [1, 8, 8, 3], b"\x00" * 100, "needs 192 bytes"),
        ("pixels", "UINT8", [8, 8, 3], b"\x00" * 192, "[N, H, W, C]"),
    ],
)
def test_a_malformed_input_tensor_is_invalid_argument_saying_why(
    server: RunningServer, name: str, datatype: str, shape: list[int], raw: bytes, says: str
) -> None:
    request = _infer_request(name, datatype, shape)
    request.raw_input_contents.append(raw)
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as raised:
        v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in str(raised.value.details())


def test_images_of_shape_n_by_1_are_accepted_as_triton_batches_send_them(
    server: RunningServer,
) -> None:
    data = png(COLOURS[1])
    request = _infer_request("images", "BYTES", [1, 1])
    request.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
    with grpc.insecure_channel(server.address) as channel:
        answer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    labels = answer.outputs[0]
    assert labels.name == "labels" and list(labels.shape) == [1, 3]
    assert answer.raw_output_contents[0][4:9] == b"green"


def test_reflection_lists_and_describes_the_open_inference_service(
    server: RunningServer,
) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService"
        ),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="visionrpc.v1.InferenceService"
        ),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, described, v1_described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {service.name for service in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "visionrpc.v1.InferenceService"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"ServerLive", "ModelMetadata", "ModelInfer", "RepositoryIndex"} <= methods
    assert v1_described.file_descriptor_response.file_descriptor_proto


def test_a_stream_answers_each_request_and_reports_a_bad_one_without_ending(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    ok_before = count(server, "visionrpc_requests_total", model="colors", version="1", code="OK")
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, colour in enumerate(COLOURS):
            client.async_stream_infer(
                "colors",
                [encoded_input([png(colour)])],
                request_id=f"r{index}",
                enable_empty_final_response=True,
            )
        client.async_stream_infer(
            "colors", [encoded_input([png(COLOURS[0])])], parameters={"topk": 1}
        )
        received = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    labels = {}
    errors = []
    for result, error in received:
        if error is not None:
            errors.append(error.message())
            continue
        response = result.get_response()
        labels[response.id] = result.as_numpy("labels")[0, 0]
        assert response.parameters["triton_final_response"].bool_param
    assert labels == {"r0": b"red", "r1": b"green", "r2": b"blue"}
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: parameters['topk']")
    ok_after = count(server, "visionrpc_requests_total", model="colors", version="1", code="OK")
    assert ok_after - ok_before == 3
