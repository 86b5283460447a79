"""The multi-task objective: the model, its margin head, the loss terms and, for fine-tuning, the
frozen teacher, in one module; and how a configuration builds and starts them (pretrained weights,
input convention, class centres)."""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data import FaceDataset
from ..data.masks import downsample_mask
from ..errors import InputError
from .losses import (MarginHead, QAConvPairLoss, embedding_distillation, occlusion_loss,
                     visible_map_distillation)
from ..models.occface import ModelConfig, OccFaceModel
from ..models.pretrained import load_pretrained

log = logging.getLogger(__name__)


class MultiTaskModule(nn.Module):
    """The model, its margin head and the loss terms in one module (one DDP wrapper).

    forward(images [B, 3, S, S], labels [B], masks [B, 1, S, S], clean [B, 3, S, S] or None)
    -> dict of loss terms (``adaface``, ``qaconv``, ``occlusion``; with a ``teacher``, also
    ``distill`` and ``distill_map``), ``pair_accuracy`` and the predicted maps. QAConv is weighted
    by the predicted maps, detached: the visibility head learns from the occlusion loss alone and
    the matcher learns to match under its weighting. With ``loss.occlusion_trains_backbone`` false,
    that loss stops at the head too (the backbone learns from the other terms only). The teacher
    (a frozen copy of the pretrained model) sees ``clean``, the faces without their synthesised
    occluders.

    ``backbone_frozen`` keeps the backbone's BatchNorm statistics as they are (eval mode) while
    the rest trains; the teacher is always in eval mode.
    """

    def __init__(self, model: OccFaceModel, num_classes: int, config: Config, teacher: OccFaceModel | None = None) -> None:
        super().__init__()
        loss = config.loss
        # A term weighted 0 is not computed (e.g. an embedding-only distillation run skips QAConv).
        self.active = {"adaface": loss.adaface_weight > 0, "qaconv": loss.qaconv_weight > 0,
                       "occlusion": loss.occlusion_weight > 0}
        self.model = model
        self.margin_head = MarginHead(model.backbone.embedding_size, num_classes, loss.head, loss.m, loss.h, loss.s, loss.t_alpha)
        self.pair_loss = QAConvPairLoss(model.qaconv, loss.triplet_margin)
        self.mask_mode = loss.mask_downsampling
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.teacher_onnx = None  # the teacher's network in ONNX Runtime: use_onnx_teacher
        self.distill_maps = loss.distill_map_weight > 0
        self.occlusion_trains_backbone = loss.occlusion_trains_backbone
        self.backbone_frozen = False
        self.frozen_layers: list[nn.Module] = []

    def use_onnx_teacher(self, folder: Path) -> Path:
        """Compute the teacher's targets in ONNX Runtime from now on: the teacher is saved to
        ``folder`` and exported there (the export checks the graph against PyTorch). Its weights stay
        in this module too, so checkpoints are the same whichever runtime computed the targets.
        Returns the graph's path."""
        from ..runtimes.export import export_onnx
        from ..runtimes.onnx_model import load_face_model

        if self.teacher is None:
            raise ConfigError("loss.teacher_runtime=onnx needs a teacher (loss.distill_weight or distill_map_weight > 0)")
        self.teacher.save_pretrained(folder)
        result = export_onnx(folder)
        self.teacher_onnx = load_face_model(folder, "onnx")
        return result.path

    def freeze_backbone_before(self, prefix: str) -> list[str]:
        """Freeze the backbone's layers registered before the first parameter named ``prefix...``
        (weights and BatchNorm statistics); returns the frozen parameter names."""
        names = [name for name, _ in self.model.backbone.named_parameters()]
        if not any(name.startswith(prefix) for name in names):
            raise ConfigError(f"model.train_from={prefix!r} names no backbone layer (e.g. {names[len(names) // 2]})")
        frozen = names[: next(i for i, name in enumerate(names) if name.startswith(prefix))]
        parameters = dict(self.model.backbone.named_parameters())
        for name in frozen:
            parameters[name].requires_grad_(False)
        frozen_modules = {name.rpartition(".")[0] for name in frozen}
        self.frozen_layers = [m for n, m in self.model.backbone.named_modules() if n in frozen_modules]
        return frozen

    def train(self, mode: bool = True) -> "MultiTaskModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if mode and self.backbone_frozen:
            self.model.backbone.eval()
        for layer in self.frozen_layers if mode else ():
            layer.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                clean: torch.Tensor | None = None,
                targets: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """``targets``: the teacher's (embedding [B, E], feature map or None) of the clean faces,
        looked up in a :class:`~occface.teacher_cache.TeacherCache`; without them the teacher runs
        on ``clean`` here."""
        out = self.model(images, detach_head_input=not self.occlusion_trains_backbone)
        zero = out.embedding.new_zeros(())
        occlusion = (occlusion_loss(out.occlusion, masks, self.mask_mode) if self.active["occlusion"]
                     else zero)  # a term weighted 0 costs no backward pass through the head
        terms = {
            "adaface": zero, "qaconv": zero, "pair_accuracy": zero,
            "occlusion": occlusion,
            "occlusion_map": out.occlusion.detach(),
        }
        if self.active["adaface"]:
            terms["adaface"] = F.cross_entropy(self.margin_head(out.embedding, out.norm, labels).float(), labels)
        if self.active["qaconv"]:
            terms["qaconv"], terms["pair_accuracy"] = self.pair_loss(out.feature_map, labels, out.occlusion.detach())
        if self.teacher is not None:
            if targets is None:
                source = clean if clean is not None else images
                with torch.no_grad():
                    if self.teacher_onnx is not None:  # RGB in [0, 1]; the graph applies the convention
                        target = self.teacher_onnx(source)  # fp32, on the CPU (the only device it runs on)
                    else:
                        target = self.teacher.backbone(self.teacher.normalize(source))
                targets = (target.embedding, target.feature_map)
            embedding, maps = (t.to(out.embedding.device) if t is not None else None for t in targets)
            terms["distill"] = embedding_distillation(out.embedding, embedding)
            if self.distill_maps:
                visible = downsample_mask(masks, tuple(out.feature_map.shape[-2:]), self.mask_mode)
                terms["distill_map"] = visible_map_distillation(out.feature_map, maps, visible)
        return terms

    def teacher_network(self):
        """What computes the teacher's targets: images [B, 3, S, S] RGB in [0, 1] -> an output with
        ``embedding`` and ``feature_map`` (ONNX Runtime where :meth:`use_onnx_teacher` was called)."""
        if self.teacher_onnx is not None:
            return self.teacher_onnx
        teacher = self.teacher
        return lambda images: teacher.backbone(teacher.normalize(images))


def model_config(config: Config) -> ModelConfig:
    """The network a configuration describes (before any weights or input convention)."""
    m = config.model
    return ModelConfig(m.arch, m.feature_level, m.input_size, m.width,
                       occlusion_hidden_channels=m.occlusion_hidden_channels)


def build_model(config: Config) -> tuple[OccFaceModel, OccFaceModel | None]:
    """The model a configuration trains, with ``model.pretrained`` loaded (and its input
    convention, unless the config sets one), and the frozen teacher for distillation (a copy of
    the pretrained model; None without distillation)."""
    m = config.model
    if not 0.0 <= m.interpolate_pretrained <= 1.0:
        raise ConfigError(f"model.interpolate_pretrained {m.interpolate_pretrained} is outside [0, 1]")
    if m.interpolate_pretrained != 1.0 and not m.pretrained:
        raise ConfigError("model.interpolate_pretrained needs model.pretrained (the weights to interpolate with)")
    model = OccFaceModel(model_config(config))
    if m.pretrained:
        log.info("pretrained weights: %s", load_pretrained(model, m.pretrained))
    overrides = {k: v for k, v in (("color_space", m.color_space), ("mean", m.input_mean), ("std", m.input_std))
                 if v is not None}
    if overrides:
        current = model.config.convention
        convention = dataclasses.replace(current, **overrides)  # __post_init__ checks and makes tuples
        if m.pretrained and convention != current:
            log.warning("the config's input convention %s overrides the pretrained weights' %s", convention, current)
        model.set_convention(convention)
    teacher = None
    if config.loss.distills:
        if not m.pretrained:
            raise ConfigError("loss.distill_weight and loss.distill_map_weight need model.pretrained (the teacher)")
        teacher = copy.deepcopy(model)
    return model, teacher


@torch.no_grad()
def class_mean_embeddings(model: OccFaceModel, dataset: FaceDataset, per_class: int = 8, batch_size: int = 64,
                          precision: str = "fp32") -> torch.Tensor:
    """[C, E]: the mean embedding of up to ``per_class`` clean, unaugmented images of each
    identity (the first ones), for starting a margin head's class centres where a pretrained
    network already puts each identity. ``precision``: the network's (``bf16`` autocast or fp32)."""
    from ..data.images import resize_image, to_tensor
    from ..precision import autocast

    chosen: dict[int, list[int]] = {}
    for index, label in enumerate(dataset.targets):
        if label >= 0 and len(chosen.setdefault(label, [])) < per_class:
            chosen[label].append(index)
    if len(chosen) != dataset.num_classes:
        raise InputError(f"{dataset.num_classes - len(chosen)} identities have no image to start their class centre from")
    indices = [i for label in range(dataset.num_classes) for i in chosen[label]]
    labels = torch.tensor([dataset.targets[i] for i in indices])
    was_training = model.training
    model.eval()
    sums = torch.zeros(dataset.num_classes, model.backbone.embedding_size)
    device = next(model.parameters()).device
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        images = torch.stack([to_tensor(resize_image(dataset.read(i).image, dataset.input_size)) for i in part])
        with autocast(precision, device):  # the fused embedding is fp32 either way
            embedding = model.fused_embedding(images.to(device))
        sums.index_add_(0, labels[start : start + batch_size], embedding.cpu())
    model.train(was_training)
    return F.normalize(sums, dim=1)
