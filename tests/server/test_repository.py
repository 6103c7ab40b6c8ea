"""Loading a repository: broken models are reported and skipped, the rest serve."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.onnx_models import (
    channel_mean_graph,
    config_dict,
    write_channel_mean_classifier,
    write_corrupt_onnx,
    write_model,
    write_wrong_width,
)
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc
from visionrpc.server.batching import BatchSettings
from visionrpc.server.errors import ModelNotFound
from visionrpc.server.repository import load_repository
from visionrpc.server.runtime import RuntimeOptions

DEFAULT_BATCHING = BatchSettings(
    max_batch_size=4, max_queue_delay_ms=1.0, max_queue_size=16, instances=1
)
CPU_ONLY = RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=1)


def broken_repository(root: Path) -> Path:
    write_channel_mean_classifier(root)
    write_corrupt_onnx(root, config_dict("corrupt", "classification", ["a", "b", "c"], 8))
    write_wrong_width(root, config_dict("narrow", "classification", ["a", "b"], 8))
    write_model(
        root,
        config_dict("wrongsize", "multilabel", ["a", "b", "c"], 16),
        channel_mean_graph(1.0, 8, softmax=False),
    )
    bad_config = root / "badconfig"
    (bad_config / "1").mkdir(parents=True)
    (bad_config / "config.yaml").write_text("task: detection\nlabels: [a]\n")
    unversioned = root / "unversioned"
    unversioned.mkdir()
    (unversioned / "config.json").write_text((root / "colors" / "config.json").read_text())
    return root


def test_every_broken_model_is_skipped_with_its_file_and_reason(tmp_path: Path) -> None:
    root = broken_repository(tmp_path / "models")
    repository = load_repository(root, CPU_ONLY, DEFAULT_BATCHING)
    assert repository.names() == ["colors"]
    reasons = {failure.model: (failure.path, failure.reason) for failure in repository.failures}
    assert set(reasons) == {"corrupt", "narrow", "wrongsize", "badconfig", "unversioned"}
    assert reasons["corrupt"][0] == root / "corrupt" / "1" / "model.onnx"
    assert "onnxruntime cannot load" in reasons["corrupt"][1]
    assert "[batch, 2]" in reasons["narrow"][1]
    assert "[batch, 16, 16, 3]" in reasons["wrongsize"][1]
    assert reasons["badconfig"][0] == root / "badconfig" / "config.yaml"
    assert "task must be one of" in reasons["badconfig"][1]
    assert "version" in reasons["unversioned"][1]


def test_a_broken_version_leaves_the_older_one_serving(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    write_corrupt_onnx(root, config_dict("colors", "classification", ["red", "green", "blue"], 8))
    repository = load_repository(root, CPU_ONLY, DEFAULT_BATCHING)
    assert repository.versions("colors") == [1]
    assert repository.get("colors").version == 1
    with pytest.raises(ModelNotFound, match="versions: 1"):
        repository.get("colors", "2")


def test_models_load_checked_and_warmed_with_batching_in_force(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root, batching={"max_batch_size": 2, "max_queue_delay_ms": 0})
    model = load_repository(root, RuntimeOptions(), DEFAULT_BATCHING).get("colors")
    assert model.runtime.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert model.runtime.warmup_seconds > 0
    assert model.batching == BatchSettings(
        max_batch_size=2, max_queue_delay_ms=0.0, max_queue_size=16, instances=1
    )


def test_an_unknown_provider_is_a_load_failure(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_channel_mean_classifier(root)
    options = RuntimeOptions(providers=("NoSuchExecutionProvider",))
    repository = load_repository(root, options, DEFAULT_BATCHING)
    assert repository.names() == []
    assert "NoSuchExecutionProvider" in repository.failures[0].reason


async def test_the_server_serves_the_good_models_beside_broken_ones(tmp_path: Path) -> None:
    root = broken_repository(tmp_path / "models")
    async with (
        running_server(root) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        listed = await stub.ListModels(pb.ListModelsRequest())
        assert [model.name for model in listed.models] == ["colors"]
        response = await stub.Predict(encoded_request("colors", png(solid(0, 255, 0))))
        assert response.results[0].classification.top[0].label == "green"
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Predict(encoded_request("corrupt", png(solid(0, 255, 0))))
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'corrupt' failed to load" in (failure.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        for service, status in (("corrupt", "NOT_SERVING"), ("colors", "SERVING")):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status) == status
