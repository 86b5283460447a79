"""Parameter groups (no weight decay on BatchNorm and biases; the backbone's learning rate scaled)
and the learning-rate schedule (warm-up, then multi-step, cosine or constant)."""
from __future__ import annotations

import logging
import math

from torch import nn

from ..config import Config
from .objective import MultiTaskModule


log = logging.getLogger(__name__)


def parameter_groups(module: MultiTaskModule, config: Config) -> list[dict]:
    """SGD/AdamW groups: no weight decay on BatchNorm and biases; backbone lr scaled."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    backbone_ids = {id(p) for p in module.model.backbone.parameters()}
    for sub in module.modules():
        for name, parameter in sub.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            no_decay = isinstance(sub, nn.modules.batchnorm._BatchNorm) or name == "bias"
            groups.setdefault((id(parameter) in backbone_ids, no_decay), []).append(parameter)
    out = []
    for (in_backbone, no_decay), params in groups.items():
        scale = config.model.backbone_lr_scale if in_backbone else 1.0
        out.append({"params": params, "lr": config.optim.lr * scale, "weight_decay": 0.0 if no_decay else config.optim.weight_decay})
    return out


def lr_factor(step: int, config: Config) -> float:
    optim, total = config.optim, config.train.max_steps
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "multistep":
        return optim.gamma ** sum(step >= m for m in optim.milestones)
    if optim.schedule == "cosine":
        span = max(1, total - optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - optim.warmup_steps) / span)))
    if optim.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown optim.schedule {optim.schedule!r}; expected multistep, cosine or constant")
