"""The serving task registry: one module per task the config schema accepts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from visionrpc.server.model_config import TASKS, InputSpec, ModelConfig
from visionrpc.server.postprocess import PredictionOptions, finish, resolve_options
from visionrpc.server.preprocess import Geometry
from visionrpc.server.tasks import serving_task


def test_every_configurable_task_has_a_serving_module_of_that_name() -> None:
    for name in TASKS:
        assert name == serving_task(name).NAME


@pytest.mark.parametrize(
    ("task", "width"), [("classification", 3), ("multilabel", 3), ("points", 6)]
)
def test_each_task_states_the_model_output_it_expects(task: str, width: int) -> None:
    config = ModelConfig("m", task, ("a", "b", "c"), InputSpec(8, 8))
    assert serving_task(task).output_width(config) == width
    resolved = resolve_options(config, PredictionOptions())
    geometry = Geometry(8, 8, 1.0, 0.0, 1.0, 0.0, 8, 8)
    with pytest.raises(ValueError, match="returned shape"):
        finish(config, resolved, np.zeros((1, width + 1), np.float32), [geometry])


def test_the_config_schema_imports_neither_preprocessing_nor_the_tasks() -> None:
    # model_config is the shared contract: importing it alone must not pull in the modules
    # that import it (that was an import cycle with preprocess).
    code = (
        "import json, sys\n"
        "import visionrpc.server.model_config\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('visionrpc.server.')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "visionrpc.server.preprocess" not in loaded
    assert "visionrpc.server.tasks" not in loaded
