"""Server settings: one dataclass, filled from flags, environment, a config file, defaults.

Precedence, highest first: a command-line flag, the environment variable
``VISIONRPC_<FIELD>`` (e.g. ``VISIONRPC_MAX_BATCH_SIZE``), the config file given by
``--config`` / ``VISIONRPC_CONFIG`` (YAML or JSON, keys are field names), then the
default below. ``host`` defaults to loopback so a bare ``visionrpc serve`` is never
exposed by accident; the container sets ``VISIONRPC_HOST=0.0.0.0``.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .batching import BatchSettings
from .memory import (
    IDLE_TRIM_SECONDS,
    MMAP_THRESHOLD_BYTES,
    MMAP_THRESHOLD_MAX,
    TRIM_THRESHOLD_BYTES,
)

ENV_PREFIX = "VISIONRPC_"
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
SWITCHES = ("on", "off")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class ServerSettings:
    repository: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8001
    # PEM files. With both set the port speaks TLS; a client CA makes it mutual TLS,
    # where every client must present a certificate that CA signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # The bearer token the Inference service requires; health and reflection stay open
    # so orchestrators can probe without it. No flag: the secret would show in `ps`.
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: Path | None = None
    # Prometheus endpoint; 0 turns it off.
    metrics_port: int = 8002
    max_message_bytes: int = 64 * 1024 * 1024
    # Batching defaults for models whose config does not say.
    max_batch_size: int = 16
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    instances: int = 1
    # intra_op_threads and preprocess_workers 0: derived from the CPUs this process may
    # use (affinity and cgroup quota, server/cpus.py). inter_op 0 is onnxruntime's choice.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # "on" lets idle onnxruntime threads busy-wait between parallel regions, which saves
    # a thread wake-up each time; with the model's threads below the loop's and the
    # decoders' priority (model_niceness) that is faster except when decoding is most of
    # the work (phone photos), where "off" frees the waiting thread's core for decoding.
    intra_op_spinning: str = "on"
    # "on": on the CPU provider each model also gets one single-thread onnxruntime session
    # per intra-op thread. Under load those run batches side by side, so a thread that
    # loses its core to decoding or the loop stalls only its own batch, where the threads
    # of one parallel run wait for the slowest at every layer; a lone request still runs
    # on all threads. Costs a copy of the model's weights per lane.
    cpu_lanes: str = "on"
    # How many nice steps below the event loop the decode threads and the model's
    # threads (its runs and onnxruntime's pool) run: the loop's short work first, so
    # accepting, refusing and answering calls never waits behind them; then decoding,
    # which the model waits on; then the model (0 = the loop's priority).
    decode_niceness: int = 5
    model_niceness: int = 10
    # "auto" is CUDA then CPU among those available, or an explicit list of providers.
    providers: tuple[str, ...] = ("auto",)
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Threads that decode and resize images.
    preprocess_workers: int = 0
    # Encoded bytes of the images waiting for or in a decode thread, over all requests.
    # Beyond it requests are refused (RESOURCE_EXHAUSTED) before decoding: it bounds the
    # memory that waiting requests hold (see the README's pod sizing).
    decode_backlog_bytes: int = 128 * 1024 * 1024
    # glibc's malloc (server/memory.py): blocks this large or larger get their own mapping,
    # returned when freed (Pillow's 16 MiB image blocks); smaller ones (requests up to
    # phone photos) come from heaps that keep up to malloc_trim_threshold_bytes free for
    # the next request instead of faulting fresh pages in. 0 leaves a knob to glibc.
    malloc_mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES
    malloc_trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES
    # After traffic, this long with no call in flight hands the heaps' free memory back to
    # the OS (glibc's malloc_trim), where more than the heaps may keep has piled up. 0: never.
    malloc_idle_trim_seconds: float = IDLE_TRIM_SECONDS
    # The most images one Predict request (or one request of a stream) may carry; a
    # model whose queue cannot hold that many with all its TTA views gets a lower limit
    # (GetModelInfo's max_images_per_request). More is INVALID_ARGUMENT.
    max_images_per_request: int = 64
    # PredictStream: requests of one stream that are worked on at once.
    stream_max_in_flight: int = 64
    shutdown_grace_seconds: float = 10.0
    # Connection hygiene; 0 turns a limit off. A connection with no call open for
    # max_connection_idle_seconds is closed. Every connection is asked to go (GOAWAY)
    # after max_connection_age_seconds (gRPC adds up to 10% jitter), so clients behind a
    # Kubernetes Service reconnect and spread over new replicas; its open calls then get
    # max_connection_age_grace_seconds before it is closed.
    max_connection_idle_seconds: float = 300.0
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 60.0
    # The server pings a quiet connection every keepalive_time_seconds and closes it when
    # no answer comes within keepalive_timeout_seconds: a peer that vanished (a half-open
    # socket) is found instead of holding a stream forever.
    keepalive_time_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    # Keepalive enforcement: a client pinging more often than this, or pinging while it
    # has no call open when keepalive_permit_without_calls is off, is sent away (GOAWAY
    # too_many_pings) after two such pings.
    keepalive_min_ping_interval_seconds: float = 10.0
    keepalive_permit_without_calls: str = "off"
    # Calls one connection may have open at once; more wait in the client for a free one.
    max_concurrent_streams: int = 1024
    # Model control (see visionrpc.server.model_manager): none reads the repository once,
    # poll rescans it every poll_interval_seconds, explicit loads what the admin API asks
    # for, starting with load_model ("*" for every model).
    model_control: str = "none"
    poll_interval_seconds: float = 5.0
    load_model: tuple[str, ...] = ()
    # The visionrpc.v1.ModelControlService admin API; off unless asked for. With auth on,
    # it requires its own token, so an inference token cannot unload models.
    model_control_api: str = "off"
    model_control_token: str | None = field(default=None, repr=False)
    model_control_token_file: Path | None = None
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if self.intra_op_spinning not in SWITCHES:
            raise SettingsError("intra_op_spinning must be on or off")
        if self.cpu_lanes not in SWITCHES:
            raise SettingsError("cpu_lanes must be on or off")
        if self.keepalive_permit_without_calls not in SWITCHES:
            raise SettingsError("keepalive_permit_without_calls must be on or off")
        for name in _OFF_AT_ZERO_SECONDS:
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0 (0 turns it off)")
        if self.keepalive_timeout_seconds <= 0:
            raise SettingsError("keepalive_timeout_seconds must be positive")
        if self.max_concurrent_streams < 1:
            raise SettingsError("max_concurrent_streams must be at least 1")
        for name in (
            "max_batch_size",
            "max_queue_size",
            "instances",
            "stream_max_in_flight",
            "max_images_per_request",
            "decode_backlog_bytes",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        for name in (
            "port",
            "metrics_port",
            "intra_op_threads",
            "inter_op_threads",
            "preprocess_workers",
            "decode_niceness",
            "model_niceness",
            "malloc_mmap_threshold_bytes",
            "malloc_trim_threshold_bytes",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")
        if self.malloc_mmap_threshold_bytes > MMAP_THRESHOLD_MAX:
            raise SettingsError(
                f"malloc_mmap_threshold_bytes must be at most {MMAP_THRESHOLD_MAX} (glibc's limit)"
            )
        if self.max_queue_delay_ms < 0 or self.shutdown_grace_seconds < 0:
            raise SettingsError("max_queue_delay_ms and shutdown_grace_seconds must be >= 0")
        if not self.providers:
            raise SettingsError("providers must name at least one provider, or auto")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key go together: set both for TLS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("tls_client_ca needs tls_cert and tls_key as well")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise SettingsError("set auth_token or auth_token_file, not both")
        if self.auth_token is not None:
            _check_token(self.auth_token, "auth_token")
        if self.model_control not in MODEL_CONTROL_MODES:
            raise SettingsError(f"model_control must be one of {', '.join(MODEL_CONTROL_MODES)}")
        if not self.poll_interval_seconds > 0:
            raise SettingsError("poll_interval_seconds must be positive")
        if self.load_model and self.model_control != "explicit":
            raise SettingsError("load_model needs model_control explicit (the others load all)")
        if self.model_control_token is not None and self.model_control_token_file is not None:
            raise SettingsError("set model_control_token or model_control_token_file, not both")
        if self.model_control_token is not None:
            _check_token(self.model_control_token, "model_control_token")
        auth_on = self.auth_token is not None or self.auth_token_file is not None
        control_token = self.model_control_token or self.model_control_token_file
        if self.model_control_api not in SWITCHES:
            raise SettingsError("model_control_api must be on or off")
        if self.model_control_api == "on" and auth_on and control_token is None:
            raise SettingsError(
                "with auth on, model_control_api needs its own token: set "
                "VISIONRPC_MODEL_CONTROL_TOKEN or model_control_token_file"
            )

    @property
    def default_batching(self) -> BatchSettings:
        return BatchSettings(
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_size=self.max_queue_size,
            instances=self.instances,
        )

    def connection_options(self) -> list[tuple[str, int]]:
        """The gRPC server options of the connection settings; a limit at 0 is left out."""
        limits = {
            "grpc.max_connection_idle_ms": self.max_connection_idle_seconds,
            "grpc.max_connection_age_ms": self.max_connection_age_seconds,
            "grpc.keepalive_time_ms": self.keepalive_time_seconds,
        }
        options = [(name, _milliseconds(seconds)) for name, seconds in limits.items() if seconds]
        if self.max_connection_age_seconds:
            grace = _milliseconds(self.max_connection_age_grace_seconds)
            options.append(("grpc.max_connection_age_grace_ms", grace))
        return [
            *options,
            ("grpc.keepalive_timeout_ms", _milliseconds(self.keepalive_timeout_seconds)),
            # gRPC core waits this long for any ping's answer, keepalive pings included:
            # without it an unanswered keepalive ping closes nothing for a minute.
            ("grpc.http2.ping_timeout_ms", _milliseconds(self.keepalive_timeout_seconds)),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                _milliseconds(self.keepalive_min_ping_interval_seconds),
            ),
            (
                "grpc.keepalive_permit_without_calls",
                int(self.keepalive_permit_without_calls == "on"),
            ),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
        ]

    def read_tls_files(self) -> TLSFiles | None:
        """The PEM files' contents, checked to be usable, or None for a plaintext port."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        client_ca = self.tls_client_ca
        files = TLSFiles(
            certificate_chain=_read_file(self.tls_cert, "tls_cert"),
            private_key=_read_file(self.tls_key, "tls_key"),
            client_ca=None if client_ca is None else _read_file(client_ca, "tls_client_ca"),
        )
        _check_tls_files(self.tls_cert, self.tls_key, client_ca)
        return files

    def read_auth_token(self) -> str | None:
        """The bearer token calls must carry, from the setting or its file; None for none."""
        if self.auth_token_file is None:
            return self.auth_token
        token = _read_file(self.auth_token_file, "auth_token_file").decode(errors="replace")
        return _check_token(token.strip(), f"auth_token_file {self.auth_token_file}")

    def read_model_control_token(self) -> str | None:
        """The bearer token the model-control API requires; None leaves it open."""
        if self.model_control_token_file is None:
            return self.model_control_token
        path = self.model_control_token_file
        token = _read_file(path, "model_control_token_file").decode(errors="replace")
        return _check_token(token.strip(), f"model_control_token_file {path}")


@dataclass(frozen=True)
class TLSFiles:
    certificate_chain: bytes
    private_key: bytes
    # Set for mutual TLS: the CA that signs the clients' certificates.
    client_ca: bytes | None


# Durations where 0 turns a limit or a task off.
_OFF_AT_ZERO_SECONDS = (
    "max_connection_idle_seconds",
    "max_connection_age_seconds",
    "max_connection_age_grace_seconds",
    "keepalive_time_seconds",
    "keepalive_min_ping_interval_seconds",
    "malloc_idle_trim_seconds",
)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds else 0


def _read_file(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc


def _check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    # grpc refuses unusable files only when binding, as "Failed to bind to address".
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A password callback, so an encrypted key fails here rather than prompting.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise SettingsError(
            f"tls_cert {cert} and tls_key {key}: not a matching PEM certificate and "
            f"unencrypted key: {exc.reason or exc}"
        ) from exc
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise SettingsError(
                f"tls_client_ca {client_ca}: not PEM CA certificates: {exc.reason or exc}"
            ) from exc


def _check_token(token: str, source: str) -> str:
    # What a client can put after "Bearer " in a gRPC metadata value: visible ASCII.
    if not token or not all("!" <= char <= "~" for char in token):
        raise SettingsError(f"{source}: the token must be non-empty visible ASCII, no spaces")
    return token


def _parse_providers(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


def _parse_path(value: Any) -> Path:
    return Path(value).expanduser()


def _optional(parser: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # An empty environment variable or file value means "not set".
    return lambda value: None if value is None or value == "" else parser(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "Path": _parse_path,
    "Path | None": _optional(_parse_path),
    "str | None": _optional(str),
    "tuple[str, ...]": _parse_providers,
}


def field_names() -> list[str]:
    return [f.name for f in fields(ServerSettings)]


def parse_value(name: str, value: Any) -> Any:
    """Convert a flag, environment or file value to the field's type."""
    field = {f.name: f for f in fields(ServerSettings)}[name]
    parser = _PARSERS[str(field.type)]
    if isinstance(value, bool) or (parser in (int, float) and isinstance(value, list | dict)):
        raise SettingsError(f"{name}: {value!r} is not a number")
    try:
        return parser(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}: cannot use {value!r}: {exc}") from exc


def load_settings(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> ServerSettings:
    """Merge the sources; ``flags`` holds only the flags that were given."""
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = {}
    if config_file is not None:
        for name, value in read_config_file(config_file).items():
            values[name] = _with_source(name, value, str(config_file))
    for name in field_names():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _with_source(name, environ[env_name], env_name)
    for name, value in flags.items():
        values[name] = _with_source(name, value, "--" + name.replace("_", "-"))
    try:
        return ServerSettings(**values)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc)) from exc


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must be a mapping of setting names to values")
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return data


def _with_source(name: str, value: Any, source: str) -> Any:
    try:
        return parse_value(name, value)
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from exc
