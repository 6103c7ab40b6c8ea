"""Helpers shared by the training tests."""

from __future__ import annotations

from torch import nn

from visionrpc.training.models import VisionModel, create_model


def model_that_tells_images_apart(arch: str, n_out: int) -> VisionModel:
    """A new, untrained model whose last layer is drawn at random, in eval mode.

    A new model answers every image alike (its last layer starts at zero), which would let a
    test comparing two ways of running it pass whatever either way did to the pixels.
    """
    model = create_model(arch, n_out, None)
    last = model.head[-1]
    assert isinstance(last, nn.Linear)
    nn.init.normal_(last.weight)
    return model.eval()
