"""Generated protobuf and gRPC code for the visionrpc API (``visionrpc.v1``)."""

from .visionrpc.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)

__all__ = ["inference_pb2", "inference_pb2_grpc", "model_control_pb2", "model_control_pb2_grpc"]
