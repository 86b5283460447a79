"""OccFaceModel: backbone + occlusion head + QAConv matcher, saved as config + safetensors."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .backbone import Backbone
from .checkpoint import CheckpointError
from .occlusion_head import OcclusionHead
from .qaconv import QAConv

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Parameters added after models were first saved; absent, they keep their reset value, which
# reproduces the older models' scores exactly.
ADDED_KEYS = frozenset({"qaconv.visibility_fc.weight"})


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; ``calibration`` holds decision thresholds
    (e.g. ``{"embedding": {"far": 0.01, "threshold": 0.31}, ...}``) measured on validation pairs."""

    arch: str = "ir_50"
    feature_level: str = "block4"
    input_size: int = 112
    width: float = 1.0
    color_space: str = "RGB"
    occlusion_hidden_channels: int = 128
    calibration: dict = field(default_factory=dict)


class OccFaceOutput(NamedTuple):
    """embedding [B, 512] unit norm; norm [B, 1]; feature_map [B, C, H, W]; occlusion [B, 1, H, W]."""

    embedding: torch.Tensor
    norm: torch.Tensor
    feature_map: torch.Tensor
    occlusion: torch.Tensor


class OccFaceModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        c = self.config
        self.backbone = Backbone(c.arch, c.feature_level, c.input_size, c.width, c.color_space)
        self.occlusion_head = OcclusionHead(self.backbone.feature_channels, c.occlusion_hidden_channels)
        size = self.backbone.feature_size
        self.qaconv = QAConv(self.backbone.feature_channels, size, size)

    @property
    def color_space(self) -> str:
        return self.backbone.color_space

    def forward(self, images: torch.Tensor) -> OccFaceOutput:
        """images [B, 3, S, S] in [-1, 1], in ``color_space`` order."""
        out = self.backbone(images)
        return OccFaceOutput(out.embedding, out.norm, out.feature_map, self.occlusion_head(out.feature_map))

    def fused_embedding(self, images: torch.Tensor, out: OccFaceOutput | None = None) -> torch.Tensor:
        """AdaFace's flip-and-norm fusion: embeddings of the images and of their mirror images,
        each weighted by its norm, summed and re-normalised -> [B, 512]. ``out`` reuses a forward
        pass already made on ``images``."""
        out = out if out is not None else self(images)
        flipped = self.backbone(images.flip(3))
        return torch.nn.functional.normalize(out.embedding * out.norm + flipped.embedding * flipped.norm, dim=1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.color_space = self.backbone.color_space
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
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise CheckpointError(f"{path}: not found (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            values = json.loads(config_path.read_text())
            config = ModelConfig(**values)
        except (json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(f"{config_path}: not a valid occface model config ({error})") from error
        model = cls(config)
        state = load_file(str(weights_path), device=str(map_location))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state) - ADDED_KEYS), sorted(set(state) - set(expected))
        shapes = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{weights_path}: weights do not fit the model in {config_path.name} "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {sorted(shapes)[:5]})")
        model.load_state_dict(state, strict=False)
        return model.eval()
