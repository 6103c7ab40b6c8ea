"""What generic tools and orchestrators see: models, model info, health, reflection, metrics."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.helpers.onnx_models import (
    write_centroid_points,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
)
from tests.helpers.server import running_server, server_in_thread
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc


@pytest.fixture
def described_repository(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, min_confidence=0.4, top_k=2)
    write_channel_mean_classifier(
        root,
        min_confidence=0.4,
        top_k=2,
        input={"height": 8, "width": 8, "resize_method": "crop"},
        tta={"enabled": True, "views": ["flip", "zoom_center"], "beta": 0.3},
        batching={"max_batch_size": 4, "instances": 2},
        # Both versions serve (the default policy serves only the newest).
        version_policy={"all": {}},
        training={
            "dataset": "oxford-iiit-pet",
            "trained_at": "2026-11-20T10:00:00Z",
            "arch": "resnet18",
            "metrics": {"error_rate": 0.07},
        },
    )
    write_channel_mean_multilabel(root, threshold=0.3, class_thresholds={"green": 0.7})
    write_centroid_points(root)
    return root


@pytest.fixture
async def channel(described_repository: Path) -> AsyncIterator[grpc.aio.Channel]:
    async with (
        running_server(described_repository, max_queue_size=100) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield channel


async def test_list_models_names_tasks_versions_and_provider(channel: grpc.aio.Channel) -> None:
    listed = await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
    summary = {model.name: (model.task, list(model.versions)) for model in listed.models}
    assert summary == {
        "centroid": (pb.MODEL_TASK_POINTS, ["1"]),
        "channels": (pb.MODEL_TASK_MULTILABEL, ["1"]),
        "colors": (pb.MODEL_TASK_CLASSIFICATION, ["1", "2"]),
    }
    assert {model.provider for model in listed.models} == {"CPUExecutionProvider"}


async def test_model_info_reports_everything_in_force(channel: grpc.aio.Channel) -> None:
    info = await pb_grpc.InferenceServiceStub(channel).GetModelInfo(
        pb.GetModelInfoRequest(model="colors")
    )
    assert (info.name, info.version, list(info.versions), info.task) == (
        "colors",
        "2",
        ["1", "2"],
        pb.MODEL_TASK_CLASSIFICATION,
    )
    assert list(info.labels) == ["red", "green", "blue"]
    assert (info.input.height, info.input.width, info.input.resize_method) == (8, 8, "crop")
    assert info.min_confidence == pytest.approx(0.4)
    assert info.tta.enabled and list(info.tta.views) == ["flip", "zoom_center"]
    assert info.tta.beta == pytest.approx(0.3)
    assert info.provider == "CPUExecutionProvider"
    # The model's own batching where set, the server's defaults elsewhere.
    batching = info.batching
    assert (batching.max_batch_size, batching.instances, batching.max_queue_size) == (4, 2, 100)
    assert batching.max_queue_delay_ms == pytest.approx(2.0)
    assert dict(info.metrics) == {"error_rate": pytest.approx(0.07)}
    assert (info.dataset, info.trained_at) == ("oxford-iiit-pet", "2026-11-20T10:00:00Z")
    assert json.loads(info.config_json)["training"]["arch"] == "resnet18"
    assert json.loads(info.config_json)["top_k"] == 2


async def test_model_info_of_a_pinned_version_and_thresholds(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    old = await stub.GetModelInfo(pb.GetModelInfoRequest(model="colors", version="1"))
    # The config belongs to the model, not the version: version 1 serves under it too.
    assert old.version == "1" and old.tta.enabled and old.input.resize_method == "crop"
    channels = await stub.GetModelInfo(pb.GetModelInfoRequest(model="channels"))
    assert channels.threshold == pytest.approx(0.3)
    assert dict(channels.class_thresholds) == {"green": pytest.approx(0.7)}
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.GetModelInfo(pb.GetModelInfoRequest(model="colors", version="9"))
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_is_serving_overall_and_per_model(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "visionrpc.v1.InferenceService", "colors", "channels", "centroid"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="visionrpc.v1.InferenceService"
        ),
    ]

    async def outgoing() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in requests:
            yield request

    listed, described = [answer async for answer in stub.ServerReflectionInfo(outgoing())]
    names = {service.name for service in listed.list_services_response.service}
    assert {"visionrpc.v1.InferenceService", "grpc.health.v1.Health"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        m.name for f in files for s in f.service if s.name == "InferenceService" for m in s.method
    }
    assert methods == {"Predict", "PredictStream", "ListModels", "GetModelInfo"}


def test_a_threaded_server_serves_synchronous_clients_and_metrics(
    described_repository: Path,
) -> None:
    with server_in_thread(described_repository, metrics=True) as server:
        with grpc.insecure_channel(server.address) as sync_channel:
            stub = pb_grpc.InferenceServiceStub(sync_channel)
            response = stub.Predict(encoded_request("colors", png(solid(0, 200, 0))))
        assert response.results[0].classification.top[0].label == "green"
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            assert page.status == 200
            assert "python_info" in page.read().decode()


async def test_a_server_without_models_reports_not_serving(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    async with (
        running_server(tmp_path / "models") as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        listed = await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
        assert list(listed.models) == []
