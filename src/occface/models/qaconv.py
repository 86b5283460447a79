"""QAConv matching of two sets of face feature maps, optionally weighted by visibility maps.

Score semantics follow QAConv (Liao & Shao, ECCV 2020; reference ``qaconv.py`` v1.2):

1. Each feature map ``[C, H, W]`` is L2-normalised per location, giving ``HW`` unit vectors.
2. For a probe ``p`` and a gallery face ``g`` the correlation of every probe location ``i`` with
   every gallery location ``j`` is ``S[i, j] = <f_p[i], f_g[j]>``.
3. Occlusion weighting (the spec's "scaling" method): ``S[i, j] *= O_p[i] * O_g[j]`` before any
   pooling, so only visible-to-visible evidence counts. Because the weight factorises over
   ``i`` and ``j`` it is applied by scaling the normalised features, at no extra cost.
4. Max pooling both ways: for each gallery location the max over probe locations, and for each
   probe location the max over gallery locations; concatenated as
   ``[gallery-location maxima (HW), probe-location maxima (HW)]``.
5. ``bn`` (BatchNorm1d(1) over all 2HW values) -> ``fc`` (Linear(2HW, 1)) -> ``logit_bn``
   (BatchNorm1d(1)) gives one logit per pair: a ``[P, G]`` matrix.

One addition to the reference: ``visibility_fc`` (Linear(2HW, 1), no bias, zero at start) adds
``u . [O_g, O_p]`` to the logit before ``logit_bn``. With step 3 alone an occluded location's
maximum drops to 0, which ``fc`` reads as a strong mismatch, and how strong depends on how much
of each face the occlusion head saw; ``u_k = -w_k z_k`` learns each location's expected maximum
``z_k``, so a hidden location counts as missing evidence instead. It is a per-face term (it
cannot compare identities) and vanishes (a constant) when no maps are given; at zero, as in
models saved before it existed, scores are exactly the reference's.

``forward`` is differentiable and meant for training batches; its backward keeps only the winning
location of each maximum, not the correlation tensor (:class:`LocationMaxima`). ``score_all``
scores large sets in memory-bounded blocks under inference mode and equals ``forward`` in eval mode.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import check_cpu_bf16

GalleryChunk = Union[torch.Tensor, tuple[torch.Tensor, Union[torch.Tensor, None]]]

# On CPU a correlation block of about 1M elements (4 MB in fp32) stays in cache while it is reduced,
# which keeps the matmul near peak; larger blocks spill to memory and run 20-30% slower.
CPU_BLOCK_ELEMENTS = 1 << 20
# On GPU the training forward's blocks are bounded by memory, not cache: 64M elements, 256 MB in float32.
GPU_BLOCK_ELEMENTS = 1 << 26


def _aligned(count: int, hw: int) -> int:
    """Round a chunk's face count down so that count * HW is a multiple of 16 where possible:
    matmuls with such row counts run 10-30% faster on CPU (e.g. 8x8 faces at 14x14: 180 GFLOP/s,
    7x7 faces: 127 GFLOP/s on a 2-core EPYC)."""
    multiple = 16 // math.gcd(hw, 16)
    return max(1, count - count % multiple if count >= multiple else count)


class LocationMaxima(torch.autograd.Function):
    """Location maxima ([P, HW, C] x [G, HW, C] -> [P, G, 2HW]) with a lean backward.

    Plain autograd keeps the whole [P, HW, G, HW] correlation tensor for the backward of the
    two max reductions and then builds a dense gradient of the same size: at 14x14 maps and a
    batch of 48 faces that is 88M elements (354 MB) twice per step, and on CPU the memory traffic
    costs more than the matmul itself. Only the 2HW winning location pairs of each face pair get
    a gradient, so the forward pass computes the correlations in probe blocks, keeps just the
    maxima and their argmax indices, and the backward pass routes the gradient through those
    indices with one sparse [P*HW, G*HW] matrix (2 * P * G * HW non-zeros) times the features.
    Ties go to one of the tied locations (plain autograd splits them), which only matters for
    exactly equal correlations.

    ``apply(a, b, same)``: with ``same=True`` (``b`` is ``a``, as in a training batch scored
    against itself) the correlations are symmetric, so the probe maxima of pair (p, g) are the
    gallery maxima of pair (g, p) and only one max reduction is computed.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, same: bool = False) -> torch.Tensor:  # type: ignore[override]
        num_probe, hw = a.shape[:2]
        num_gallery = b.shape[0]
        block = CPU_BLOCK_ELEMENTS if a.device.type == "cpu" else GPU_BLOCK_ELEMENTS
        step = max(1, block // (hw * num_gallery * hw))
        gallery_max, probe_max, probe_winner, gallery_winner = [], [], [], []
        for start in range(0, num_probe, step):
            rows = a[start : start + step]
            corr = QAConv.correlations(rows, b)
            values, winners = corr.max(dim=1)  # [p, G, HW]: best probe location per gallery location
            gallery_max.append(values)
            probe_winner.append(winners)
            if not same:
                values, winners = corr.max(dim=3)  # [p, HW, G]: best gallery location per probe location
                probe_max.append(values.transpose(1, 2))
                gallery_winner.append(winners.transpose(1, 2))
        gallery_max, probe_winner = torch.cat(gallery_max), torch.cat(probe_winner)
        if same:
            probe_max, gallery_winner = gallery_max.transpose(0, 1), probe_winner.transpose(0, 1)
        else:
            probe_max, gallery_winner = torch.cat(probe_max), torch.cat(gallery_winner)
        ctx.save_for_backward(a, b, torch.cat((probe_winner, gallery_winner), dim=2))
        return torch.cat((gallery_max, probe_max), dim=2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        a, b, winners = ctx.saved_tensors  # winners: [P, G, 2HW] winning location on the other side
        num_probe, hw, channels = a.shape
        num_gallery = b.shape[0]
        device = grad.device
        p = torch.arange(num_probe, device=device).view(-1, 1, 1)
        g = torch.arange(num_gallery, device=device).view(1, -1, 1)
        loc = torch.arange(hw, device=device).view(1, 1, -1)
        # Gallery maxima: (probe location = winner, gallery location = loc); probe maxima: the reverse.
        rows = torch.cat(((p * hw + winners[..., :hw]).flatten(), (p * hw + loc).expand(num_probe, num_gallery, hw).flatten()))
        cols = torch.cat(((g * hw + loc).expand(num_probe, num_gallery, hw).flatten(), (g * hw + winners[..., hw:]).flatten()))
        work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        values = torch.cat((grad[..., :hw].flatten(), grad[..., hw:].flatten())).to(work)
        corr_grad = torch.sparse_coo_tensor(torch.stack((rows, cols)), values, (num_probe * hw, num_gallery * hw),
                                            check_invariants=False)
        grad_a = torch.sparse.mm(corr_grad, b.reshape(-1, channels).to(work)).view(num_probe, hw, channels)
        grad_b = torch.sparse.mm(corr_grad.t(), a.reshape(-1, channels).to(work)).view(num_gallery, hw, channels)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), None


class QAConv(nn.Module):
    """Query-adaptive convolution matcher.

    Args:
        num_features: channels C of the feature maps.
        height: rows H of the feature maps (7 at block 4, 14 at block 3).
        width: columns W of the feature maps.
    """

    def __init__(self, num_features: int, height: int, width: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.height = height
        self.width = width
        self.bn = nn.BatchNorm1d(1)
        self.fc = nn.Linear(2 * height * width, 1)
        self.visibility_fc = nn.Linear(2 * height * width, 1, bias=False)
        self.logit_bn = nn.BatchNorm1d(1)
        self.reset_parameters()

    @property
    def num_locations(self) -> int:
        return self.height * self.width

    def reset_running_stats(self) -> None:
        """Forget the BatchNorm running statistics (for re-use on another dataset)."""
        self.bn.reset_running_stats()
        self.logit_bn.reset_running_stats()

    def reset_parameters(self) -> None:
        """BatchNorms to identity; ``fc`` to the plain mean of the 2HW maxima (weight 1/2HW, bias 0),
        so an untrained matcher scores pairs by their average best-match similarity;
        ``visibility_fc`` to zero (the reference's scores)."""
        self.bn.reset_parameters()
        self.logit_bn.reset_parameters()
        with torch.no_grad():
            self.fc.weight.fill_(1.0 / (2 * self.num_locations))
            self.fc.bias.zero_()
            self.visibility_fc.weight.zero_()

    # ------------------------------------------------------------------ training / small sets
    def forward(
        self,
        probe: torch.Tensor,
        gallery: torch.Tensor,
        probe_occ: torch.Tensor | None = None,
        gallery_occ: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score every probe against every gallery face.

        Args:
            probe: [P, C, H, W] feature maps.
            gallery: [G, C, H, W] feature maps.
            probe_occ: [P, 1, H, W] visibility maps (1 = visible), clamped to [0, 1]; ``None`` means
                fully visible.
            gallery_occ: [G, 1, H, W] visibility maps, as ``probe_occ``.
        Returns:
            [P, G] logits (higher = more likely the same identity).
        """
        a = self.prepare(probe, probe_occ, "probe")
        same = gallery is probe and gallery_occ is probe_occ
        b = a if same else self.prepare(gallery, gallery_occ, "gallery")
        maxima = self.location_maxima(a, b, same)  # [P, G, 2HW]
        num_probe, num_gallery = maxima.shape[:2]
        scores = self.bn(maxima.reshape(-1, 1, 2 * self.num_locations)).view(-1, 2 * self.num_locations)
        u = self.visibility_fc.weight[0]
        probe_term = self.visibility_term(probe, probe_occ, u[self.num_locations :], "probe")
        gallery_term = self.visibility_term(gallery, gallery_occ, u[: self.num_locations], "gallery")
        scores = self.fc(scores).view(num_probe, num_gallery) + probe_term[:, None] + gallery_term[None, :]
        return self.logit_bn(scores.view(-1, 1)).view(num_probe, num_gallery)

    def visibility_term(self, features: torch.Tensor, occ: torch.Tensor | None, weight: torch.Tensor,
                        name: str) -> torch.Tensor:
        """One side's part of the visibility term: maps [B, 1, H, W] (None = fully visible) and that
        side's half of the weights [HW] (``visibility_fc``'s, or its eval-mode copy) -> [B]."""
        weight = weight.to(features.device, torch.float32)
        if occ is None:
            return features.new_ones(features.shape[0], self.num_locations, dtype=torch.float32) @ weight
        return self._check_occ(occ, features, name).flatten(1) @ weight

    def prepare(
        self,
        features: torch.Tensor,
        occ: torch.Tensor | None = None,
        name: str = "features",
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalise [B, C, H, W] features per location, apply the visibility weights and lay them
        out as [B, HW, C]. With ``out`` (a flat buffer of at least B*HW*C elements, any dtype) the
        result is written there in place, without temporaries; otherwise it is differentiable."""
        self._check_features(features, name)
        weights = None if occ is None else self._check_occ(occ, features, name)
        if out is None:
            x = F.normalize(features.float(), dim=1)
            if weights is not None:
                x = x * weights
            return x.flatten(2).transpose(1, 2).contiguous()
        num, channels = features.shape[:2]
        x = out[: num * self.num_locations * channels].view(num, self.num_locations, channels)
        x.copy_(features.flatten(2).transpose(1, 2))
        scale = torch.linalg.vector_norm(features, dim=1, keepdim=True, dtype=torch.float32)
        scale = scale.clamp_min_(1e-12).reciprocal_()
        if weights is not None:
            scale.mul_(weights)
        return x.mul_(scale.flatten(2).transpose(1, 2).to(x.dtype))

    @staticmethod
    def correlations(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Prepared probe [P, HW, C] and gallery [G, HW, C] -> correlations [P, HW, G, HW]
        (probe location on dim 1, gallery location on dim 3), written into the flat ``out`` if given."""
        num_probe, hw, channels = a.shape
        a2, b2 = a.reshape(-1, channels), b.reshape(-1, channels)
        if out is None:
            corr = a2 @ b2.T
        else:
            corr = torch.matmul(a2, b2.T, out=out[: a2.shape[0] * b2.shape[0]].view(a2.shape[0], b2.shape[0]))
        return corr.view(num_probe, hw, b.shape[0], hw)

    def location_maxima(self, a: torch.Tensor, b: torch.Tensor, same: bool = False) -> torch.Tensor:
        """Prepared probe [P, HW, C] and gallery [G, HW, C] -> [P, G, 2HW] location maxima:
        for each gallery location the best probe location, then for each probe location the best
        gallery location. ``same``: ``b`` is ``a``. Differentiable; see :class:`LocationMaxima`."""
        return LocationMaxima.apply(a, b, same)

    # ------------------------------------------------------------------ large sets
    @torch.inference_mode()
    def score_all(
        self,
        probe: torch.Tensor,
        gallery: torch.Tensor | Iterable[GalleryChunk],
        probe_occ: torch.Tensor | None = None,
        gallery_occ: torch.Tensor | None = None,
        *,
        memory_budget_mb: float = 512.0,
        block_elements: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Score large sets in blocks, never holding more than one block of correlations.

        Always scores with the BatchNorms' running statistics, as ``forward`` does in eval mode.

        Args:
            probe: [P, C, H, W]; probe_occ: [P, 1, H, W] or None.
            gallery: [G, C, H, W] (with gallery_occ [G, 1, H, W] or None), or an iterable of
                chunks, each a [g, C, H, W] tensor or a (features, occ-or-None) pair, so a
                gallery too large for memory can be streamed from disk.
            memory_budget_mb: bound on the working memory of one correlation block.
            block_elements: correlation elements per block; default: cache-sized on CPU
                (``CPU_BLOCK_ELEMENTS``), as large as the budget allows on GPU.
            device: where to compute (default: the probe's device). Inputs may live elsewhere,
                e.g. a CPU or fp16 gallery scored on a GPU; each chunk is moved when needed.
            dtype: matmul dtype (default float32). bfloat16 runs on GPUs and on CPUs with native
                bf16 (:func:`occface.precision.compute_dtype` picks it), float16 on GPUs. The
                normalisation, the maxima's affine head and the scores are float32 whatever it is.
            progress: show a progress bar over gallery chunks.
        Returns:
            [P, G] float32 logits on ``device``.
        """
        device = torch.device(device) if device is not None else probe.device
        dtype = dtype or torch.float32
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("score_all: float16 matmuls are for GPUs; on CPU use float32 or bfloat16")
        check_cpu_bf16(dtype, device, "score_all")
        hw, channels = self.num_locations, self.num_features
        weight, visibility_weight, bias = (t.to(device) for t in self._eval_affine())
        gallery_weight, probe_weight = weight[:hw], weight[hw:]

        probe = probe.to(device)
        probe_occ = None if probe_occ is None else probe_occ.to(device)
        probe_term = self.visibility_term(probe, probe_occ, visibility_weight[hw:], "probe") + bias
        num_probe = probe.shape[0]
        element_bytes = torch.finfo(dtype).bits // 8
        budget_elements = int(memory_budget_mb * 2**20) // element_bytes
        if block_elements is None:
            block_elements = CPU_BLOCK_ELEMENTS if device.type == "cpu" else budget_elements
        block_elements = max(hw * hw, min(block_elements, budget_elements))
        probe_step = min(num_probe, _aligned(math.isqrt(block_elements) // hw, hw))
        gallery_step = _aligned(block_elements // (probe_step * hw * hw), hw)

        # Every large tensor is allocated once, up front: on CPU, repeated large allocations
        # interleaved with small ones fragment the heap and the resident set keeps growing.
        a = self.prepare(
            probe, probe_occ, "probe", out=torch.empty(num_probe * hw * channels, device=device, dtype=dtype)
        )
        gallery_buffer = torch.empty(gallery_step * hw * channels, device=device, dtype=dtype)
        corr_buffer = torch.empty(probe_step * gallery_step * hw * hw, device=device, dtype=dtype)
        total = gallery.shape[0] if isinstance(gallery, torch.Tensor) else None
        scores = torch.empty(num_probe, total, device=device) if total is not None else None
        columns: list[torch.Tensor] = []
        done = 0
        chunks = self._gallery_chunks(gallery, gallery_occ, gallery_step)
        if progress:
            from ..progress import progress_bar

            chunks = progress_bar(chunks, total=None if total is None else math.ceil(total / gallery_step),
                                  desc="QAConv scoring", unit="chunk")
        for features, occ in chunks:
            features, occ = features.to(device), None if occ is None else occ.to(device)
            b = self.prepare(features, occ, "gallery", gallery_buffer)
            gallery_term = self.visibility_term(features, occ, visibility_weight[:hw], "gallery")
            column = scores[:, done : done + b.shape[0]] if scores is not None else torch.empty(num_probe, b.shape[0], device=device)
            for start in range(0, num_probe, probe_step):
                corr = self.correlations(a[start : start + probe_step], b, corr_buffer)
                column[start : start + probe_step] = (
                    corr.amax(dim=1).float() @ gallery_weight
                    + (probe_weight @ corr.amax(dim=3).float())
                    + probe_term[start : start + probe_step, None]
                    + gallery_term
                )
            if scores is None:
                columns.append(column)
            done += b.shape[0]
        if scores is not None:
            return scores
        return torch.cat(columns, dim=1) if columns else torch.empty(num_probe, 0, device=device)

    @torch.inference_mode()
    def score_pairs(
        self,
        probe: torch.Tensor,
        gallery: torch.Tensor,
        probe_occ: torch.Tensor | None = None,
        gallery_occ: torch.Tensor | None = None,
        *,
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Scores of aligned pairs (probe[i] with gallery[i]), as ``score_all`` would give them:
        [N, C, H, W] x 2 (+ maps [N, 1, H, W] or None) -> [N] float32 logits (running statistics).
        ``dtype``: of the correlations, as in ``score_all``."""
        dtype = dtype or torch.float32
        check_cpu_bf16(dtype, probe.device, "score_pairs")
        if probe.shape[0] != gallery.shape[0]:
            raise ValueError(f"score_pairs needs as many probes as gallery faces, got {probe.shape[0]} and {gallery.shape[0]}")
        hw = self.num_locations
        weight, visibility_weight, bias = (t.to(probe.device) for t in self._eval_affine())
        out = []
        for start in range(0, probe.shape[0], batch_size):
            end = start + batch_size
            p_occ = None if probe_occ is None else probe_occ[start:end]
            g_occ = None if gallery_occ is None else gallery_occ[start:end]
            a = self.prepare(probe[start:end], p_occ, "probe")
            b = self.prepare(gallery[start:end], g_occ, "gallery")
            corr = torch.bmm(a.to(dtype), b.to(dtype).transpose(1, 2)).float()  # [n, HW probe, HW gallery]
            probe_term = self.visibility_term(probe[start:end], p_occ, visibility_weight[hw:], "probe")
            gallery_term = self.visibility_term(gallery[start:end], g_occ, visibility_weight[:hw], "gallery")
            out.append(corr.amax(dim=1) @ weight[:hw] + corr.amax(dim=2) @ weight[hw:] + probe_term + gallery_term + bias)
        return torch.cat(out) if out else probe.new_zeros(0)

    def _eval_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """In eval mode the logit is affine in the 2HW maxima and the 2HW visibilities: return
        (weight [2HW] on the maxima, weight [2HW] on [O_g, O_p], bias [])."""

        def scale_shift(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
            if bn.running_mean is None or bn.running_var is None:
                raise RuntimeError("QAConv.score_all needs BatchNorm running statistics (track_running_stats=True)")
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
            return scale.float().squeeze(), shift.float().squeeze()

        in_scale, in_shift = scale_shift(self.bn)
        out_scale, out_shift = scale_shift(self.logit_bn)
        fc_weight = self.fc.weight.float().squeeze(0)
        weight = out_scale * in_scale * fc_weight
        bias = out_scale * (in_shift * fc_weight.sum() + self.fc.bias.float().squeeze()) + out_shift
        visibility_weight = out_scale * self.visibility_fc.weight.float().squeeze(0)
        return weight.detach(), visibility_weight.detach(), bias.detach()

    def _gallery_chunks(
        self, gallery: torch.Tensor | Iterable[GalleryChunk], gallery_occ: torch.Tensor | None, step: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if isinstance(gallery, torch.Tensor):
            if gallery_occ is not None and gallery_occ.shape[0] != gallery.shape[0]:
                raise ValueError(
                    f"gallery_occ has {gallery_occ.shape[0]} maps for {gallery.shape[0]} gallery feature maps"
                )
            source: Iterable[GalleryChunk] = [(gallery, gallery_occ)]
        elif gallery_occ is not None:
            raise ValueError("pass gallery occlusion maps inside the chunks when the gallery is an iterable")
        else:
            source = gallery
        for chunk in source:
            features, occ = chunk if isinstance(chunk, tuple) else (chunk, None)
            for start in range(0, features.shape[0], step):
                yield features[start : start + step], None if occ is None else occ[start : start + step]

    # ------------------------------------------------------------------ input checks
    def _check_features(self, features: torch.Tensor, name: str) -> None:
        expected = (self.num_features, self.height, self.width)
        if features.dim() != 4 or tuple(features.shape[1:]) != expected:
            raise ValueError(
                f"QAConv {name} features must be [B, {self.num_features}, {self.height}, {self.width}], "
                f"got {list(features.shape)}"
            )

    def _check_occ(self, occ: torch.Tensor, features: torch.Tensor, name: str) -> torch.Tensor:
        expected = [features.shape[0], 1, self.height, self.width]
        if list(occ.shape) != expected:
            raise ValueError(
                f"QAConv {name}_occ must be {expected} (one map per face at the feature map's resolution; "
                f"resize ground-truth masks with occface's mask downsampling first), got {list(occ.shape)}"
            )
        return occ.to(device=features.device, dtype=torch.float32).clamp(0.0, 1.0)
