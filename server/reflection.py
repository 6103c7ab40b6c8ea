"""Server reflection under both names clients ask for: grpc.reflection.v1 and v1alpha.

grpcio-reflection implements only ``grpc.reflection.v1alpha``; newer clients (recent grpcurl,
grpc-js-reflection-client when told v1) ask ``grpc.reflection.v1`` first.
The two protocols have the same messages under another package name, byte for byte on
the wire, so one servicer answers both: its handler is registered a second time under
v1's service name, and the pool gets a v1 file derived from v1alpha's by renaming the
package, so a client that describes the reflection service itself finds v1 as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

# The asyncio servicer, which grpcio-reflection exports as reflection.aio under a
# Python-version check that type checkers cannot follow; this is the module it names.
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def v1_reflection_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1's file: v1alpha's messages and service under the v1 package."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's language options name v1alpha's packages
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # message and enum fields only
                field.type_name = field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return proto


def enable_reflection(
    server: grpc.aio.Server, services: Sequence[str], pool: descriptor_pool.DescriptorPool
) -> None:
    """Serve reflection v1 and v1alpha over ``pool``, listing ``services`` and both of its own.

    ``pool`` must already hold every served file; v1's reflection file is added here.
    """
    pool.Add(v1_reflection_file())
    servicer = AsyncReflectionServicer([*services, V1_SERVICE, V1ALPHA_SERVICE], pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_handler = grpc.method_handlers_generic_handler(
        V1_SERVICE,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1_handler,))
