"""GetModelInfo reports the default top_k and the TTA zoom a model is served with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.onnx_models import write_channel_mean_classifier, write_channel_mean_multilabel
from tests.helpers.server import running_server
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[pb_grpc.InferenceServiceAsyncStub]:
    write_channel_mean_classifier(tmp_path, top_k=2, tta={"views": ["zoom_center"], "zoom": 1.4})
    write_channel_mean_multilabel(tmp_path)
    async with (
        running_server(tmp_path) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        yield pb_grpc.InferenceServiceStub(channel)


async def test_configured_top_k_and_zoom_are_reported(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="colors"))
    assert info.top_k == 2
    assert info.tta.zoom == pytest.approx(1.4)


async def test_defaults_are_reported_when_the_config_is_silent(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="channels"))
    assert info.top_k == 5
    assert info.tta.zoom == pytest.approx(1.15)


async def test_the_reported_top_k_is_what_a_request_without_options_gets(
    stub: pb_grpc.InferenceServiceAsyncStub,
) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="colors"))
    response = await stub.Predict(encoded_request("colors", png(solid(200, 30, 10))))
    assert len(response.results[0].classification.top) == info.top_k
