"""The client's I/O-free logic: options, decoding, batching bookkeeping, channel settings."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.helpers.tls import Certificates
from visionrpc.client import (
    Classification,
    HealthStatus,
    ImageError,
    InvalidInputError,
    ModelNotFoundError,
    MultiLabel,
    Points,
    Prediction,
    RetryPolicy,
    ServerError,
    TLSConfig,
)
from visionrpc.client._core import (
    BatchPlan,
    PredictCall,
    checked_metadata,
    decode_result,
    health_request_bytes,
    health_status_from_bytes,
    model_version,
    prediction_options,
    stream_timeout,
)
from visionrpc.client.channel import channel_options, service_config
from visionrpc.protos import inference_pb2 as pb


def decode_response(response: pb.PredictResponse, first_index: int) -> list[Prediction]:
    return [
        decode_result(result, response.model, response.version, first_index + i)
        for i, result in enumerate(response.results)
    ]


def call(raise_on_error: bool = False) -> PredictCall:
    return PredictCall(
        model="m",
        version="",
        options=pb.PredictionOptions(),
        timeout=5.0,
        metadata=(),
        raise_on_error=raise_on_error,
        max_message_bytes=1000,
    )


def classification(label: str) -> pb.ImageResult:
    return pb.ImageResult(
        classification=pb.Classification(top=[pb.LabelScore(label=label, score=0.5)]),
        tta_views=1,
        original_width=4,
        original_height=3,
    )


def test_unset_options_stay_unset_so_model_defaults_apply() -> None:
    options = prediction_options(
        top_k=None,
        threshold=None,
        thresholds=None,
        min_confidence=None,
        tta=None,
        tta_views=None,
        all_scores=False,
    )
    for field in ("top_k", "threshold", "min_confidence", "tta", "tta_views"):
        assert not options.HasField(field)
    assert not options.class_thresholds


def test_given_options_are_all_set_including_falsy_values() -> None:
    options = prediction_options(
        top_k=1,
        threshold=0.0,
        thresholds={"cat": 0.25},
        min_confidence=0.0,
        tta=False,
        tta_views=1,
        all_scores=True,
    )
    for field in ("top_k", "threshold", "min_confidence", "tta", "tta_views"):
        assert options.HasField(field)
    assert dict(options.class_thresholds) == {"cat": 0.25}
    assert options.all_scores


def test_each_task_decodes_to_its_result_type_with_provenance() -> None:
    response = pb.PredictResponse(
        model="m",
        version="3",
        results=[
            classification("cat"),
            pb.ImageResult(
                multilabel=pb.MultiLabel(labels=[pb.LabelScore(label="dog", score=0.9)]),
                tta_applied=True,
                tta_views=3,
            ),
            pb.ImageResult(points=pb.PointList(points=[pb.Point(name="c", x=1.5, y=2.5)])),
            pb.ImageResult(error=pb.ErrorStatus(code=3, message="not an image")),
        ],
    )
    first, second, third, fourth = decode_response(response, 10)
    assert isinstance(first, Classification)
    assert (first.label, first.model, first.version) == ("cat", "m", "3")
    assert (first.original_width, first.original_height) == (4, 3)
    assert isinstance(second, MultiLabel)
    assert second.names == ("dog",)
    assert (second.tta_applied, second.tta_views) == (True, 3)
    assert isinstance(third, Points)
    assert (third.points[0].x, third.points[0].y) == (1.5, 2.5)
    assert isinstance(fourth, ImageError)
    assert (fourth.code, fourth.index) == ("INVALID_ARGUMENT", 13)
    assert fourth.message == "image 13: not an image"


def test_an_image_error_raises_once_with_the_callers_index_when_asked() -> None:
    plan = BatchPlan(call(raise_on_error=True), [b"a", b"b", b"c"], 2, None)
    assert len(list(plan.requests())) == 2
    plan.accept(pb.PredictResponse(request_id="0", results=[classification("a")] * 2))
    # The server numbers images within its request: "image 0" is the caller's image 2.
    bad = pb.ImageResult(error=pb.ErrorStatus(code=3, message="image 0: bad"))
    plan.accept(pb.PredictResponse(request_id="1", results=[bad]))
    with pytest.raises(InvalidInputError) as caught:
        plan.results()
    assert caught.value.index == 2
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value) == "INVALID_ARGUMENT: image 2: bad"


def test_results_are_json_serialisable_and_readable() -> None:
    response = pb.PredictResponse(
        model="pets",
        version="1",
        results=[
            classification("beagle"),
            pb.ImageResult(error=pb.ErrorStatus(code=3, message="truncated")),
        ],
    )
    result, error = decode_response(response, 0)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["type"] == "Classification"
    assert data["top"] == [{"label": "beagle", "score": 0.5, "threshold": 0.0}]
    assert "beagle 0.500" in str(result)
    assert "pets v1" in str(result)
    assert json.loads(json.dumps(error.to_dict()))["code"] == "INVALID_ARGUMENT"
    assert str(error) == "error INVALID_ARGUMENT: image 1: truncated"


def test_below_min_confidence_means_no_label() -> None:
    response = pb.PredictResponse(
        results=[
            pb.ImageResult(
                classification=pb.Classification(
                    top=[pb.LabelScore(label="cat", score=0.4)],
                    below_min_confidence=True,
                    min_confidence=0.5,
                )
            )
        ]
    )
    (result,) = decode_response(response, 0)
    assert isinstance(result, Classification)
    assert result.label is None
    assert result.score == pytest.approx(0.4)
    assert "none of the known classes" in str(result)


def test_batch_plan_restores_input_order_from_out_of_order_answers() -> None:
    images = [b"a", b"b", b"c", b"d", b"e"]
    done: list[tuple[int, int]] = []
    plan = BatchPlan(call(), images, 2, lambda count, total: done.append((count, total)))
    requests = list(plan.requests())
    assert [len(request.images) for request in requests] == [2, 2, 1]
    assert plan.request_count == 3
    labels = {0: ["a", "b"], 1: ["c", "d"], 2: ["e"]}
    for request_id in ("2", "0", "1"):
        response = pb.PredictResponse(
            request_id=request_id,
            results=[classification(label) for label in labels[int(request_id)]],
        )
        plan.accept(response)
    assert plan.finished
    ordered = plan.results()
    assert [result.label for result in ordered if isinstance(result, Classification)] == list(
        "abcde"
    )
    assert done == [(1, 5), (3, 5), (5, 5)]


def test_batch_plan_raises_the_error_of_a_failed_streamed_request() -> None:
    plan = BatchPlan(call(), [b"a"], 4, None)
    (request,) = plan.requests()
    failed = pb.PredictResponse(
        request_id=request.request_id,
        error=pb.ErrorStatus(code=grpc.StatusCode.NOT_FOUND.value[0], message="no model named 'm'"),
    )
    with pytest.raises(ModelNotFoundError, match="no model named"):
        plan.accept(failed)


def test_batch_plan_reports_images_the_server_never_answered() -> None:
    plan = BatchPlan(call(), [b"a", b"b"], 1, None)
    next(plan.requests())
    plan.accept(pb.PredictResponse(request_id="0", results=[classification("a")]))
    assert not plan.finished
    with pytest.raises(ServerError, match="1 images unanswered"):
        plan.results()


def test_stream_deadline_grants_one_timeout_per_wave_of_requests() -> None:
    assert stream_timeout(call(), request_count=10, max_in_flight=4) == 15.0
    assert stream_timeout(call(), request_count=0, max_in_flight=4) == 5.0


def test_health_messages_match_grpc_health_v1() -> None:
    request = health_pb2.HealthCheckRequest.FromString(health_request_bytes("pets"))
    assert request.service == "pets"
    for status in HealthStatus:
        answer = health_pb2.HealthCheckResponse(status=status.value).SerializeToString()
        assert health_status_from_bytes(answer) is status
    assert bool(HealthStatus.SERVING)
    assert not HealthStatus.NOT_SERVING


def test_service_config_retries_only_unavailable_and_overloaded() -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=1.0)
    config = json.loads(service_config(policy, "round_robin"))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {"service": "visionrpc.v1.InferenceService"} in method["name"]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "1.0s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert config["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert "methodConfig" not in json.loads(service_config(None, "pick_first"))


def test_channel_options_carry_limits_keepalive_and_server_name() -> None:
    options = dict(
        channel_options(
            retries=None,
            tls=TLSConfig(server_name="inference.internal"),
            max_message_bytes=1234,
            keepalive_seconds=20,
            load_balancing="pick_first",
        )
    )
    assert options["grpc.enable_retries"] == 0
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.keepalive_time_ms"] == 20000
    assert options["grpc.ssl_target_name_override"] == "inference.internal"


@pytest.mark.parametrize(
    "arguments",
    [{"max_attempts": 1}, {"max_attempts": 6}, {"initial_backoff": 0}, {"max_backoff": 0.01}],
)
def test_retry_policies_grpc_would_reject_are_refused(arguments: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


def test_client_certificate_without_key_is_refused(pki: Certificates) -> None:
    with pytest.raises(InvalidInputError, match="go together"):
        TLSConfig(certificate_chain=pki.client.certificate)


@pytest.mark.parametrize("field", ["root_certificates", "certificate_chain", "private_key"])
def test_tls_files_that_are_not_pem_are_refused_naming_the_field(
    field: str, pki: Certificates
) -> None:
    good: dict[str, bytes | None] = {
        "root_certificates": pki.ca.certificate,
        "certificate_chain": pki.client.certificate,
        "private_key": pki.client.private_key,
    }
    with pytest.raises(InvalidInputError, match=f"TLS: {field} is not a PEM"):
        TLSConfig(**{**good, field: b"\x30\x82\x01\x0a DER bytes"})  # type: ignore[arg-type]


def test_an_image_over_the_message_limit_fails_alone_and_big_groups_are_split() -> None:
    images = [b"x" * 1200, b"y" * 600, b"z" * 600, b"w" * 10]
    plan = BatchPlan(call(), images, 4, None)
    requests = list(plan.requests())
    # 1000 bytes hold "y" or "z" with "w", not both: three images in two requests.
    assert [[image.encoded[:1] for image in r.images] for r in requests] == [
        [b"y"],
        [b"z", b"w"],
    ]
    for request in requests:
        plan.accept(
            pb.PredictResponse(
                request_id=request.request_id,
                results=[classification("ok") for _ in request.images],
            )
        )
    too_big, *answered = plan.results()
    assert isinstance(too_big, ImageError)
    assert too_big.index == 0
    assert "over max_message_bytes=1000" in too_big.message
    assert all(isinstance(result, Classification) for result in answered)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"top_k": -1}, "top_k must be between 1"),
        ({"top_k": 10**10}, "top_k must be between 1"),
        ({"top_k": 2.5}, "top_k must be a whole number"),
        ({"top_k": True}, "top_k must be a whole number"),
        ({"tta_views": -1}, "tta_views must be between 1"),
        ({"tta_views": "flip"}, "tta_views must be a whole number"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"threshold": float("nan")}, "threshold must be in"),
        ({"threshold": "0.5"}, "threshold must be a number"),
        ({"min_confidence": -0.1}, "min_confidence must be in"),
        ({"thresholds": {"cat": 2}}, r"thresholds\['cat'\] must be in"),
        ({"thresholds": {1: 0.5}}, "labels must be str"),
        ({"tta": 1}, "tta must be True or False"),
        ({"all_scores": "yes"}, "all_scores must be True or False"),
    ],
)
def test_bad_option_values_and_types_are_invalid_input_naming_the_option(
    options: dict[str, object], named: str
) -> None:
    arguments: dict[str, object] = {
        "top_k": None,
        "threshold": None,
        "thresholds": None,
        "min_confidence": None,
        "tta": None,
        "tta_views": None,
        "all_scores": False,
    }
    with pytest.raises(InvalidInputError, match=named):
        prediction_options(**{**arguments, **options})  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, -1, "v2", "latest", 1.0, True])
def test_a_version_that_is_no_version_number_is_invalid_input(version: object) -> None:
    with pytest.raises(InvalidInputError, match="version must be a version number"):
        model_version(version)  # type: ignore[arg-type]


def test_versions_may_be_given_as_numbers() -> None:
    assert (model_version(None), model_version(3), model_version("12")) == ("", "3", "12")


def test_metadata_over_the_servers_header_limit_is_refused_before_sending() -> None:
    checked_metadata((("x-small", "a" * 100),))
    with pytest.raises(InvalidInputError, match="metadata is 20"):
        checked_metadata((("x-big", "a" * 20_000),))
