"""OccFaceModel: backbone + occlusion head + QAConv matcher, saved as config + safetensors."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .backbone import STAGE_UNITS, Backbone
from .checkpoint import CheckpointError
from .convention import InputConvention, InputNormalization
from .mobilefacenet import MobileFaceNet
from .occlusion_head import OcclusionHead
from .qaconv import QAConv

ARCHITECTURES = (*STAGE_UNITS, "mobilefacenet")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Parameters added after models were first saved; absent, they keep their reset value, which
# reproduces the older models' scores exactly.
ADDED_KEYS = frozenset({"qaconv.visibility_fc.weight"})


def build_backbone(arch: str, feature_level: str = "block4", input_size: int = 112,
                   width: float = 1.0) -> Backbone | MobileFaceNet:
    """An IR backbone (``ir_18`` ... ``ir_se_50``) or ``mobilefacenet`` (width 1 only)."""
    if arch == "mobilefacenet":
        if width != 1.0:
            raise ValueError(f"mobilefacenet has one width (1.0), got width={width!r}")
        return MobileFaceNet(feature_level, input_size)
    if arch not in STAGE_UNITS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {list(ARCHITECTURES)}")
    return Backbone(arch, feature_level, input_size, width)


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network. ``color_space``, ``input_mean`` and ``input_std``
    are the input convention of its weights (:class:`InputConvention`; models saved before they
    existed used RGB with mean = std = 0.5, the defaults). ``calibration`` holds decision
    thresholds (e.g. ``{"embedding": {"far": 0.01, "threshold": 0.31}, ...}``) and the fusion's
    statistics and weights, measured on validation pairs."""

    arch: str = "ir_50"
    feature_level: str = "block4"
    input_size: int = 112
    width: float = 1.0
    color_space: str = "RGB"
    input_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    input_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    occlusion_hidden_channels: int = 128
    calibration: dict = field(default_factory=dict)

    @property
    def convention(self) -> InputConvention:
        return InputConvention(self.color_space, tuple(self.input_mean), tuple(self.input_std))


class OccFaceOutput(NamedTuple):
    """embedding [B, 512] unit norm; norm [B, 1]; feature_map [B, C, H, W]; occlusion [B, 1, H, W]."""

    embedding: torch.Tensor
    norm: torch.Tensor
    feature_map: torch.Tensor
    occlusion: torch.Tensor


class OccFaceModel(nn.Module):
    """Input convention -> backbone -> (embedding, norm, feature map) -> occlusion head; and the
    QAConv matcher for pairs of feature maps.

    Every input is ``[B, 3, S, S]`` RGB in [0, 1]; the model applies its weights' convention
    (``config.convention``) itself."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.normalize = InputNormalization(c.convention)
        self.backbone = build_backbone(c.arch, c.feature_level, c.input_size, c.width)
        self.occlusion_head = OcclusionHead(self.backbone.feature_channels, c.occlusion_hidden_channels)
        size = self.backbone.feature_size
        self.qaconv = QAConv(self.backbone.feature_channels, size, size)

    @property
    def color_space(self) -> str:
        return self.config.color_space

    def set_convention(self, convention: InputConvention) -> None:
        """Use (and save) another input convention, e.g. that of pretrained weights just loaded."""
        self.config.color_space = convention.color_space
        self.config.input_mean, self.config.input_std = list(convention.mean), list(convention.std)
        device = next(self.parameters()).device
        self.normalize = InputNormalization(convention).to(device)

    def forward(self, images: torch.Tensor, detach_head_input: bool = False) -> OccFaceOutput:
        """images [B, 3, S, S]: RGB in [0, 1]. ``detach_head_input``: the occlusion head sees the
        feature maps detached (training: its loss then reaches the head only, not the backbone)."""
        out = self.backbone(self.normalize(images))
        head_input = out.feature_map.detach() if detach_head_input else out.feature_map
        return OccFaceOutput(out.embedding, out.norm, out.feature_map, self.occlusion_head(head_input))

    def fused_embedding(self, images: torch.Tensor, out: OccFaceOutput | None = None) -> torch.Tensor:
        """AdaFace's flip-and-norm fusion: embeddings of the images and of their mirror images,
        each weighted by its norm, summed and re-normalised -> [B, E]. ``out`` reuses a forward
        pass already made on ``images``."""
        out = out if out is not None else self(images)
        flipped = self.backbone(self.normalize(images.flip(3)))
        fused = out.embedding.float() * out.norm.float() + flipped.embedding.float() * flipped.norm.float()
        return torch.nn.functional.normalize(fused, dim=1)  # fp32 whatever the forward ran in

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        temporary = directory / f".{WEIGHTS_FILE}.tmp"
        save_file(state, str(temporary), metadata={"format": "pt", "library": "occface"})
        os.replace(temporary, directory / WEIGHTS_FILE)
        temporary = directory / f".{CONFIG_FILE}.tmp"
        temporary.write_text(json.dumps(asdict(self.config), indent=2))
        os.replace(temporary, directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "OccFaceModel":
        """Rebuild a model saved with :meth:`save_pretrained` (strict: every key must fit, except
        parameters added since, listed in ``ADDED_KEYS``, which keep their reset values)."""
        config, weights_path = read_config(directory)
        try:
            model = cls(config)
        except ValueError as error:
            raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: not a valid occface model config ({error})") from error
        _load_checked(model, weights_path, map_location)
        return model.eval()


def read_config(directory: str | Path) -> tuple[ModelConfig, Path]:
    """The :class:`ModelConfig` of a model folder and the path of its weights (checked to exist)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        return ModelConfig(**json.loads(config_path.read_text())), weights_path
    except (json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{config_path}: not a valid occface model config ({error})") from error


def _load_checked(module: nn.Module, weights_path: Path, map_location: str | torch.device = "cpu",
                  prefix: str = "") -> None:
    """Load the tensors under ``prefix`` of a model's weights file into ``module``, strictly (bar
    ``ADDED_KEYS``)."""
    from safetensors.torch import load_file

    state = {k.removeprefix(prefix): v for k, v in load_file(str(weights_path), device=str(map_location)).items()
             if k.startswith(prefix)}
    expected = module.state_dict()
    added = {k.removeprefix(prefix) for k in ADDED_KEYS}
    missing, unexpected = sorted(set(expected) - set(state) - added), sorted(set(state) - set(expected))
    shapes = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{weights_path}: weights do not fit the model in {CONFIG_FILE} "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {sorted(shapes)[:5]})")
    module.load_state_dict(state, strict=False)


def feature_shape(config: ModelConfig) -> tuple[int, int]:
    """(channels C, side H = W) of the feature map of ``config``'s backbone, without building it."""
    with torch.device("meta"):
        backbone = build_backbone(config.arch, config.feature_level, config.input_size, config.width)
    return backbone.feature_channels, backbone.feature_size


def load_matcher(directory: str | Path) -> tuple[ModelConfig, QAConv]:
    """The config and the QAConv matcher (eval mode) of a saved model, without its network: for a
    network that runs elsewhere (ONNX Runtime, :mod:`occface.onnx_model`)."""
    config, weights_path = read_config(directory)
    try:
        channels, side = feature_shape(config)
    except ValueError as error:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: not a valid occface model config ({error})") from error
    matcher = QAConv(channels, side, side)
    _load_checked(matcher, weights_path, prefix="qaconv.")
    return config, matcher.eval()
