"""An occface model whose network runs in ONNX Runtime.

``occface export`` (:mod:`occface.export`) writes the network of a model folder (backbone +
occlusion head) as one ONNX graph. Its input is what the weights see, ``images`` float32
``[batch, 3, S, S]`` in the weights' colour order, normalised as ``(x - mean) / std`` from [0, 1];
its outputs are ``embedding`` [batch, E] (unit norm), ``norm`` [batch, 1], ``feature_map``
[batch, C, H, W] and ``occlusion`` [batch, 1, H, W] (1 = visible). The graph's metadata names the
convention (``color_space``, ``input_mean``, ``input_std``) and the model it was exported from.

:class:`OnnxFaceModel` takes RGB in [0, 1] like :class:`~occface.models.OccFaceModel` and applies
the graph's convention itself, so occface's ONNX path cannot be fed wrongly; the QAConv matcher
and the calibration come from the model folder, as with PyTorch. It has the interface the scoring
path uses (``config``, ``qaconv``, calling it, ``fused_embedding``), so evaluation, matching,
enrolment and search run unchanged on either runtime (:func:`load_face_model`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..data.images import file_sha256
from ..errors import InputError
from ..models.convention import InputConvention
from ..models.occface import WEIGHTS_FILE, ModelConfig, OccFaceModel, OccFaceOutput, feature_shape, load_matcher

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx")
GRAPH_FORMAT = "occface-network"
# Bumped whenever the graph's inputs, outputs or metadata change meaning.
GRAPH_FORMAT_VERSION = 1
GRAPH_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAMES = ("embedding", "norm", "feature_map", "occlusion")
OPTIMIZATIONS = ("disable", "basic", "extended", "all")


def graph_metadata(config: ModelConfig, weights_sha256: str) -> dict[str, str]:
    """The ONNX metadata of a model's graph (string values; lists and numbers as JSON)."""
    from .. import __version__

    channels, side = feature_shape(config)
    convention = config.convention
    return {
        "occface.format": GRAPH_FORMAT,
        "occface.format_version": str(GRAPH_FORMAT_VERSION),
        "occface.version": __version__,
        "arch": config.arch,
        "feature_level": config.feature_level,
        "input_size": str(config.input_size),
        "width": json.dumps(config.width),
        "feature_channels": str(channels),
        "feature_size": str(side),
        "color_space": convention.color_space,
        "input_mean": json.dumps(list(convention.mean)),
        "input_std": json.dumps(list(convention.std)),
        "input": (f"{INPUT_NAME}: float32 [batch, 3, {config.input_size}, {config.input_size}], aligned faces in "
                  f"{convention.color_space} order, (x - input_mean) / input_std of pixel values scaled to [0, 1]"),
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "weights_sha256": weights_sha256,
    }


def read_graph_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an ONNX file, checked to be an occface network graph this version reads."""
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file (`occface export --model DIR` writes DIR/{GRAPH_FILE})")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # onnx raises DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX file ({type(error).__name__}: {error})") from error
    metadata = {p.key: p.value for p in graph.metadata_props}
    if metadata.get("occface.format") != GRAPH_FORMAT:
        raise InputError(f"{path}: not an occface network graph (no occface metadata); export one with occface export")
    version = metadata.get("occface.format_version")
    if version != str(GRAPH_FORMAT_VERSION):
        raise InputError(f"{path}: graph format version {version} (occface {metadata.get('occface.version')}); this "
                         f"occface reads version {GRAPH_FORMAT_VERSION}: export the model again")
    return metadata


def check_graph_fits(metadata: dict[str, str], config: ModelConfig, model_dir: Path, path: Path) -> None:
    """Refuse a graph of another shape, input convention or weights than the model folder's."""
    expected = graph_metadata(config, file_sha256(model_dir / WEIGHTS_FILE))
    keys = ("arch", "feature_level", "input_size", "width", "feature_channels", "feature_size", "color_space",
            "input_mean", "input_std")
    differ = [f"{k} {metadata.get(k)} vs {expected[k]}" for k in keys if metadata.get(k) != expected[k]]
    if differ:
        raise InputError(f"{path}: the graph does not fit the model in {model_dir} (graph vs model: "
                         f"{'; '.join(differ)}): export this model again")
    if metadata.get("weights_sha256") != expected["weights_sha256"]:
        raise InputError(f"{path}: exported from other weights than {model_dir / WEIGHTS_FILE} (sha256 "
                         f"{str(metadata.get('weights_sha256'))[:16]}... vs {expected['weights_sha256'][:16]}...): "
                         "export this model again")


def require(name: str):
    """Import ``onnx`` or ``onnxruntime`` (the optional ``onnx`` extra), or say how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise InputError(f"ONNX export and the ONNX runtime need {name}: pip install 'occface[onnx]'") from error


def inference_session(path: str | Path, threads: int | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU session. ``threads``: intra-op threads (None: onnxruntime's default, one
    per physical core); ``optimization``: the graph optimisation level, one of OPTIMIZATIONS."""
    ort = require("onnxruntime")
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"optimization must be one of {OPTIMIZATIONS}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxFaceModel:
    """The network of ``model_dir`` run from its exported graph (``onnx_path``, default
    ``model_dir/model.onnx``) in ONNX Runtime, with the folder's QAConv matcher and calibration.

    Calling it maps images [B, 3, S, S] (RGB in [0, 1], any device; results on the CPU) to an
    :class:`~occface.models.OccFaceOutput`, like :class:`~occface.models.OccFaceModel`. The network
    runs in fp32 whatever the precision setting (which still governs QAConv's correlations)."""

    runtime = "onnx"

    def __init__(self, model_dir: str | Path, onnx_path: str | Path | None = None, threads: int | None = None,
                 optimization: str = "all") -> None:
        self.model_dir = Path(model_dir)
        self.onnx_path = Path(onnx_path) if onnx_path is not None else self.model_dir / GRAPH_FILE
        self.config, self.qaconv = load_matcher(self.model_dir)
        self.metadata = read_graph_metadata(self.onnx_path)
        check_graph_fits(self.metadata, self.config, self.model_dir, self.onnx_path)
        convention = InputConvention(self.metadata["color_space"], json.loads(self.metadata["input_mean"]),
                                     json.loads(self.metadata["input_std"]))
        self._bgr = convention.color_space == "BGR"
        self._mean = np.asarray(convention.mean, np.float32).reshape(1, 3, 1, 1)
        self._std = np.asarray(convention.std, np.float32).reshape(1, 3, 1, 1)
        self.session = inference_session(self.onnx_path, threads, optimization)
        names = [o.name for o in self.session.get_outputs()]
        if tuple(names) != OUTPUT_NAMES or [i.name for i in self.session.get_inputs()] != [INPUT_NAME]:
            raise InputError(f"{self.onnx_path}: graph inputs/outputs {[i.name for i in self.session.get_inputs()]} -> "
                             f"{names}, expected ['{INPUT_NAME}'] -> {list(OUTPUT_NAMES)}")

    def __repr__(self) -> str:
        return f"OnnxFaceModel({self.config.arch}, {self.config.feature_level}, graph={str(self.onnx_path)!r})"

    # The parts of the nn.Module interface the scoring path calls.
    def eval(self) -> "OnnxFaceModel":
        """Itself (an ONNX graph has no training mode), as ``nn.Module.eval`` returns the module."""
        return self

    def to(self, device: str | torch.device) -> "OnnxFaceModel":
        """Itself: ONNX Runtime runs on the CPU here; another device is logged and ignored."""
        if torch.device(device).type != "cpu":
            log.warning("the ONNX runtime runs on the CPU; %s is ignored", device)
        return self

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        """images float32 [B, 3, S, S] RGB in [0, 1] -> the graph's outputs (numpy, OUTPUT_NAMES)."""
        size = self.config.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise InputError(f"{self.onnx_path}: the graph takes faces [batch, 3, {size}, {size}], got {list(images.shape)}")
        if self._bgr:
            images = images[:, ::-1]
        normalised = np.ascontiguousarray((images - self._mean) / self._std, dtype=np.float32)
        return self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: normalised})

    def __call__(self, images: torch.Tensor) -> OccFaceOutput:
        """images [B, 3, S, S] RGB in [0, 1] -> OccFaceOutput (CPU tensors, fp32)."""
        return OccFaceOutput(*(torch.from_numpy(o) for o in self.run(images.detach().float().cpu().numpy())))

    def fused_embedding(self, images: torch.Tensor, out: OccFaceOutput | None = None) -> torch.Tensor:
        """Flip-and-norm fused embeddings [B, E], as :meth:`OccFaceModel.fused_embedding`. Without
        ``out`` the faces and their mirror images run as one batch."""
        if out is None:
            both = self(torch.cat((images, images.flip(3))))
            count = len(images)
            embedding, norm = both.embedding, both.norm
            fused = embedding[:count] * norm[:count] + embedding[count:] * norm[count:]
        else:
            flipped = self(images.flip(3))
            fused = out.embedding.float() * out.norm.float() + flipped.embedding * flipped.norm
        return torch.nn.functional.normalize(fused, dim=1)


# A model whose network runs in either runtime: what the scoring path takes.
FaceModel = Union[OccFaceModel, OnnxFaceModel]


def load_face_model(model_dir: str | Path, runtime: str = "torch", onnx_path: str | Path | None = None,
                    threads: int | None = None) -> FaceModel:
    """The model of a folder with its network in PyTorch (``runtime="torch"``, the default) or in
    ONNX Runtime from its exported graph (``"onnx"``: ``onnx_path``, default ``model_dir/model.onnx``)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onnx":
        return OnnxFaceModel(model_dir, onnx_path, threads)
    if onnx_path is not None:
        raise InputError(f"{onnx_path}: an ONNX graph is used with runtime 'onnx' only")
    return OccFaceModel.from_pretrained(model_dir)
