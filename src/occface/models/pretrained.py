"""One loader for pretrained weights: :func:`load_pretrained` recognises what a file or folder is
and loads it strictly into an :class:`OccFaceModel`, with the input convention of those weights."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, backbone_family, backbone_keys, describe_backbone_state, load_backbone_state,
                         read_state_dict)
from .convention import ADAFACE_INPUT, IMAGENET_INPUT, InputConvention
from .occface import CONFIG_FILE, OccFaceModel

log = logging.getLogger(__name__)

# The convention each family's released weights were trained with (AdaFace's IR nets; the public
# MobileFaceNet state dicts).
FAMILY_CONVENTION = {"ir": ADAFACE_INPUT, "mobilefacenet": IMAGENET_INPUT}


def arch_family(arch: str) -> str:
    return "mobilefacenet" if arch == "mobilefacenet" else "ir"


def load_pretrained(model: OccFaceModel, path: str | Path, *, convention: InputConvention | None = None,
                    trusted: bool = False) -> str:
    """Load pretrained weights into ``model`` in place and give it their input convention.

    ``path`` may be:

    * an occface model directory (``config.json`` + ``model.safetensors``): the whole model
      (backbone, occlusion head, QAConv) and its convention; its architecture must match;
    * an AdaFace Lightning ``.ckpt``, a plain or DDP state dict, or a ``.safetensors`` file of an
      IR backbone (convention: AdaFace's BGR, ``(x - 0.5) / 0.5``);
    * a MobileFaceNet state dict (RGB, ImageNet mean and std).

    Loading is strict: a missing, unexpected or mis-shaped tensor is a :class:`CheckpointError` that
    says what the file looks like. ``convention`` overrides the one the weights imply (for weights
    trained another way). Returns a one-line description of what was loaded.
    """
    path = Path(path)
    if path.is_dir():
        return _load_model_directory(model, path, convention)
    state = backbone_keys(read_state_dict(path, trusted=trusted))
    family, wanted = backbone_family(state), arch_family(model.config.arch)
    if family != wanted:
        raise CheckpointError(f"{path}: weights of {describe_backbone_state(state)}, but the model is "
                              f"{model.config.arch} (set model.arch to match the weights)")
    load_backbone_state(model.backbone, state, str(path))
    chosen = convention or FAMILY_CONVENTION[family]
    model.set_convention(chosen)
    return f"{path.name}: {describe_backbone_state(state)} backbone, input {_describe(chosen)}"


def interpolate_backbone(model: OccFaceModel, pretrained: str | Path, alpha: float) -> None:
    """Move ``model``'s backbone part of the way back to the weights it was fine-tuned from, in place:
    ``pretrained + alpha * (fine-tuned - pretrained)`` for every floating tensor (BatchNorm statistics
    included; counters stay). ``alpha`` 1 keeps the fine-tuned backbone, 0 restores the pretrained one;
    between them lies weight-space ensembling of a fine-tuned network with its start (WiSE-FT): more of
    what the start knew (clean faces), less of what fine-tuning added (on LFW with niqabs, about a point
    at 0.7; benchmarks/RESULTS.md). The occlusion head and QAConv have no pretrained counterpart and are
    left as trained."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha {alpha} is outside [0, 1]")
    start = OccFaceModel(replace(model.config, calibration={}))
    load_pretrained(start, pretrained)
    theirs = start.backbone.state_dict()
    mixed = {key: torch.lerp(theirs[key].to(value), value, alpha) if value.is_floating_point() else value
             for key, value in model.backbone.state_dict().items()}
    model.backbone.load_state_dict(mixed, strict=True)


def _load_model_directory(model: OccFaceModel, path: Path, convention: InputConvention | None) -> str:
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: a folder, but not an occface model directory (no {CONFIG_FILE})")
    source = OccFaceModel.from_pretrained(path)
    theirs, ours = source.config, model.config
    mismatch = [f"{key} {getattr(theirs, key)!r} (model: {getattr(ours, key)!r})"
                for key in ("arch", "feature_level", "input_size", "width", "occlusion_hidden_channels")
                if getattr(theirs, key) != getattr(ours, key)]
    if mismatch:
        raise CheckpointError(f"{path}: an occface model of another shape: " + ", ".join(mismatch))
    model.load_state_dict(source.state_dict(), strict=True)
    chosen = convention or theirs.convention
    model.set_convention(chosen)
    return f"{path}: occface model ({theirs.arch}, {theirs.feature_level}), input {_describe(chosen)}"


def _describe(convention: InputConvention) -> str:
    return f"{convention.color_space}, mean {list(convention.mean)}, std {list(convention.std)}"
