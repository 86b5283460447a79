"""occface models: the IR backbone, the occlusion head and the QAConv matcher."""
from .backbone import FEATURE_LEVELS, INPUT_SIZES, STAGE_UNITS, Backbone, BackboneOutput, IRUnit, SqueezeExcite
from .checkpoint import CheckpointError, describe_backbone_state, load_adaface_checkpoint, read_state_dict
from .occlusion_head import OcclusionHead
from .qaconv import QAConv

ARCHITECTURES = tuple(STAGE_UNITS)

__all__ = [
    "ARCHITECTURES",
    "FEATURE_LEVELS",
    "INPUT_SIZES",
    "Backbone",
    "BackboneOutput",
    "CheckpointError",
    "IRUnit",
    "OcclusionHead",
    "QAConv",
    "SqueezeExcite",
    "describe_backbone_state",
    "load_adaface_checkpoint",
    "read_state_dict",
]
