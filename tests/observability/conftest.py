from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.observability.traffic import exercise
from visionrpc.server.metrics import ServerMetrics


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics(CollectorRegistry())


@pytest.fixture
def exercised_exposition() -> str:
    """The text exposition of a default-built ServerMetrics after every method ran."""
    metrics = ServerMetrics()
    exercise(metrics)
    return generate_latest(metrics.registry).decode()
