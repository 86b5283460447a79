"""``occface export --model DIR``: the network of a model folder (backbone + occlusion head) as
one ONNX graph with a dynamic batch axis, its input convention and origin in the graph's metadata
(:mod:`occface.onnx_model` reads it). The QAConv matcher and the calibration stay in the folder.

The graph is checked before it replaces anything: ONNX's checker, then ONNX Runtime against the
eager network on a batch of faces (:func:`parity`).
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.images import file_sha256
from ..models.occface import WEIGHTS_FILE, OccFaceModel
from .onnx_model import GRAPH_FILE, require, INPUT_NAME, OUTPUT_NAMES, OnnxFaceModel, graph_metadata

DEFAULT_OPSET = 17
# Exported and eager outputs may differ by this much, relative to the largest eager value (at
# least 1): the tolerance occface's parity tests hold every backbone to.
PARITY_TOLERANCE = 1e-4


class NetworkGraph(nn.Module):
    """What is exported: normalised images [B, 3, S, S] -> (embedding [B, E], norm [B, 1],
    feature_map [B, C, H, W], occlusion [B, 1, H, W]); the input convention is left out."""

    def __init__(self, model: OccFaceModel) -> None:
        super().__init__()
        self.backbone, self.occlusion_head = model.backbone, model.occlusion_head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(images)
        return out.embedding, out.norm, out.feature_map, self.occlusion_head(out.feature_map)


@dataclass
class ExportResult:
    path: Path
    bytes: int
    faces: int
    max_difference: dict[str, float]  # per output: max |onnx - eager| / max(1, max |eager|)


def export_onnx(model_dir: str | Path, onnx_path: str | Path | None = None, opset: int = DEFAULT_OPSET,
                check_faces: torch.Tensor | None = None) -> ExportResult:
    """Export the network of ``model_dir`` to ``onnx_path`` (default ``model_dir/model.onnx``),
    atomically, after checking it against the eager network on ``check_faces`` [B, 3, S, S] (RGB
    in [0, 1]; default: 4 random images). Raises if any output differs by more than
    PARITY_TOLERANCE."""
    onnx = require("onnx")
    model_dir = Path(model_dir)
    onnx_path = Path(onnx_path) if onnx_path is not None else model_dir / GRAPH_FILE
    model = OccFaceModel.from_pretrained(model_dir)
    size = model.config.input_size
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = onnx_path.with_name(f".{onnx_path.name}.tmp")
    _torch_export(NetworkGraph(model).eval(), torch.rand(2, 3, size, size), temporary, opset)
    graph = onnx.load(str(temporary))
    onnx.checker.check_model(graph)
    metadata = graph_metadata(model.config, file_sha256(model_dir / WEIGHTS_FILE))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    graph.producer_name, graph.doc_string = "occface", metadata["input"]
    onnx.save(graph, str(temporary))
    try:
        faces = check_faces if check_faces is not None else torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        differences = parity(model, OnnxFaceModel(model_dir, temporary), faces)
        failed = {k: v for k, v in differences.items() if not v <= PARITY_TOLERANCE}
        if failed:
            raise RuntimeError(f"{onnx_path}: the exported graph differs from the eager network by {failed} "
                               f"(tolerance {PARITY_TOLERANCE}); nothing was written")
        os.replace(temporary, onnx_path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportResult(onnx_path, onnx_path.stat().st_size, len(faces), differences)


def _torch_export(network: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """torch.onnx.export with a dynamic batch axis. The TorchScript exporter where this PyTorch has
    it (exports in about a second, needs nothing beyond onnx); else the torch.export-based one."""
    batch = {0: "batch"}
    options = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset,
                   dynamic_axes={name: batch for name in (INPUT_NAME, *OUTPUT_NAMES)})
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    with warnings.catch_warnings():
        # The backbone's input checks read shapes (tracer warnings); the exporter's deprecation notice.
        warnings.simplefilter("ignore")
        with torch.inference_mode(False), torch.no_grad():
            try:
                torch.onnx.export(network, (example,), str(path), **options)
            except Exception as error:
                raise RuntimeError(f"exporting {type(network.backbone).__name__} to ONNX failed: {error}") from error


def parity(model: OccFaceModel, exported: OnnxFaceModel, faces: torch.Tensor) -> dict[str, float]:
    """Per output and for the flip-fused embedding: max |exported - eager| / max(1, max |eager|)
    on ``faces`` [B, 3, S, S] (RGB in [0, 1])."""
    model = model.eval()
    with torch.inference_mode():
        eager = model(faces)
        eager_fused = model.fused_embedding(faces, eager)
    onnx_out = exported(faces)
    pairs = {name: (getattr(eager, name), getattr(onnx_out, name)) for name in OUTPUT_NAMES}
    pairs["fused_embedding"] = (eager_fused, exported.fused_embedding(faces))
    return {name: float((b - a.float()).abs().max() / max(1.0, float(a.abs().max()))) for name, (a, b) in pairs.items()}


def describe_result(result: ExportResult) -> str:
    worst = max(result.max_difference.values())
    return (f"{result.path} ({result.bytes / 1e6:.1f} MB); ONNX Runtime vs PyTorch on {result.faces} faces: largest "
            f"difference {worst:.1e} of the output's scale (tolerance {PARITY_TOLERANCE:g})")
