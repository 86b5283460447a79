"""``occface match A B --model DIR``: every score source for one pair of faces, a decision
at the model's calibrated threshold, and a picture of the visible regions and correspondences."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.images import to_tensor
from .errors import InputError
from .models.occface import OccFaceModel
from .precision import autocast, check_cpu_bf16, compute_dtype, network_precision
from .scoring import calibrated_fused, matcher_dtype, network_input, network_key, pair_kind, predicted_occluded


@torch.inference_mode()
def match(model: OccFaceModel, first: np.ndarray, second: np.ndarray, top: int = 12, precision: str = "auto") -> dict:
    """Scores, decisions and the strongest visible-to-visible correspondences of two aligned faces,
    and whether the model sees each face as occluded. ``precision`` (:mod:`occface.precision`): of
    the network and QAConv's correlations."""
    model.eval()
    batch = network_input(torch.stack([to_tensor(first), to_tensor(second)]))
    chosen = network_precision(model, batch, precision, network_key(model))
    check_cpu_bf16(compute_dtype(chosen), "cpu", "match")
    with autocast(chosen):
        out = model(batch)
        embedding = model.fused_embedding(batch, out)
    maps, occ = out.feature_map.float(), out.occlusion.float()
    dtype = matcher_dtype(model.qaconv, maps, precision)
    scores = {
        "embedding": float(embedding[0] @ embedding[1]),
        "qaconv": float(model.qaconv.score_pairs(maps[:1], maps[1:], dtype=dtype)[0]),
        "qaconv_weighted": float(model.qaconv.score_pairs(maps[:1], maps[1:], occ[:1], occ[1:], dtype=dtype)[0]),
    }
    calibration = model.config.calibration
    hidden = predicted_occluded(occ, calibration.get("normalization", {}))
    pair_type = pair_kind(hidden[:1], hidden[1:])
    fused = calibrated_fused(model, scores, occ[:1], occ[1:])
    if fused is not None:
        scores["fused"] = float(fused[0])
    decisions = {source: scores[source] >= calibration[source]["threshold"]
                 for source in scores if isinstance(calibration.get(source), dict)}
    # Strongest weighted location pairs: correlation x O_first[i] x O_second[j].
    a = model.qaconv.prepare(maps[:1], occ[:1])[0]
    b = model.qaconv.prepare(maps[1:], occ[1:])[0]
    corr = a @ b.T  # [HW first, HW second]
    values, flat = corr.flatten().topk(min(top, corr.numel()))
    side = maps.shape[-1]
    pairs = [(int(i) // corr.shape[1], int(i) % corr.shape[1], float(v)) for i, v in zip(flat, values)]
    return {"scores": scores, "decisions": decisions, "calibration": calibration, "correspondences": pairs,
            "pair_type": str(pair_type[0]), "occluded": [bool(hidden[0]), bool(hidden[1])],
            "visibility": [occ[0, 0].numpy(), occ[1, 0].numpy()], "map_side": side}


def draw_match(first: np.ndarray, second: np.ndarray, result: dict, path: str | Path, scale: int = 3) -> Path:
    """Both faces (scaled up), each beside its visibility map, with lines for the correspondences."""
    from PIL import Image, ImageDraw

    size = first.shape[0] * scale
    side = result["map_side"]

    def panel(face: np.ndarray, visibility: np.ndarray) -> Image.Image:
        big = Image.fromarray(face).resize((size, size), Image.BICUBIC)
        heat = Image.fromarray((np.clip(visibility, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
        shade = Image.merge("RGB", (heat.point(lambda v: 255 - v), heat, Image.new("L", heat.size, 0)))
        return Image.blend(big, shade, 0.35)

    gap = 40
    canvas = Image.new("RGB", (2 * size + gap, size + 30), "white")
    canvas.paste(panel(first, result["visibility"][0]), (0, 0))
    canvas.paste(panel(second, result["visibility"][1]), (size + gap, 0))
    draw = ImageDraw.Draw(canvas)
    cell = size / side
    strongest = max((v for _, _, v in result["correspondences"]), default=1.0) or 1.0
    for i, j, value in result["correspondences"]:
        start = ((i % side + 0.5) * cell, (i // side + 0.5) * cell)
        end = (size + gap + (j % side + 0.5) * cell, (j // side + 0.5) * cell)
        strength = max(0.0, value / strongest)
        draw.line([start, end], fill=(int(255 * strength), 60, int(255 * (1 - strength))), width=2)
    text = "  ".join(f"{k}: {v:.3f}" for k, v in result["scores"].items())
    draw.text((4, size + 8), text, fill="black")
    path = Path(path)
    if path.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"{path}: cannot write a picture with the extension {path.suffix!r} (use .png or .jpg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
