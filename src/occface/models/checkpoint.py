"""Reading weight files (Lightning ``.ckpt``, state dicts, ``.safetensors``) and loading them
strictly into a backbone, with errors that say what a file that does not fit looks like."""
from __future__ import annotations

import argparse
import pathlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .backbone import STAGE_CHANNELS, STAGE_UNITS, Backbone


class CheckpointError(InputError):
    """A checkpoint file that cannot be read, or that does not fit the model it is loaded into."""


# Globals that Lightning checkpoints pickle beside the weights (hyper-parameters); safe to rebuild.
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath]


def read_state_dict(path: str | Path, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, a plain ``torch.save``-d state dict, or a Lightning ``.ckpt``
    (its ``state_dict`` entry). Pickles are opened with ``weights_only=True`` unless ``trusted``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: the checkpoint holds Python objects that are not safe to unpickle ({error}). "
            "If you trust the file, load it with trusted=True."
        ) from error
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(blob, Mapping) and isinstance(blob.get("state_dict"), Mapping):
        blob = blob["state_dict"]
    if not isinstance(blob, Mapping) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or a Lightning checkpoint holding one)")
    return dict(blob)


def backbone_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Select backbone weights: strip a DDP ``module.`` prefix; where keys carry AdaFace's
    ``model.`` prefix keep only those (dropping ``head.*`` and other training state)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("model.") for k in state):
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def backbone_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """``"ir"``, ``"mobilefacenet"`` or None, from a backbone state dict's key names."""
    if "input_layer.0.weight" in state and any(k.startswith("body.") for k in state):
        return "ir"
    if {"conv1.0.weight", "dw_conv.depthwise.weight", "gdconv.depthwise.weight"} <= set(state):
        return "mobilefacenet"
    return None


def describe_backbone_state(state: Mapping[str, torch.Tensor]) -> str:
    """A best guess at what architecture a backbone state dict belongs to, for error messages."""
    family = backbone_family(state)
    if family == "mobilefacenet":
        units = {int(m.group(1)) for k in state if (m := re.match(r"features\.(\d+)\.", k))}
        return f"mobilefacenet with {max(units, default=-1) + 1} inverted-residual units"
    units = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    if family is None or not units:
        keys = ", ".join(list(state)[:3])
        return f"no backbone occface knows (neither IR nor MobileFaceNet keys; first keys: {keys})"
    num_units = max(units) + 1
    se = any(".se_block." in k for k in state)
    names = [a for a, u in STAGE_UNITS.items() if sum(u) == num_units and a.startswith("ir_se") == se]
    arch = names[0] if names else f"{'ir_se' if se else 'ir'} with {num_units} units"
    width = state["input_layer.0.weight"].shape[0] / STAGE_CHANNELS[0]
    text = f"{arch}, width {width:g}"
    linear = state.get("output_layer.3.weight")
    last = state.get(f"body.{num_units - 1}.res_layer.1.weight")
    if linear is not None and last is not None:
        side = round((linear.shape[1] / last.shape[0]) ** 0.5)
        text += f", input {side * 16}x{side * 16}"
    return text


def _natural_key(key: str) -> list[tuple[int, int, str]]:
    """Sort ``body.8`` before ``body.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _listing(title: str, items: list[str], by_module: bool = False, shown: int = 8) -> str:
    """One error-message line: a count and the first few entries (keys grouped by module)."""
    if not items:
        return ""
    count = f"{len(items)}"
    if by_module:
        items = list(dict.fromkeys(k.rpartition(".")[0] or k for k in items))
        count = f"{count} tensors in {len(items)} modules"
    more = f" ... and {len(items) - shown} more" if len(items) > shown else ""
    return f"\n  {title} ({count}): " + ", ".join(items[:shown]) + more


def load_backbone_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load backbone weights strictly; any missing, unexpected or mis-shaped key is an error."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state), key=_natural_key)
    unexpected = sorted(set(state) - set(expected), key=_natural_key)
    mis_shaped = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(state) & set(expected), key=_natural_key)
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"{source}: checkpoint does not fit the backbone (arch={backbone.arch!r}, width={backbone.width:g}, "
            f"input_size={backbone.input_size}); the checkpoint looks like {describe_backbone_state(state)}."
            + _listing("missing", missing, by_module=True)
            + _listing("unexpected", unexpected, by_module=True)
            + _listing("shape mismatches", mis_shaped)
        )
    backbone.load_state_dict(state, strict=True)


def load_adaface_checkpoint(backbone: Backbone, path: str | Path, *, trusted: bool = False) -> Backbone:
    """Load AdaFace weights into an IR ``backbone`` (in place, strictly) and return it.

    Accepts AdaFace's released Lightning ``.ckpt`` files (``state_dict`` with ``model.``-prefixed
    backbone keys; ``head.*`` is ignored), plain state dicts and ``.safetensors`` files. The
    feature level does not matter: parameter names are the same at block 3 and block 4. AdaFace's
    weights expect :data:`~occface.models.convention.ADAFACE_INPUT` (BGR, ``(x - 0.5) / 0.5``);
    :func:`occface.models.load_pretrained` loads them into a whole model with that convention.
    """
    state = backbone_keys(read_state_dict(path, trusted=trusted))
    load_backbone_state(backbone, state, str(path))
    return backbone
