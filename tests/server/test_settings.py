"""Server settings: flag over environment over config file over default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from visionrpc.cli import build_parser
from visionrpc.server import cli as server_cli
from visionrpc.server.settings import ServerSettings, SettingsError, field_names, load_settings


def parse_serve(*flags: str) -> ServerSettings:
    return server_cli.settings_from_args(build_parser().parse_args(["serve", *flags]), {})


def test_defaults_without_any_source() -> None:
    settings = load_settings({}, {})
    assert (settings.host, settings.port, settings.metrics_port) == ("127.0.0.1", 8001, 8002)
    assert settings.max_message_bytes == 64 * 1024 * 1024
    assert (settings.max_batch_size, settings.max_queue_delay_ms) == (16, 2.0)
    assert (settings.max_queue_size, settings.instances) == (256, 1)
    assert settings.providers == ("auto",)
    assert settings.shutdown_grace_seconds == 10.0


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(
        "port: 9001\nmax_batch_size: 4\nhost: 0.0.0.0\nlog_format: json\nmax_queue_delay_ms: 7\n"
    )
    environ = {
        "VISIONRPC_PORT": "9002",
        "VISIONRPC_MAX_QUEUE_DELAY_MS": "3.5",
        "VISIONRPC_PROVIDERS": "CPUExecutionProvider",
    }
    flags = build_parser().parse_args(["serve", "--config", str(config), "--port", "9003"])
    settings = server_cli.settings_from_args(flags, environ)
    assert settings.port == 9003  # flag
    assert settings.max_queue_delay_ms == 3.5  # environment over file
    assert settings.providers == ("CPUExecutionProvider",)  # environment
    assert (settings.max_batch_size, settings.host, settings.log_format) == (4, "0.0.0.0", "json")
    assert settings.metrics_port == 8002  # default


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "server.json"
    config.write_text('{"repository": "/srv/models", "providers": ["A", "B"], "instances": 2}')
    settings = load_settings({}, {"VISIONRPC_CONFIG": str(config)})
    assert settings.repository == Path("/srv/models")
    assert settings.providers == ("A", "B")
    assert settings.instances == 2


def test_every_setting_has_a_flag() -> None:
    settings = parse_serve(
        *(f"--{name.replace('_', '-')}={value}" for name, value in SAMPLE_VALUES.items())
    )
    assert {name: getattr(settings, name) for name in SAMPLE_VALUES} == {
        **SAMPLE_VALUES,
        "repository": Path("/m"),
        "providers": ("CPUExecutionProvider", "X"),
        "tls_cert": Path("/tls/cert.pem"),
        "tls_key": Path("/tls/key.pem"),
        "tls_client_ca": Path("/tls/ca.pem"),
        "auth_token_file": Path("/run/token"),
        "load_model": ("pets",),
        "model_control_token_file": Path("/run/control-token"),
    }
    # The bearer tokens alone have no flag: they would show in `ps`.
    assert set(SAMPLE_VALUES) == set(field_names()) - {"auth_token", "model_control_token"}


def test_load_model_flags_add_up() -> None:
    settings = parse_serve(
        "--model-control", "explicit", "--load-model", "pets", "--load-model", "voc,biwi"
    )
    assert settings.load_model == ("pets", "voc", "biwi")
    assert ServerSettings().model_control == "none"
    assert ServerSettings().model_control_api == "off"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model_control": "sometimes"}, "model_control must be one of none, poll, explicit"),
        ({"poll_interval_seconds": 0.0}, "poll_interval_seconds must be positive"),
        ({"load_model": ("pets",)}, "load_model needs model_control explicit"),
        ({"model_control_api": "yes"}, "model_control_api must be on or off"),
        (
            {"model_control_api": "on", "auth_token": "inference"},
            "model_control_api needs its own token",
        ),
    ],
)
def test_model_control_settings_that_cannot_work_are_refused(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        ServerSettings(**values)


SAMPLE_VALUES: dict[str, object] = {
    "repository": "/m",
    "host": "::",
    "port": 1,
    "tls_cert": "/tls/cert.pem",
    "tls_key": "/tls/key.pem",
    "tls_client_ca": "/tls/ca.pem",
    "auth_token_file": "/run/token",
    "metrics_port": 0,
    "max_message_bytes": 1000,
    "max_batch_size": 2,
    "max_queue_delay_ms": 0.5,
    "max_queue_size": 3,
    "instances": 4,
    "intra_op_threads": 5,
    "inter_op_threads": 6,
    "intra_op_spinning": "off",
    "cpu_lanes": "off",
    "decode_niceness": 2,
    "model_niceness": 3,
    "providers": "CPUExecutionProvider,X",
    "max_image_bytes": 7,
    "max_image_pixels": 8,
    "preprocess_workers": 9,
    "stream_max_in_flight": 10,
    "decode_backlog_bytes": 1 << 20,
    "malloc_mmap_threshold_bytes": 1 << 21,
    "malloc_trim_threshold_bytes": 0,
    "malloc_idle_trim_seconds": 0.0,
    "max_images_per_request": 8,
    "shutdown_grace_seconds": 1.5,
    "max_connection_idle_seconds": 11.5,
    "max_connection_age_seconds": 12.0,
    "max_connection_age_grace_seconds": 13.0,
    "keepalive_time_seconds": 14.0,
    "keepalive_timeout_seconds": 15.0,
    "keepalive_min_ping_interval_seconds": 16.0,
    "keepalive_permit_without_calls": "on",
    "max_concurrent_streams": 17,
    "log_level": "DEBUG",
    "log_format": "json",
    "model_control": "explicit",
    "poll_interval_seconds": 2.5,
    "load_model": "pets",
    "model_control_api": "on",
    "model_control_token_file": "/run/control-token",
}


def test_connection_settings_become_grpc_server_options() -> None:
    settings = load_settings(
        {"keepalive_permit_without_calls": "on"},
        {
            "VISIONRPC_MAX_CONNECTION_IDLE_SECONDS": "0.5",
            "VISIONRPC_MAX_CONNECTION_AGE_SECONDS": "600",
            "VISIONRPC_MAX_CONNECTION_AGE_GRACE_SECONDS": "20",
            "VISIONRPC_MAX_CONCURRENT_STREAMS": "100",
        },
    )
    assert dict(settings.connection_options()) == {
        "grpc.max_connection_idle_ms": 500,
        "grpc.max_connection_age_ms": 600_000,
        "grpc.max_connection_age_grace_ms": 20_000,
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.http2.ping_timeout_ms": 20_000,
        "grpc.http2.min_ping_interval_without_data_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.max_concurrent_streams": 100,
    }


def test_a_connection_limit_at_zero_is_left_to_grpc() -> None:
    options = dict(
        ServerSettings(
            max_connection_idle_seconds=0, max_connection_age_seconds=0, keepalive_time_seconds=0
        ).connection_options()
    )
    for off in (
        "grpc.max_connection_idle_ms",
        "grpc.max_connection_age_ms",
        "grpc.max_connection_age_grace_ms",
        "grpc.keepalive_time_ms",
    ):
        assert off not in options
    assert options["grpc.keepalive_permit_without_calls"] == 0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VISIONRPC_MAX_CONNECTION_IDLE_SECONDS": "-1"}, "max_connection_idle_seconds"),
        ({"VISIONRPC_KEEPALIVE_TIMEOUT_SECONDS": "0"}, "keepalive_timeout_seconds"),
        ({"VISIONRPC_KEEPALIVE_PERMIT_WITHOUT_CALLS": "yes"}, "must be on or off"),
        ({"VISIONRPC_MAX_CONCURRENT_STREAMS": "0"}, "max_concurrent_streams"),
        ({"VISIONRPC_PORT": "eighty"}, "VISIONRPC_PORT"),
        ({"VISIONRPC_MAX_BATCH_SIZE": "0"}, "max_batch_size must be at least 1"),
        ({"VISIONRPC_LOG_FORMAT": "xml"}, "log_format"),
        ({"VISIONRPC_LOG_LEVEL": "LOUD"}, "log_level"),
        (
            {"VISIONRPC_MALLOC_MMAP_THRESHOLD_BYTES": str(64 << 20)},
            "malloc_mmap_threshold_bytes must be at most 33554432",
        ),
        ({"VISIONRPC_MALLOC_TRIM_THRESHOLD_BYTES": "-1"}, "must not be negative"),
        ({"VISIONRPC_MALLOC_IDLE_TRIM_SECONDS": "-2"}, "malloc_idle_trim_seconds must be >= 0"),
    ],
)
def test_bad_values_are_refused_naming_their_source(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({}, environ)


def test_an_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 1\nbatch_size: 4\n")
    with pytest.raises(SettingsError, match=r"unknown setting.*batch_size"):
        load_settings({}, {}, config)
