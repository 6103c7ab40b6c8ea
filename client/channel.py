"""Connection settings shared by both clients: retries, TLS, and the gRPC channel options.

Retries are gRPC's own (a ``retryPolicy`` in the channel's service config), so they
also apply to calls made by other code on the same channel, stay inside each call's
deadline, and never repeat a stream once the server has answered part of it. gRPC
obeys the server's ``grpc-retry-pushback-ms`` hint (the visionrpc server sends it with
RESOURCE_EXHAUSTED and while it loads) in place of its own backoff, and the config's
``retryThrottling`` stops retrying while most calls on the channel fail, so retries
cannot multiply an overload.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import grpc

from .errors import invalid_input

SERVICE_NAME = "visionrpc.v1.InferenceService"
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"

LoadBalancing = Literal["pick_first", "round_robin"]

# Only failures that mean "not now" are worth repeating; anything else would fail again.
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
# gRPC silently caps maxAttempts at 5 and rejects a retry policy with fewer than 2.
_MAX_ATTEMPTS_RANGE = range(2, 6)
_FIRST_RECONNECT_MS = 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retry UNAVAILABLE and RESOURCE_EXHAUSTED with exponential backoff.

    Attempt n (n >= 2) waits a random time in ``[0, min(initial_backoff *
    backoff_multiplier**(n-2), max_backoff)]`` seconds, as gRPC's retry design says.
    ``max_attempts`` counts the first try and is between 2 and 5 (gRPC's cap).
    While retries are on, the channel reconnects to a server that went away after
    0.1 s, then backs off up to ``max_backoff``, so a restarted server is found again
    within the retry budget.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0
    # gRPC's retry throttling, per channel: each retryable failure takes a token, each
    # success gives back ``throttle_token_ratio``; below half of ``throttle_max_tokens``
    # no call is retried. 100 lets a burst of refusals (a restart, a short overload) be
    # retried, yet stops retries once failures outnumber successes ten to one.
    throttle_max_tokens: int = 100
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts not in _MAX_ATTEMPTS_RANGE:
            raise ValueError(f"max_attempts must be between 2 and 5, got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 < initial_backoff <= max_backoff")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be at least 1")
        # gRPC refuses a service config outside these.
        if not 0 < self.throttle_max_tokens <= 1000:
            raise ValueError("throttle_max_tokens must be between 1 and 1000")
        if not self.throttle_token_ratio > 0:
            raise ValueError("throttle_token_ratio must be positive")

    def to_service_config(self) -> dict[str, Any]:
        """The ``retryPolicy`` object of a gRPC service config."""
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
        }

    def to_throttling_config(self) -> dict[str, Any]:
        """The ``retryThrottling`` object of a gRPC service config."""
        return {
            "maxTokens": self.throttle_max_tokens,
            "tokenRatio": round(self.throttle_token_ratio, 3),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """TLS for the channel; PEM bytes throughout.

    ``root_certificates`` is the CA bundle that signed the server's certificate
    (None: the system's roots). Give ``certificate_chain`` and ``private_key``
    together for mutual TLS. ``server_name`` overrides the name checked against the
    server's certificate (when connecting by IP to a certificate issued for a name).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise invalid_input("TLS: certificate_chain and private_key go together (mutual TLS)")
        # gRPC only fails at connection time, as "unavailable"; a wrong file is the
        # caller's mistake and can be named now.
        _check_pem("root_certificates", self.root_certificates, b"CERTIFICATE-----")
        _check_pem("certificate_chain", self.certificate_chain, b"CERTIFICATE-----")
        _check_pem("private_key", self.private_key, b"PRIVATE KEY-----")

    def credentials(self) -> grpc.ChannelCredentials:
        """The gRPC channel credentials for these settings."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def _check_pem(name: str, data: bytes | None, label_end: bytes) -> None:
    if data is None:
        return
    if not isinstance(data, bytes):
        raise invalid_input(f"TLS: {name} must be PEM bytes, got {type(data).__name__}")
    if b"-----BEGIN " not in data or label_end not in data:
        kind = "private key" if label_end.startswith(b"PRIVATE") else "certificate"
        raise invalid_input(
            f"TLS: {name} is not a PEM {kind} (no '-----BEGIN ...{label_end.decode()}' line); "
            "convert DER files with openssl"
        )


def service_config(retries: RetryPolicy | None, load_balancing: LoadBalancing) -> str:
    """The channel's service config as JSON: load balancing and the retry policy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if retries is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}, {"service": HEALTH_SERVICE_NAME}],
                "retryPolicy": retries.to_service_config(),
            }
        ]
        config["retryThrottling"] = retries.to_throttling_config()
    return json.dumps(config)


def channel_options(
    *,
    retries: RetryPolicy | None,
    tls: TLSConfig | None,
    max_message_bytes: int,
    keepalive_seconds: float | None,
    load_balancing: LoadBalancing,
) -> list[tuple[str, Any]]:
    """The options both clients pass when they open their one channel."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retries, load_balancing)),
        ("grpc.enable_retries", 1 if retries is not None else 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if retries is not None:
        # gRPC's default reconnect backoff starts at 1 s and grows to 120 s, and a retry
        # that lands while the channel waits to reconnect fails at once without reaching
        # any server. Reconnecting soon, then no more often than the retry backoff, finds
        # a restarted server within the retry budget without hammering a dead one.
        options += [
            ("grpc.initial_reconnect_backoff_ms", _FIRST_RECONNECT_MS),
            ("grpc.min_reconnect_backoff_ms", _FIRST_RECONNECT_MS),
            ("grpc.max_reconnect_backoff_ms", int(retries.max_backoff * 1000)),
        ]
    if keepalive_seconds is not None:
        # Pings only while calls are open: servers answer idle pings more often than
        # every 5 minutes (gRPC's default policy) by closing the connection.
        options.append(("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)))
    if tls is not None and tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options
