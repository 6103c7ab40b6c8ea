"""The Open Inference Protocol's tensors to pipeline calls and back (no gRPC here).

The mapping, which ModelMetadata's ``parameters`` and the README repeat:

- **Input**: exactly one tensor, either ``images``, BYTES ``[N]`` (or ``[N, 1]``) of
  encoded images (JPEG, PNG, WEBP, BMP, GIF), or ``pixels``, UINT8 ``[N, H, W, C]`` of
  raw pixels (C = 1 grey, 3 RGB, 4 RGBA), in the tensor's ``contents`` or in
  ``raw_input_contents`` (BYTES elements there are each prefixed by their length as a
  little-endian uint32, as every V2 client writes them).
- **Options**: request ``parameters`` named as visionrpc.v1's options: ``top_k``,
  ``tta_views`` (integers), ``threshold``, ``min_confidence`` (numbers), ``tta``,
  ``all_scores`` (booleans) and ``threshold.<label>`` (a number per label). A parameter
  of the wrong type or value, an unknown one, or one of another task's (``top_k`` for a
  multilabel model...) is INVALID_ARGUMENT naming it. Triton's
  scheduling hints ``priority`` and ``timeout`` are accepted and ignored.
- **Outputs**: the task's typed tensors (``tasks.<task>.v2_outputs``), plus
  ``tta_views`` INT32 ``[N]``, ``original_size`` INT32 ``[N, 2]`` (width, height) and
  ``error`` BYTES ``[N]``; ``outputs`` in the request selects among them.
- **One bad image**: V2 has no per-image status, so the call succeeds and the image's
  row of ``error`` holds ``"<STATUS>: image <i>: <why>"`` (empty for good images); its
  rows elsewhere are NaN, empty labels or false. ``error`` comes back whenever an image
  failed, even when ``outputs`` did not name it, so a failure is never silent. When every
  image fails, the call fails with the first image's status instead.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionrpc.protos.inference import grpc_predict_v2_pb2 as v2

from .errors import InvalidInput, VisionRPCError
from .model_config import ModelConfig
from .pipeline import EncodedImage, ImageInput, PredictCall, PredictOutcome, RawImage
from .postprocess import ImageResult, PredictionOptions
from .repository import LoadedModel
from .tasks import OutputTensor, serving_task

IMAGES_INPUT = "images"
PIXELS_INPUT = "pixels"
ERROR_OUTPUT = "error"
PLATFORM = "onnxruntime_onnx"
# Longest client text quoted back in an error message.
_QUOTED_CHARS = 64

_COMMON_OUTPUTS = (
    OutputTensor("tta_views", "INT32", (), "views blended, identity included (0: failed)"),
    OutputTensor("original_size", "INT32", (2,), "width, height of the decoded image"),
    OutputTensor(ERROR_OUTPUT, "BYTES", (), "empty, or '<STATUS>: image <i>: <why>'"),
)

# name: (kind, meaning); kind is what the InferParameter must hold.
PARAMETERS: dict[str, tuple[str, str]] = {
    "top_k": ("int", "classification: how many labels to return"),
    "threshold": ("number", "multilabel: one threshold for every label, in [0, 1]"),
    "threshold.<label>": ("number", "multilabel: that label's threshold, in [0, 1]"),
    "min_confidence": ("number", "classification: flag answers whose best score is below"),
    "tta": ("bool", "test-time augmentation on or off"),
    "tta_views": ("int", "how many of the model's TTA views to blend"),
    "all_scores": ("bool", "accepted for visionrpc.v1 parity: V2 always returns every label"),
}
# tritonclient's stream asks for a flag on each request's last response (see oip.py).
FINAL_RESPONSE_WANTED = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
_IGNORED_PARAMETERS = ("priority", "timeout", FINAL_RESPONSE_WANTED)
_PARAMETER_KINDS = {
    "int": ("int64_param", "uint64_param"),
    "number": ("double_param", "int64_param", "uint64_param"),
    "bool": ("bool_param",),
}


@dataclass(frozen=True)
class InferCall:
    """A ModelInfer request as the pipeline takes it, and the outputs it asked for."""

    call: PredictCall
    # Empty: every output.
    outputs: tuple[str, ...]


def quoted(text: str) -> str:
    """Client text as it may appear in an error: repr-escaped and truncated."""
    shown = text if len(text) <= _QUOTED_CHARS else text[:_QUOTED_CHARS] + "..."
    return repr(shown)


def infer_call(request: v2.ModelInferRequest) -> InferCall:
    """The pipeline call of a ModelInfer request; InvalidInput names what is wrong."""
    outputs = []
    for index, requested in enumerate(request.outputs):
        if requested.parameters:
            names = ", ".join(quoted(name) for name in sorted(requested.parameters))
            raise InvalidInput(f"outputs[{index}].parameters: not supported ({names})")
        outputs.append(requested.name)
    return InferCall(
        call=PredictCall(
            model=request.model_name,
            version=request.model_version or None,
            images=_images(request),
            options=_options(request.parameters),
        ),
        outputs=tuple(outputs),
    )


def _images(request: v2.ModelInferRequest) -> list[ImageInput]:
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"inputs: expected one tensor, {IMAGES_INPUT!r} (BYTES [N]) or "
            f"{PIXELS_INPUT!r} (UINT8 [N, H, W, C]), not {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    raw: bytes | None = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput("raw_input_contents: expected one entry, for the one input")
        if tensor.HasField("contents"):
            raise InvalidInput("inputs[0].contents: not allowed beside raw_input_contents")
        raw = request.raw_input_contents[0]
    shape = list(tensor.shape)
    if tensor.datatype == "BYTES" and tensor.name == IMAGES_INPUT:
        return _encoded_images(shape, raw, tensor.contents)
    if tensor.datatype == "UINT8" and tensor.name == PIXELS_INPUT:
        return _raw_images(shape, raw, tensor.contents)
    raise InvalidInput(
        f"inputs[0]: {quoted(tensor.name)} of {quoted(tensor.datatype)}: expected "
        f"{IMAGES_INPUT!r} of BYTES or {PIXELS_INPUT!r} of UINT8"
    )


def _encoded_images(
    shape: list[int], raw: bytes | None, contents: v2.InferTensorContents
) -> list[ImageInput]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidInput(f"inputs[0].shape: {IMAGES_INPUT!r} is [N] or [N, 1], not {shape}")
    elements = list(contents.bytes_contents) if raw is None else _split_bytes(raw)
    if len(elements) != shape[0]:
        raise InvalidInput(
            f"inputs[0]: shape {shape} says {shape[0]} images, the contents hold {len(elements)}"
        )
    return [EncodedImage(data=element) for element in elements]


def _split_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements from raw contents: each one a little-endian uint32 length, then data."""
    elements = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput("raw_input_contents[0]: truncated element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput("raw_input_contents[0]: an element runs past the end")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def _raw_images(
    shape: list[int], raw: bytes | None, contents: v2.InferTensorContents
) -> list[ImageInput]:
    if len(shape) != 4 or min(shape) < 0:
        raise InvalidInput(f"inputs[0].shape: {PIXELS_INPUT!r} is [N, H, W, C], not {shape}")
    count, height, width, channels = shape
    if raw is None:
        values = contents.uint_contents
        if any(value > 255 for value in values):
            raise InvalidInput("inputs[0].contents.uint_contents: UINT8 values must be 0-255")
        raw = bytes(values)
    per_image = height * width * channels
    if len(raw) != count * per_image:
        raise InvalidInput(
            f"inputs[0]: shape {shape} needs {count * per_image} bytes, the contents hold "
            f"{len(raw)}"
        )
    return [
        RawImage(
            pixels=raw[i * per_image : (i + 1) * per_image],
            height=height,
            width=width,
            channels=channels,
        )
        for i in range(count)
    ]


def _options(parameters: Mapping[str, v2.InferParameter]) -> PredictionOptions:
    values: dict[str, bool | int | float] = {}
    class_thresholds: dict[str, float] = {}
    for name, parameter in parameters.items():
        if name in _IGNORED_PARAMETERS:
            continue
        if name.startswith("threshold."):
            class_thresholds[name.removeprefix("threshold.")] = float(
                _value(name, parameter, "number")
            )
        elif name in PARAMETERS:
            values[name] = _value(name, parameter, PARAMETERS[name][0])
        else:
            raise InvalidInput(
                f"parameters[{quoted(name)}]: unknown parameter; known: {', '.join(PARAMETERS)}"
            )

    def number(name: str) -> float | None:
        return None if name not in values else float(values[name])

    def integer(name: str) -> int | None:
        return None if name not in values else int(values[name])

    def flag(name: str) -> bool | None:
        return None if name not in values else bool(values[name])

    return PredictionOptions(
        top_k=integer("top_k"),
        threshold=number("threshold"),
        class_thresholds=class_thresholds,
        min_confidence=number("min_confidence"),
        tta=flag("tta"),
        tta_views=integer("tta_views"),
        # V2 returns every multilabel score as a tensor column, so the task needs them all.
        all_scores=True,
    )


def in_parameter_terms(error: InvalidInput) -> InvalidInput:
    """The pipeline names options as visionrpc.v1 does; V2 callers sent parameters."""
    message = re.sub(
        r"^options\.class_thresholds\['(.*?)'\]",
        lambda match: f"parameters[{quoted('threshold.' + match.group(1))}]",
        error.message,
    )
    message = re.sub(r"^options\.class_thresholds\b", "parameters['threshold.<label>']", message)
    message = re.sub(r"^options\.(\w+)", r"parameters['\1']", message)
    return InvalidInput(message)


def _value(name: str, parameter: v2.InferParameter, kind: str) -> bool | int | float:
    held = parameter.WhichOneof("parameter_choice")
    allowed = _PARAMETER_KINDS[kind]
    if held not in allowed:
        raise InvalidInput(
            f"parameters[{quoted(name)}]: must be {' or '.join(allowed)}, not {held or 'empty'}"
        )
    value: bool | int | float = getattr(parameter, held)
    return value


def infer_response(
    outcome: PredictOutcome, request: v2.ModelInferRequest, outputs: Sequence[str]
) -> v2.ModelInferResponse:
    """The typed output tensors of an answered request (see the module docstring)."""
    config = outcome.model.config
    task = serving_task(config.task)
    known = check_outputs(config, outputs)
    answered = [None if isinstance(r, VisionRPCError) else r for r in outcome.results]
    columns = task.to_v2(config, [None if r is None else r.result for r in answered])
    columns.update(_common_columns(outcome.results, answered))
    failed = any(r is None for r in answered)
    selected = [
        name
        for name in known
        if not outputs or name in outputs or (name == ERROR_OUTPUT and failed)
    ]
    datatypes = {tensor.name: tensor.datatype for tensor in _outputs(config)}
    response = v2.ModelInferResponse(
        model_name=outcome.model.name, model_version=str(outcome.model.version), id=request.id
    )
    for name in selected:
        array = columns[name]
        response.outputs.add(name=name, datatype=datatypes[name], shape=list(array.shape))
        response.raw_output_contents.append(_raw(array, datatypes[name]))
    return response


def check_outputs(config: ModelConfig, outputs: Sequence[str]) -> list[str]:
    """The model's output names, once every requested one is among them."""
    known = [tensor.name for tensor in _outputs(config)]
    for index, name in enumerate(outputs):
        if name not in known:
            raise InvalidInput(
                f"outputs[{index}].name: {quoted(name)} is not an output of model "
                f"{config.name}; its outputs: {', '.join(known)}"
            )
    return known


def _common_columns(
    results: Sequence[ImageResult | VisionRPCError], answered: Sequence[ImageResult | None]
) -> dict[str, np.ndarray]:
    views = np.array([0 if r is None else r.tta_views for r in answered], dtype=np.int32)
    sizes = np.array(
        [(0, 0) if r is None else (r.original_width, r.original_height) for r in answered],
        dtype=np.int32,
    ).reshape(len(answered), 2)
    errors = np.array(
        [
            f"{r.kind.name}: {r.message}".encode() if isinstance(r, VisionRPCError) else b""
            for r in results
        ],
        dtype=object,
    )
    return {"tta_views": views, "original_size": sizes, ERROR_OUTPUT: errors}


def _raw(array: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw contents: row-major, little-endian, BYTES length-prefixed."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    dtypes: dict[str, np.dtype[Any]] = {
        "BOOL": np.dtype(np.bool_),
        "INT32": np.dtype("<i4"),
        "FP32": np.dtype("<f4"),
    }
    return bytes(np.ascontiguousarray(array, dtype=dtypes[datatype]).tobytes())


def model_metadata(model: LoadedModel, versions: Sequence[int]) -> v2.ModelMetadataResponse:
    config = model.config
    response = v2.ModelMetadataResponse(
        name=config.name, versions=[str(v) for v in versions], platform=PLATFORM
    )
    for name, datatype, shape in _inputs():
        response.inputs.add(name=name, datatype=datatype, shape=list(shape))
    for tensor in _outputs(config):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[-1, *tensor.shape])
    for key, text in mapping_parameters(model).items():
        response.parameters[key].string_param = text
    return response


def model_config(model: LoadedModel) -> v2.ModelConfigResponse:
    """Triton's view of the model: per-item dims, the batch dimension in max_batch_size."""
    config = model.config
    data_types = {
        "BYTES": v2.TYPE_STRING,
        "UINT8": v2.TYPE_UINT8,
        "INT32": v2.TYPE_INT32,
        "FP32": v2.TYPE_FP32,
        "BOOL": v2.TYPE_BOOL,
    }
    triton = v2.ModelConfig(
        name=config.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.batching.max_batch_size,
    )
    triton.input.add(name=IMAGES_INPUT, data_type=v2.TYPE_STRING, dims=[1])
    triton.input.add(
        name=PIXELS_INPUT,
        data_type=v2.TYPE_UINT8,
        format=v2.ModelInput.FORMAT_NHWC,
        dims=[-1, -1, -1],
    )
    for tensor in _outputs(config):
        triton.output.add(
            name=tensor.name, data_type=data_types[tensor.datatype], dims=list(tensor.shape) or [1]
        )
    for key, text in mapping_parameters(model).items():
        triton.parameters[key].string_value = text
    return v2.ModelConfigResponse(config=triton)


def _inputs() -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return ((IMAGES_INPUT, "BYTES", (-1,)), (PIXELS_INPUT, "UINT8", (-1, -1, -1, -1)))


def _outputs(config: ModelConfig) -> tuple[OutputTensor, ...]:
    return (*serving_task(config.task).v2_outputs(config), *_COMMON_OUTPUTS)


def mapping_parameters(model: LoadedModel) -> dict[str, str]:
    """How this model's tensors map to images and predictions, in words, for metadata."""
    config = model.config
    described = {
        "task": config.task,
        "labels": json.dumps(list(config.labels)),
        f"input.{IMAGES_INPUT}": (
            "BYTES [N] (or [N, 1]): encoded images (JPEG, PNG, WEBP, BMP, GIF), in "
            "contents.bytes_contents or raw_input_contents; send this input or the other"
        ),
        f"input.{PIXELS_INPUT}": (
            "UINT8 [N, H, W, C]: raw pixels, row-major, C = 1 (grey), 3 (RGB) or 4 (RGBA)"
        ),
        "one_bad_image": (
            "the call succeeds; the image's row of 'error' says why (always returned when "
            "an image failed), its other rows are NaN, empty or false; when every image "
            "fails the call fails with the first image's status"
        ),
        "config": config.to_json(),
    }
    for name, (kind, meaning) in PARAMETERS.items():
        described[f"parameter.{name}"] = f"{kind}: {meaning}"
    for tensor in _outputs(config):
        shape = ", ".join(["N", *("*" if size < 0 else str(size) for size in tensor.shape)])
        described[f"output.{tensor.name}"] = f"{tensor.datatype} [{shape}]: {tensor.description}"
    return described
