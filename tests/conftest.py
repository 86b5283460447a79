import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The workplace's real data (never part of the project); tests that need it skip without it.
SHARED_DATA = Path(os.environ.get("OCCFACE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SHARED_MODELS = Path(os.environ.get("OCCFACE_SHARED_MODELS", Path(__file__).resolve().parents[2] / "shared" / "models"))
YUNET = SHARED_MODELS / "face_detection_yunet_2023mar.onnx"
FACE_MESH, IRIS = SHARED_MODELS / "face_landmark.tflite", SHARED_MODELS / "iris_landmark.tflite"


@pytest.fixture(autouse=True)
def isolated_model_home(tmp_path_factory, monkeypatch):
    """Every test sees an empty OCCFACE_HOME and no model-file variables: what a test uses, it names."""
    monkeypatch.setenv("OCCFACE_HOME", str(tmp_path_factory.mktemp("occface_home")))
    for name in ("OCCFACE_DETECTOR", "OCCFACE_FACE_MESH", "OCCFACE_IRIS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "occluders").is_dir():
        pytest.skip(f"real face data not found at {SHARED_DATA} (set OCCFACE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def yunet_file() -> Path:
    if not YUNET.is_file():
        pytest.skip(f"YuNet face detector not found at {YUNET} (set OCCFACE_SHARED_MODELS)")
    return YUNET


@pytest.fixture
def landmark_files() -> dict[str, Path]:
    """The Face Mesh and Iris files, as FaceAligner's keyword arguments."""
    if not (FACE_MESH.is_file() and IRIS.is_file()):
        pytest.skip(f"MediaPipe landmark files not found in {SHARED_MODELS} (set OCCFACE_SHARED_MODELS)")
    return {"face_mesh": FACE_MESH, "iris": IRIS}


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def face_folder(tmp_path) -> Path:
    """3 identities x 4 random 112x112 faces as an image folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    for identity in ("carol", "alice", "bob"):
        for index in range(4):
            write_png(root / identity / f"{index:04d}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    return root
