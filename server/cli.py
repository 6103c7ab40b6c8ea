"""``visionrpc serve``: flags for every server setting, then the server until SIGTERM.

Every setting also reads ``VISIONRPC_<NAME>`` and the ``--config`` file (YAML or
JSON); a flag wins over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import ServerSettings

# Flag help; the flag names are the settings' field names with dashes.
_SETTING_HELP = {
    "repository": "model repository folder (<model>/config.json + <model>/<version>/model.onnx)",
    "host": "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    "port": "gRPC port (default 8001)",
    "tls_cert": "PEM certificate chain; with --tls-key the port speaks TLS",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA certificates; clients must present a certificate they signed",
    "auth_token_file": "file holding the bearer token the Inference service requires "
    "(or VISIONRPC_AUTH_TOKEN); health and reflection stay open",
    "metrics_port": "Prometheus /metrics port, 0 = off (default 8002)",
    "max_message_bytes": "largest gRPC message, each way (default 64 MiB)",
    "max_batch_size": "default largest batch (default 16)",
    "max_queue_delay_ms": "default wait for a batch to fill (default 2.0)",
    "max_queue_size": "default queued inputs per model before RESOURCE_EXHAUSTED (default 256)",
    "instances": "default concurrent runs per model (default 1)",
    "intra_op_threads": "onnxruntime intra-op threads, 0 = the CPUs this process may use "
    "(affinity and cgroup quota)",
    "inter_op_threads": "onnxruntime inter-op threads, 0 = its default",
    "intra_op_spinning": "on (default) or off: idle onnxruntime threads busy-wait for work; "
    "off is faster when decoding large photos is most of the work",
    "cpu_lanes": "on (default) or off: on CPU, also one single-thread session per intra-op "
    "thread, which run batches side by side under load; a lone request runs on all threads",
    "decode_niceness": "nice steps below the event loop for the decode threads "
    "(default 5, 0 = equal)",
    "model_niceness": "nice steps below the event loop for the model's threads, its runs and "
    "onnxruntime's pool (default 10, 0 = equal)",
    "providers": "auto (CUDA then CPU) or a comma-separated provider list",
    "max_image_bytes": "largest encoded image (default 32 MiB)",
    "max_image_pixels": "largest image in pixels (default 40 million)",
    "preprocess_workers": "image decoding threads, 0 = half the CPUs this process may use",
    "decode_backlog_bytes": "encoded bytes of the images waiting to be decoded before "
    "RESOURCE_EXHAUSTED (default 128 MiB)",
    "malloc_mmap_threshold_bytes": "glibc: blocks this large get their own mapping, returned "
    "when freed (default 8 MiB, at most 32 MiB; 0 = glibc's dynamic default)",
    "malloc_trim_threshold_bytes": "glibc: free heap kept for reuse instead of returned to the "
    "OS (default 32 MiB; 0 = glibc's default)",
    "malloc_idle_trim_seconds": "glibc: after traffic, this long with no call in flight hands "
    "the heaps' free memory back to the OS (default 2; 0 = never)",
    "max_images_per_request": "most images in one request (default 64; lower for a model "
    "whose queue cannot hold that many with TTA); more is INVALID_ARGUMENT",
    "stream_max_in_flight": "PredictStream requests worked on at once per stream (default 64)",
    "shutdown_grace_seconds": "time in-flight calls get to finish after SIGTERM (default 10)",
    "max_connection_idle_seconds": "close a connection with no call open this long, 0 = never "
    "(default 300)",
    "max_connection_age_seconds": "ask every connection to reconnect after this long, so clients "
    "rebalance over replicas, 0 = never (default 1800)",
    "max_connection_age_grace_seconds": "time the calls of an aged connection get (default 60)",
    "keepalive_time_seconds": "ping a quiet connection this often to find vanished peers, "
    "0 = never (default 60)",
    "keepalive_timeout_seconds": "close a connection whose ping is not answered in this long "
    "(default 20)",
    "keepalive_min_ping_interval_seconds": "shortest interval between a client's pings before "
    "it is sent away (default 10)",
    "keepalive_permit_without_calls": "off (default) or on: accept client pings on a "
    "connection with no call open",
    "max_concurrent_streams": "calls one connection may have open at once (default 1024)",
    "model_control": "none (read the repository once), poll (rescan it) or explicit "
    "(load what the admin API asks for); default none",
    "poll_interval_seconds": "poll: seconds between repository rescans (default 5)",
    "load_model": "explicit: a model to load at start-up (repeatable, or comma-separated; "
    "* for all)",
    "model_control_api": "on to serve visionrpc.v1.ModelControlService (load, unload, "
    "reload, repository index); default off",
    "model_control_token_file": "file holding the bearer token the model-control API requires "
    "(or VISIONRPC_MODEL_CONTROL_TOKEN); needed when auth is on",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    "log_format": "text or json (default text)",
}


# Flags that may be given more than once; their values add up.
_REPEATABLE = frozenset({"load_model"})


def register(subcommands: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve`` to the ``visionrpc`` parser."""
    parser = subcommands.add_parser(
        "serve",
        help="serve a model repository over gRPC",
        description="Serve a model repository over gRPC until SIGTERM or SIGINT.",
        # Otherwise "--auth-token SECRET" would pass as --auth-token-file, the secret a path.
        allow_abbrev=False,
        epilog="Every flag can also come from VISIONRPC_<NAME> (e.g. VISIONRPC_MAX_BATCH_SIZE) "
        "or from the --config file (keys are the names with underscores); a flag wins over "
        "the environment, which wins over the file. The bearer token has no flag, which would "
        "show it in ps: use VISIONRPC_AUTH_TOKEN, the file's auth_token, or --auth-token-file.",
    )
    parser.add_argument("--config", type=Path, help="settings file, YAML or JSON")
    for name, help_text in _SETTING_HELP.items():
        # SUPPRESS keeps flags that were not given out of the namespace, so the
        # environment and the config file can fill them.
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            action="append" if name in _REPEATABLE else "store",
            help=help_text,
        )
    parser.set_defaults(handler=run_serve)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerSettings:
    from .settings import load_settings

    given = {name: getattr(args, name) for name in _SETTING_HELP if hasattr(args, name)}
    if "load_model" in given:
        given["load_model"] = ",".join(given["load_model"])
    return load_settings(given, environ, args.config)


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .app import serve
    from .logging_setup import configure_logging
    from .memory import tune_malloc
    from .settings import SettingsError

    try:
        settings = settings_from_args(args, os.environ)
    except SettingsError as exc:
        print(f"visionrpc serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "json" if settings.log_format == "json" else "text")
    # Before any image buffer is allocated.
    tune_malloc(settings.malloc_mmap_threshold_bytes, settings.malloc_trim_threshold_bytes)
    try:
        return asyncio.run(serve(settings))
    except SettingsError as exc:  # an unreadable TLS or token file
        print(f"visionrpc serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the repository is missing, or the port is taken
        logging.getLogger("visionrpc.server").error("cannot serve: %s", exc)
        return 1
