"""Generated protobuf and gRPC code: visionrpc's API (``visionrpc.v1``) and, in
``visionrpc.protos.inference``, the Open Inference Protocol (proto package ``inference``)."""

from .visionrpc.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)

__all__ = ["inference_pb2", "inference_pb2_grpc", "model_control_pb2", "model_control_pb2_grpc"]
