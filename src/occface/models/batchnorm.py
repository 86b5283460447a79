"""Re-measure a network's BatchNorm statistics on given images."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def measure_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Replace every BatchNorm layer's running mean and variance by the exact averages over
    ``images`` [B, 3, S, S] (one forward pass in training mode), and return ``model`` in eval mode.

    For a freshly initialised network (export checks, speed benchmarks) this gives a trained
    network's activation scale: a fresh deep IR net's activations otherwise grow by orders of
    magnitude from block to block. Learned weights are untouched."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: after one pass, exactly the batch's statistics
    model.train()
    model(images)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return model.eval()
