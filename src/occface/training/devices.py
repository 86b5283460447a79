"""How a run uses the CPU: bf16-mixed where it measures clearly faster, channels-last memory where
oneDNN trains faster and PyTorch can."""
from __future__ import annotations

import logging

import torch

from ..config import Config
from ..models import OccFaceModel
from .objective import model_config
from ..scoring import (network_key)


log = logging.getLogger(__name__)


def cpu_training_pays_bf16(config: Config) -> bool:
    """Whether "auto" trains in Fabric's ``bf16-mixed`` on this CPU: where the CPU has native bf16
    and the configured network's forward and backward on a batch of the configured size run at least
    1.5x faster in bf16 (measured once per process on random faces, in the memory layout training
    uses: :func:`training_memory_format`; :mod:`occface.precision`)."""
    from ..precision import MIN_TRAINING_SPEEDUP, cpu_bf16_support, network_precision

    if not cpu_bf16_support()[0]:
        return False
    model = OccFaceModel(model_config(config)).train()
    batch = config.data.identities_per_batch * config.data.images_per_identity
    size = config.model.input_size
    layout = training_memory_format(model)
    model.to(memory_format=layout)
    sample = torch.rand(batch, 3, size, size).contiguous(memory_format=layout)
    key = ("training", *network_key(model)[1:])
    return network_precision(model, sample, "auto", key, backward=True, min_speedup=MIN_TRAINING_SPEEDUP) == "bf16"


def channels_last_trains(module: torch.nn.Module) -> bool:
    """Whether ``module`` can train in channels-last memory on the CPU. PyTorch 2.13's CPU backward of
    a 1x1 stride-2 convolution with fewer than 12 input channels in channels-last memory crashes the
    process (segmentation fault): IR nets below width 0.25 have such shortcuts."""
    return not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels < 16 for m in module.modules())


def training_memory_format(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.memory_format:
    """The memory layout ``module`` and its faces train in: channels-last on the CPU, where oneDNN's
    convolutions train faster (a step of 48 faces, 2 cores: MobileFaceNet 1.5x, the demo's IR-18
    1.3-1.45x, IR-50 1.1-1.3x), unless :func:`channels_last_trains` says it cannot; else contiguous."""
    on_cpu = torch.device(device).type == "cpu"
    return torch.channels_last if on_cpu and channels_last_trains(module) else torch.contiguous_format
