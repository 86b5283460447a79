"""occface data: face and occlusion datasets, occlusion synthesis, procedural faces, sampling."""
from .datasets import ConcatFaceDataset, FaceDataset, FaceSample, ImageFolderDataset, OcclusionDataset, RawSample
from .errors import DataError, DataProblems
from .images import read_image, read_mask, to_image, to_tensor
from .masks import downsample_mask
from .procedural import ProceduralFaceDataset, ProceduralFaces
from .recordio import RecordIODataset
from .sampler import IdentityBalancedSampler
from .synth import OcclusionSynthesizer, SynthesizeOcclusion, load_overlays
from .transforms import adaface_augmentation
from .verification import ImageListDataset, PairSet, read_bin, read_pairs_txt

__all__ = [
    "ConcatFaceDataset", "DataError", "DataProblems", "FaceDataset", "FaceSample", "IdentityBalancedSampler",
    "ImageFolderDataset", "ImageListDataset", "OcclusionDataset", "OcclusionSynthesizer", "PairSet",
    "ProceduralFaceDataset", "ProceduralFaces", "RawSample", "RecordIODataset", "SynthesizeOcclusion",
    "adaface_augmentation", "downsample_mask", "load_overlays", "read_bin", "read_image", "read_mask",
    "read_pairs_txt", "to_image", "to_tensor",
]
