"""occface models: IR and MobileFaceNet backbones, the occlusion head, the QAConv matcher, the whole
model, input conventions and pretrained-weight loading."""
from .batchnorm import measure_batchnorm
from .backbone import FEATURE_LEVELS, INPUT_SIZES, STAGE_UNITS, Backbone, BackboneOutput, IRUnit, SqueezeExcite
from .checkpoint import CheckpointError, describe_backbone_state, load_adaface_checkpoint, read_state_dict
from .convention import ADAFACE_INPUT, IMAGENET_INPUT, InputConvention, InputNormalization, check_color_space
from .mobilefacenet import MobileFaceNet
from .occface import ARCHITECTURES, ModelConfig, OccFaceModel, OccFaceOutput, build_backbone
from .occlusion_head import OcclusionHead
from .pretrained import interpolate_backbone, load_pretrained
from .qaconv import QAConv

__all__ = [
    "ADAFACE_INPUT",
    "ARCHITECTURES",
    "FEATURE_LEVELS",
    "IMAGENET_INPUT",
    "INPUT_SIZES",
    "Backbone",
    "BackboneOutput",
    "CheckpointError",
    "IRUnit",
    "InputConvention",
    "InputNormalization",
    "MobileFaceNet",
    "ModelConfig",
    "OccFaceModel",
    "OccFaceOutput",
    "OcclusionHead",
    "QAConv",
    "STAGE_UNITS",
    "SqueezeExcite",
    "build_backbone",
    "check_color_space",
    "describe_backbone_state",
    "interpolate_backbone",
    "load_adaface_checkpoint",
    "load_pretrained",
    "measure_batchnorm",
    "read_state_dict",
]
