"""Training configuration: small YAML files mapped onto dataclasses. Unknown keys are errors."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .data.masks import MASK_MODES
from .errors import InputError
from .models import ARCHITECTURES, FEATURE_LEVELS

#: The margin heads the training loss offers (occface.training.losses.MarginHead).
MARGIN_KINDS = ("adaface", "arcface", "cosface")

# Settings with a fixed set of values: a typo is an error that lists them.
Architecture = Literal[ARCHITECTURES]  # type: ignore[valid-type]
FeatureLevel = Literal[FEATURE_LEVELS]  # type: ignore[valid-type]
MarginKind = Literal[MARGIN_KINDS]  # type: ignore[valid-type]
MaskMode = Literal[MASK_MODES]  # type: ignore[valid-type]


class ConfigError(InputError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class ModelSection:
    arch: Architecture = "ir_50"  # ir_18 ... ir_se_50, or mobilefacenet
    feature_level: FeatureLevel = "block4"  # block4: 7x7 maps at 112 input; block3: 14x14
    input_size: Literal[112, 224] = 112  # side of the aligned faces the network takes
    width: float = 1.0  # channel multiplier of IR nets (0.25 for CPU-sized demos; AdaFace checkpoints need 1)
    # Weights to start from (load_pretrained): an AdaFace .ckpt, a MobileFaceNet state dict, a
    # .safetensors file or an occface model directory. They bring their input convention.
    pretrained: str | None = None
    # Input convention; null: the pretrained weights' own (from scratch: RGB, mean = std = 0.5).
    color_space: Literal["RGB", "BGR"] | None = None
    input_mean: list[float] | None = None  # per-channel mean subtracted from [0, 1] pixels (null: the weights')
    input_std: list[float] | None = None  # per-channel std the pixels are divided by (null: the weights')
    occlusion_hidden_channels: int = 128  # channels of the OcclusionHead's 3x3 convolution
    freeze_backbone: bool = False  # train the occlusion head and QAConv only
    freeze_backbone_steps: int = 0  # a warm-up with the backbone frozen (weights and BatchNorm statistics)
    # The first backbone layer that trains (a parameter-name prefix, e.g. features.5 or body.3): the
    # layers before it stay as pretrained, statistics included, and cost no backward pass.
    train_from: str | None = None
    backbone_bn: Literal["train", "frozen"] = "train"  # frozen: keep the backbone's BatchNorm statistics
    backbone_lr_scale: float = 1.0  # the backbone's learning rate as a multiple of optim.lr
    # The backbone saved at the end: pretrained + alpha * (fine-tuned - pretrained), weight-space
    # ensembling with the start (WiSE-FT); 1 keeps the fine-tuned weights. Needs model.pretrained.
    interpolate_pretrained: float = 1.0


@dataclass
class DataSection:
    source: Literal["procedural", "folder", "recordio", "occlusion"] = "procedural"  # procedural | folder | recordio | occlusion
    path: str | None = None  # the data: an identity folder, a .rec file or an occlusion dataset
    identities: list[str] | None = None  # folder: restrict to these identity folders
    split_file: str | None = None  # JSON with "train" (and "test": validation) identities, e.g. faces112_split.json
    extra_paths: list[str] = field(default_factory=list)  # more identity folders, merged by identity name
    extra_val_identities: int = 0  # the last N identity folders of each extra path validate instead of training
    merge_identities: bool = True  # same-named identity folders of data.path and extra_paths are one person (false: '<path>/<name>')
    recursive: bool = False  # take images in sub-folders of each identity folder (CFP: frontal/, profile/)
    extra_occlusion_path: str | None = None  # real occluded faces with masks (manifest), merged by identity
    procedural_identities: int = 40  # procedural data: identities drawn
    procedural_images: int = 16  # procedural data: images of each identity
    procedural_seed: int = 0  # procedural data: the seed the identities are drawn from
    occluders: str | None = None  # RGBA overlay folder; None: procedural occluders
    # Drawn uniformly: niqab, mask, sunglasses, hand, bar (overlay images, else procedural), or veil,
    # facemask (occluders drawn as a distribution), or one of their sub-families (veil/two-hole, ...).
    occlusion_kinds: list[str] = field(default_factory=lambda: ["niqab", "mask"])
    occlusion_probability: float = 0.8  # share of the training faces that get an occluder
    flip: float = 0.5  # probability of mirroring a face (AdaFace augmentation)
    crop: float = 0.2  # probability of keeping a random box and blacking out the rest
    low_res: float = 0.2  # probability of shrinking a face and scaling it back
    photometric: float = 0.2  # probability of jittering brightness, contrast and saturation
    identities_per_batch: int = 8  # P identities a batch ...
    images_per_identity: int = 4  # ... times K images each
    num_workers: int = 0  # data-loading processes (0: in the training process)


@dataclass
class LossSection:
    head: MarginKind = "adaface"  # adaface | arcface | cosface
    m: float = 0.4  # the margin
    h: float = 0.333  # AdaFace: how far the margin adapts to the feature norm
    s: float = 64.0  # the logits' scale
    t_alpha: float = 0.01  # AdaFace: momentum of the feature-norm statistics
    adaface_weight: float = 1.0  # weight of the margin loss (0: not computed)
    qaconv_weight: float = 1.0  # weight of the QAConv pair loss (0: not computed)
    occlusion_weight: float = 1.0  # weight of the occlusion MSE against the ground-truth masks (0: not computed)
    occlusion_weight_start: float = 0.1  # the occlusion weight's start, as a share of it, ramped up ...
    occlusion_warmup_steps: int = 0  # ... over these steps
    # false: the occlusion head reads the feature maps detached, so its loss trains the head alone
    # and leaves the backbone (and the embedding it shares) to the other terms.
    occlusion_trains_backbone: bool = True
    triplet_margin: float | None = None  # a triplet term in the QAConv pair loss, with this margin (null: none)
    mask_downsampling: MaskMode = "area"  # how masks come down to the map's size (area: each cell its visible share)
    # Distillation from the frozen pretrained network (model.pretrained): 1 - cos(student embedding
    # of the (occluded) face, teacher embedding of the same face without its synthesised occluder).
    distill_weight: float = 0.0
    # The same for the feature maps QAConv matches, per location, counted where the face is visible.
    distill_map_weight: float = 0.0
    # Where the frozen teacher runs: torch, or onnx (ONNX Runtime on the CPU, exported once into
    # train.out_dir/teacher; MobileFaceNet's forward on 64 faces, 2 cores: 0.17 s against eager 0.36 s).
    teacher_runtime: Literal["torch", "onnx"] = "torch"
    # Compute the teacher's targets once per training image (and its mirror, with data.flip) before
    # training and look them up each step (occface.teacher_cache); needs data.crop, data.low_res and
    # data.photometric at 0 (no other augmentation changes the clean face).
    teacher_cache: bool = False
    # class_means: margin-head class centres start at the pretrained mean embedding of each identity.
    head_init: Literal["random", "class_means"] = "random"
    head_init_images: int = 8  # images per identity for class_means

    @property
    def distills(self) -> bool:
        """Whether a term learns from the frozen pretrained teacher (and needs clean targets)."""
        return self.distill_weight > 0 or self.distill_map_weight > 0


@dataclass
class OptimSection:
    name: Literal["sgd", "adamw"] = "sgd"  # sgd | adamw
    lr: float = 0.1  # learning rate (the new parts'; the backbone's is scaled by model.backbone_lr_scale)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # not applied to BatchNorm weights and biases
    warmup_steps: int = 0  # linear learning-rate warm-up
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=list)  # steps, for multistep
    gamma: float = 0.1  # multistep: the factor at each milestone
    clip_grad_norm: float | None = 5.0  # gradient-norm clipping (null: none)


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimiser steps of one batch each
    seed: int = 0  # every random draw of the run: sampler, occluders, augmentation, initialisation
    out_dir: str = "runs/occface"  # checkpoints, TensorBoard logs, image grids, the trained model (OUT/model)
    accelerator: str = "auto"  # Lightning Fabric's: auto, cpu, cuda
    devices: int | str = 1  # Lightning Fabric's device count
    precision: str = "auto"  # auto: bf16-mixed on GPU and on CPUs where bf16 measures faster, else 32-true
    log_every: int = 10  # steps between TensorBoard scalars
    checkpoint_every: int = 100  # steps between last.ckpt writes (atomic)
    val_every: int = 0  # 0: validate at the end only
    val_pairs: int = 1000  # per pair type, drawn from held-out identities (they share images: cheap)
    val_identities: int = 0  # identities held out of training for validation (procedural/folder)
    calibrate_fusion: bool = True  # choose the fusion's shares per pair type on the validation pairs (false: 0.5)
    # Choose the strata rule's hidden share on the validation faces (false: the fixed 0.25, fitted to
    # niqabs, which files most masked faces as clean). Off by default: on LFW it helps masked pairs and
    # costs niqab pairs (see the README).
    calibrate_strata: bool = False
    # Fit the re-rank for 1:N search on searches of the validation people (occface.search_calibration),
    # stored with the model beside the pair calibration.
    calibrate_search: bool = True
    image_grid_every: int = 100  # steps between PNG grids of inputs with predicted and true maps (0: none)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    progress: bool = True  # a progress bar on a terminal, a line every 30 s in a log


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value, hint, where: str):
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    choices: tuple = ()
    for option in options:
        if typing.get_origin(option) is Literal:
            choices += typing.get_args(option)
            if value in choices and type(value) in {type(v) for v in choices}:
                return value
            continue
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if origin is list and isinstance(value, list):
            return value
        if origin in (int, str, bool) and isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
    if choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    raise ConfigError(f"{where}: {value!r} is not a valid {hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``section.key=value`` overrides (values are YAML)."""
    values: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        where = str(path)
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {override!r}: expected section.key=value")
        section, name = key.split(".", 1)
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"override {override!r}: {section} is not a section")
        values[section][name] = yaml.safe_load(raw)
    return _build(Config, values, where)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
