"""Server reflection answers real clients of grpc.reflection.v1 and of v1alpha.

The v1 client is grpc-js-reflection-client (examples/node/reflect.js), which asks only
the version it is told to, with no fallback; grpcio-reflection's own descriptor
database is a second v1alpha client. reflect.js then calls ListModels through the
descriptor reflection gave it, so the descriptors are whole, not just listed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.helpers.node import run_node
from tests.helpers.onnx_models import write_centroid_points, write_channel_mean_classifier
from tests.helpers.server import RunningServer, server_in_thread

SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "inference.GRPCInferenceService",
    "visionrpc.v1.InferenceService",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository: Path = tmp_path_factory.mktemp("repository")
    write_channel_mean_classifier(repository, name="colors")
    write_centroid_points(repository, name="centroid")
    with server_in_thread(repository) as running:
        yield running


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_a_reflection_client_of_either_version_lists_describes_and_calls(
    server: RunningServer, version: str
) -> None:
    done = run_node("reflect.js", "--server", server.address, "--reflection", version)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert {line.removeprefix("service ") for line in lines if line.startswith("service ")} == (
        SERVICES
    )
    assert (
        "visionrpc.v1.InferenceService: GetModelInfo, ListModels, Predict, PredictStream" in lines
    )
    models = [line for line in lines if line.startswith("model ")]
    assert models == [
        "model centroid MODEL_TASK_POINTS versions 1",
        "model colors MODEL_TASK_CLASSIFICATION versions 1",
    ]


def test_the_v1_reflection_service_describes_itself_in_its_own_package(
    server: RunningServer,
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert set(database.get_services()) == SERVICES
        file = database.FindFileContainingSymbol("grpc.reflection.v1.ServerReflection")
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindMethodByName("grpc.reflection.v1.ServerReflection.ServerReflectionInfo")
    assert (file.name, file.package) == (
        "grpc/reflection/v1/reflection.proto",
        "grpc.reflection.v1",
    )
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    # Not a word of v1alpha left in the v1 file, whose messages reference each other.
    serialized = file.SerializeToString()
    assert b"v1alpha" not in serialized
    response = next(m for m in file.message_type if m.name == "ServerReflectionResponse")
    assert {f.type_name for f in response.field if f.type_name} >= {
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.FileDescriptorResponse",
    }
