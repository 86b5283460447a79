"""The frozen teacher's distillation targets, computed once per training image instead of every step.

Fine-tuning distils from a frozen copy of the pretrained network: its embedding (and feature map)
of each face without its synthesised occluder. Without augmentations beyond occluders and mirroring
(``data.crop``, ``data.low_res``, ``data.photometric`` at 0), that face is the stored image or its
mirror, so the teacher's outputs are a function of (image, view): :class:`TeacherCache` computes
them for every training image (and its mirror when ``data.flip`` > 0) in one pass before training
and looks them up by the batch's ``index`` and ``view`` (:class:`occface.data.FaceSample`). 705
steps of 64 faces see 45k faces; CFP and faces112's training people are 8.7k images.

Held in memory: embeddings in fp32, feature maps in fp16 (MobileFaceNet's 512x7x7 maps: 50 kB an
image, 0.44 GB for 8.7k images; the map targets differ from fp32 ones by < 1e-3 of their scale).
"""
from __future__ import annotations

import logging
import time

import torch

from ..data.datasets import FaceDataset
from ..data.images import resize_image, to_tensor

log = logging.getLogger(__name__)


class TeacherCache:
    """Targets of ``teacher`` (an :class:`~occface.models.OccFaceModel` or an ONNX
    :class:`~occface.onnx_model.OnnxFaceModel`: images [B, 3, S, S] RGB in [0, 1] -> an output with
    ``embedding`` [B, E] and ``feature_map`` [B, C, H, W]) for every image of ``dataset`` and, with
    ``mirrors``, its mirror image. ``keep_maps``: also the feature maps (for map distillation)."""

    def __init__(self, teacher, dataset: FaceDataset, mirrors: bool = False, keep_maps: bool = True,
                 batch_size: int = 64, progress: bool = False) -> None:
        started = time.perf_counter()
        views = 2 if mirrors else 1
        self.embedding: torch.Tensor | None = None
        self.feature_map: torch.Tensor | None = None
        count = len(dataset)
        starts = range(0, count, batch_size)
        if progress:
            from ..progress import progress_bar

            starts = progress_bar(starts, desc="teacher", unit="batch")
        for start in starts:
            part = range(start, min(start + batch_size, count))
            faces = torch.stack([to_tensor(resize_image(dataset.read(i).image, dataset.input_size)) for i in part])
            for view in range(views):
                images = faces.flip(3) if view == 1 else faces
                with torch.inference_mode():
                    out = teacher(images.contiguous(memory_format=torch.channels_last))
                if self.embedding is None:
                    self.embedding = torch.empty(count, views, out.embedding.shape[1])
                    if keep_maps:
                        self.feature_map = torch.empty(count, views, *out.feature_map.shape[1:], dtype=torch.float16)
                self.embedding[start:start + len(part), view] = out.embedding.float()
                if keep_maps:
                    self.feature_map[start:start + len(part), view] = out.feature_map.to(torch.float16)
        self.views = views
        self.seconds = time.perf_counter() - started
        log.info("teacher targets cached: %d images x %d view(s) in %.0f s (%.1f MB)", count, views, self.seconds,
                 self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.embedding, self.feature_map) if t is not None)

    def class_means(self, targets: list[int], per_class: int = 8) -> torch.Tensor:
        """[C, E]: each identity's mean cached embedding (as stored, the first ``per_class`` images of
        it), normalised: where the teacher puts each identity, for a margin head's class centres."""
        labels = torch.as_tensor(targets)
        classes = int(labels.max()) + 1
        sums = torch.zeros(classes, self.embedding.shape[-1])
        counts = torch.zeros(classes)
        for index, label in enumerate(targets):
            if label >= 0 and counts[label] < per_class:
                sums[label] += self.embedding[index, 0]
                counts[label] += 1
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} identities have no image to start their class centre from")
        return torch.nn.functional.normalize(sums, dim=1)

    def targets(self, index: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding [B, E] fp32, feature map [B, C, H, W] fp32 or None) of the faces ``index`` [B]
        seen as ``view`` [B] (0 as stored, 1 mirrored)."""
        index, view = index.long().cpu(), view.long().cpu()
        if (view < 0).any() or (view >= self.views).any():
            raise ValueError(f"teacher cache: views {sorted(set(view.tolist()))} requested, it holds {self.views} "
                             "(the dataset must set FaceSample.view: teacher_views=True)")
        embedding = self.embedding[index, view]
        maps = self.feature_map[index, view].float() if self.feature_map is not None else None
        return embedding, maps


def cache_fits(crop: float, low_res: float, photometric: float) -> list[str]:
    """The augmentations that change a face beyond mirroring it (a cache cannot hold their results)."""
    return [name for name, value in (("data.crop", crop), ("data.low_res", low_res),
                                     ("data.photometric", photometric)) if value > 0]
