"""A real Prometheus scrapes a real server's ``/metrics`` after known gRPC traffic, and its
HTTP API reports exactly the requests, images and histogram counts that were sent."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.helpers.onnx_models import (
    config_dict,
    write_channel_mean_classifier,
    write_channel_mean_multilabel,
    write_corrupt_onnx,
)
from tests.helpers.prometheus import SCRAPE_JOB, PrometheusServer, require_binary
from tests.helpers.server import server_in_thread
from tests.server.support import encoded_request, png, solid
from visionrpc.protos import inference_pb2 as pb
from visionrpc.protos import inference_pb2_grpc as pb_grpc

RED = png(solid(255, 0, 0))
GREY = png(solid(128, 128, 128))
BLACK = png(solid(0, 0, 0))


def send_known_traffic(stub: pb_grpc.InferenceServiceStub) -> None:
    for _ in range(5):
        stub.Predict(encoded_request("colors", RED, GREY), timeout=30)
    stub.Predict(encoded_request("colors", RED, b"not an image"), timeout=30)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as missing:
            stub.Predict(encoded_request("nope", RED), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    stub.Predict(encoded_request("channels", BLACK, RED), timeout=30)
    streamed = [encoded_request("colors", RED, request_id=str(n)) for n in range(3)]
    assert len(list(stub.PredictStream(iter(streamed), timeout=30))) == 3
    stub.ListModels(pb.ListModelsRequest(), timeout=30)


HEALTH_CHECK = 'grpc_method="Check",grpc_service="grpc.health.v1.Health"'


def grpc_method(method: str, **labels: str) -> str:
    pairs = "".join(f',{name}="{value}"' for name, value in labels.items())
    return f'grpc_method="{method}"{pairs}'


def test_prometheus_stores_exactly_the_traffic_sent_through_grpc(tmp_path: Path) -> None:
    require_binary("prometheus")
    root = tmp_path / "models"
    write_channel_mean_classifier(root, "colors")
    write_channel_mean_multilabel(root, "channels", threshold=0.5)
    write_corrupt_onnx(root, config_dict("broken", "classification", ("a", "b", "c"), 8))
    with server_in_thread(root, metrics=True) as server:
        with grpc.insecure_channel(server.address) as channel:
            send_known_traffic(pb_grpc.InferenceServiceStub(channel))
        target = f"127.0.0.1:{server.metrics_port}"
        with PrometheusServer(targets=[target]) as prometheus:
            prometheus.wait_for(f'up{{job="{SCRAPE_JOB}"}}', lambda up: up == 1.0)
            colors = 'model="colors",version="1"'
            expected = {
                f'visionrpc_requests_total{{{colors},code="OK"}}': 9.0,
                f'visionrpc_images_total{{{colors},code="OK"}}': 14.0,
                f'visionrpc_images_total{{{colors},code="INVALID_ARGUMENT"}}': 1.0,
                'visionrpc_requests_total{model="_unknown",code="NOT_FOUND"}': 2.0,
                'visionrpc_images_total{model="_unknown",code="NOT_FOUND"}': 2.0,
                'visionrpc_requests_total{model="channels",code="OK"}': 1.0,
                "sum(visionrpc_requests_total)": 12.0,
                f'visionrpc_request_duration_seconds_count{{{colors},code="OK"}}': 9.0,
                f"grpc_server_started_total{{{grpc_method('Predict')}}}": 9.0,
                f"grpc_server_handled_total{{{grpc_method('Predict', grpc_code='OK')}}}": 7.0,
                f"grpc_server_handled_total{{{grpc_method('Predict', grpc_code='NOT_FOUND')}}}": (
                    2.0
                ),
                f"grpc_server_handling_seconds_count{{{grpc_method('Predict')}}}": 9.0,
                f"grpc_server_msg_received_total{{{grpc_method('Predict')}}}": 9.0,
                f"grpc_server_msg_sent_total{{{grpc_method('Predict')}}}": 7.0,
                f"grpc_server_handled_total{{{grpc_method('PredictStream', grpc_code='OK')}}}": (
                    1.0
                ),
                f"grpc_server_msg_received_total{{{grpc_method('PredictStream')}}}": 3.0,
                f"grpc_server_msg_sent_total{{{grpc_method('PredictStream')}}}": 3.0,
                f"grpc_server_handled_total{{{grpc_method('ListModels', grpc_code='OK')}}}": 1.0,
                # The health service's series exist before its first call.
                f"grpc_server_started_total{{{HEALTH_CHECK}}}": 0.0,
                'visionrpc_preprocess_seconds_count{model="colors"}': 14.0,
                f"visionrpc_queue_wait_seconds_count{{{colors}}}": 14.0,
                f"visionrpc_batch_size_sum{{{colors}}}": 14.0,
                f"visionrpc_top1_confidence_count{{{colors}}}": 14.0,
                f'visionrpc_top1_confidence_bucket{{{colors},le="0.4"}}': 5.0,
                f"visionrpc_inference_batch_seconds_count{{{colors}}}"
                f" - visionrpc_batch_size_count{{{colors}}}": 0.0,
                'visionrpc_multilabel_labels_per_image_count{model="channels"}': 2.0,
                'visionrpc_multilabel_empty_results_total{model="channels"}': 1.0,
                'visionrpc_model_info{model="colors",task="classification"}': 1.0,
                'visionrpc_model_load_failures_total{model="broken"}': 1.0,
                'visionrpc_in_flight_requests{model="colors"}': 0.0,
                f"visionrpc_queue_depth{{{colors}}}": 0.0,
                f"visionrpc_queue_capacity{{{colors}}}": 256.0,
                f'count(process_cpu_seconds_total{{job="{SCRAPE_JOB}"}})': 1.0,
            }
            actual = {expr: prometheus.value(expr) for expr in expected}
    assert actual == expected
