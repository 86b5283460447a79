"""Losses of the multi-task objective: AdaFace margin head, QAConv pair loss, occlusion MSE."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MARGIN_KINDS
from ..data.masks import downsample_mask
from ..models.qaconv import QAConv


class MarginHead(nn.Module):
    """Class-weight head returning margin-adjusted logits for plain cross-entropy.

    ``kind="adaface"`` (default, Kim et al. CVPR 2022): the margin adapts to the feature norm.
    The batch mean and std of the (clipped, detached) norms are kept as moving averages with
    momentum ``t_alpha``; a sample's norm, z-scored with them, scaled by ``h`` and clipped to
    [-1, 1], gives ``g``; the target logit becomes ``s * (cos(theta - m*g) - (m + m*g))``.
    ``"arcface"`` uses ``cos(theta + m)``, ``"cosface"`` ``cos(theta) - m``.
    Defaults are the AdaFace paper's: m = 0.4, h = 0.333, s = 64, t_alpha = 0.01.

    forward(embeddings [B, E] (L2-normalised), norms [B, 1], labels [B]) -> logits [B, C].
    """

    def __init__(self, embedding_size: int, num_classes: int, kind: str = "adaface", m: float = 0.4,
                 h: float = 0.333, s: float = 64.0, t_alpha: float = 0.01) -> None:
        super().__init__()
        if kind not in MARGIN_KINDS:
            raise ValueError(f"unknown margin head {kind!r}; expected one of {MARGIN_KINDS}")
        if num_classes < 2:
            raise ValueError(f"a margin head needs at least 2 classes, got {num_classes}")
        self.kind, self.m, self.h, self.s, self.t_alpha = kind, m, h, s, t_alpha
        self.num_classes = num_classes
        self.kernel = nn.Parameter(torch.empty(embedding_size, num_classes))
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.kernel, std=0.01)
        self.batch_mean.fill_(20.0)
        self.batch_std.fill_(100.0)

    @torch.no_grad()
    def init_centres(self, centres: torch.Tensor) -> None:
        """Start each class centre at a given direction, centres [C, E] (e.g. the mean pretrained
        embedding of each identity), so a pretrained embedding starts with sensible logits
        instead of being pulled towards random centres."""
        if centres.shape != (self.num_classes, self.kernel.shape[0]):
            raise ValueError(f"centres must be [{self.num_classes}, {self.kernel.shape[0]}], got {list(centres.shape)}")
        self.kernel.copy_(F.normalize(centres.float(), dim=1).T.to(self.kernel))

    def forward(self, embeddings: torch.Tensor, norms: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = (embeddings.float() @ F.normalize(self.kernel.float(), dim=0)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = F.one_hot(labels, self.num_classes).bool()
        if self.kind == "cosface":
            return self.s * torch.where(target, cosine - self.m, cosine)
        if self.kind == "arcface":
            theta = torch.acos(cosine)
            return self.s * torch.where(target, torch.cos((theta + self.m).clamp(max=math.pi - 1e-4)), cosine)
        safe_norms = norms.detach().float().clamp(0.001, 100)
        if self.training:
            with torch.no_grad():
                mean, std = safe_norms.mean(), safe_norms.std() if safe_norms.numel() > 1 else torch.zeros(())
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        g = ((safe_norms - self.batch_mean) / (self.batch_std + 1e-3) * self.h).clamp(-1, 1)  # [B, 1]
        theta = torch.acos(cosine)
        angular = torch.cos((theta - self.m * g).clamp(1e-3, math.pi - 1e-3))
        adjusted = angular - (self.m + self.m * g)
        return self.s * torch.where(target, adjusted, cosine)


class QAConvPairLoss(nn.Module):
    """Binary cross-entropy of the (occlusion-weighted) QAConv scores of every pair in a batch
    against same-identity labels, optionally plus a hard-pair triplet term (margin ranking of the
    hardest positive against the hardest negative of each face). Self-pairs are left out.

    forward(feature_map [B, C, H, W], labels [B], occ [B, 1, H, W] or None)
        -> (loss, pair accuracy: fraction of faces whose lowest positive score beats their highest
        negative one).
    """

    def __init__(self, matcher: QAConv, triplet_margin: float | None = None, triplet_weight: float = 1.0) -> None:
        super().__init__()
        self.matcher = matcher
        self.triplet_margin, self.triplet_weight = triplet_margin, triplet_weight

    def forward(self, feature_map: torch.Tensor, labels: torch.Tensor,
                occ: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.matcher(feature_map, feature_map, occ, occ).float()
        same = labels[:, None] == labels[None, :]
        others = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        loss = F.binary_cross_entropy_with_logits(scores[others], same[others].float())
        positive, negative = same & others, ~same
        hardest_positive = scores.masked_fill(~positive, float("inf")).amin(dim=1)
        hardest_negative = scores.masked_fill(~negative, float("-inf")).amax(dim=1)
        valid = positive.any(dim=1) & negative.any(dim=1)
        if self.triplet_margin is not None and valid.any():
            gap = hardest_positive[valid] - hardest_negative[valid]
            loss = loss + self.triplet_weight * F.relu(self.triplet_margin - gap).mean()
        with torch.no_grad():
            accuracy = (hardest_positive > hardest_negative)[valid].float().mean() if valid.any() else scores.new_zeros(())
        return loss, accuracy


def occlusion_loss(predicted: torch.Tensor, mask: torch.Tensor, mode: str = "area") -> torch.Tensor:
    """MSE between predicted maps [B, 1, h, w] and ground-truth masks [B, 1, H, W] brought to the
    map's size by :func:`occface.data.downsample_mask` (the same function the evaluation uses)."""
    target = downsample_mask(mask, tuple(predicted.shape[-2:]), mode).to(predicted.device)
    return F.mse_loss(predicted.float(), target)


def embedding_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between unit embeddings [B, E] of the student and the (frozen) teacher."""
    return (1 - (student.float() * teacher.float()).sum(1)).mean()


def visible_map_distillation(student: torch.Tensor, teacher: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
    """Per-location ``1 - cos`` between feature maps [B, C, H, W] (student on the occluded face,
    teacher on the clean one), averaged with weights ``visibility`` [B, 1, H, W] (ground truth at
    the map's size): where the face shows, its features should stay those of the clean face;
    where it is hidden, nothing is asked."""
    cosine = (F.normalize(student.float(), dim=1) * F.normalize(teacher.float(), dim=1)).sum(1, keepdim=True)
    weights = visibility.float()
    return ((1 - cosine) * weights).sum() / weights.sum().clamp_min(1e-6)


@dataclass
class LossWeights:
    """Weights of the total loss; the occlusion weight ramps linearly from ``occlusion_start`` to
    ``occlusion`` over ``occlusion_warmup_steps`` steps (0: no ramp)."""

    adaface: float = 1.0
    qaconv: float = 1.0
    occlusion: float = 1.0
    occlusion_start: float = 0.1
    occlusion_warmup_steps: int = 0
    distill: float = 0.0
    distill_map: float = 0.0

    def at(self, step: int) -> dict[str, float]:
        occ = self.occlusion
        if self.occlusion_warmup_steps > 0:
            ramp = min(1.0, step / self.occlusion_warmup_steps)
            occ = self.occlusion_start + (self.occlusion - self.occlusion_start) * ramp
        weights = {"adaface": self.adaface, "qaconv": self.qaconv, "occlusion": occ}
        if self.distill:
            weights["distill"] = self.distill
        if self.distill_map:
            weights["distill_map"] = self.distill_map
        return weights
