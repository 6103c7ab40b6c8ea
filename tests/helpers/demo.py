"""The demo's recipe at a fraction of its cost: the same code path, smaller data and inputs."""

from __future__ import annotations

from visionrpc.training.demo import DemoRun

QUICK_RUNS = {
    "pets": DemoRun(size=(32, 32), epochs=1, data={"breeds": 3, "per_breed": 6}),
    "voc": DemoRun(size=(32, 32), epochs=1, data={"images": 24}),
    "biwi": DemoRun(size=(24, 32), epochs=1, data={"people": 2, "frames_per_person": 6}),
}
