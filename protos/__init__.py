"""Generated protobuf and gRPC code: visionrpc's API (``visionrpc.v1``) and, in
``visionrpc.protos.inference``, the Open Inference Protocol (proto package ``inference``).

Besides the generated modules, the two functions that turn the task names used
everywhere else ("classification", "multilabel", "points") into visionrpc.v1's
``ModelTask`` enum and back, so no caller spells the enum prefix itself.
"""

from .visionrpc.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)

__all__ = [
    "MODEL_HINT_KEY",
    "VERSION_HINT_KEY",
    "inference_pb2",
    "inference_pb2_grpc",
    "model_control_pb2",
    "model_control_pb2_grpc",
    "task_from_proto",
    "task_to_proto",
]

# Request metadata with which a client names the model (and version) of a prediction
# call's message, so the server can give the call a queue slot when its headers arrive,
# before the message is read (server/admission.py). A hint only: the message decides.
MODEL_HINT_KEY = "visionrpc-model"
VERSION_HINT_KEY = "visionrpc-model-version"

_PREFIX = "MODEL_TASK_"


def task_to_proto(task: str) -> inference_pb2.ModelTask.ValueType:
    """The ``ModelTask`` value of a task name; ValueError for a name the API does not know."""
    try:
        return inference_pb2.ModelTask.Value(_PREFIX + task.upper())
    except ValueError:
        raise ValueError(f"no ModelTask for task {task!r}") from None


def task_from_proto(value: int) -> str:
    """The task name of a ``ModelTask`` value.

    proto3 enums are open: a newer server may send a value this code does not
    know yet, which reads as "unknown" rather than failing the whole answer.
    """
    try:
        name = inference_pb2.ModelTask.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return "unknown"
    return name.removeprefix(_PREFIX).lower()
