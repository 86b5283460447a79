"""The command line as a user meets it: every command on a model made by the real training path,
and bad input across the commands (one error line naming the file, exit 2; 1 is occface's own
failure; the traceback only with --debug)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from occface.cli import main
from occface.demo import default_config_path
from occface.models.occface import OccFaceModel

from conftest import write_png

# The tiniest model, trained from an image folder, with validation, calibrated fusion weights per
# visibility stratum and a calibrated strata rule: every step a trained model goes through.
TINY_TRAIN = [
    "model.arch=ir_18", "model.width=0.125", "model.occlusion_hidden_channels=8",
    "data.source=folder", "data.identities_per_batch=3", "data.images_per_identity=2",
    "optim.warmup_steps=1", "optim.schedule=cosine", "optim.lr=0.05",
    "train.val_identities=2", "train.val_pairs=40", "train.calibrate_strata=true", "train.log_every=1",
    "train.image_grid_every=100", "train.max_steps=2",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """Procedural faces as an image folder and a tiny model trained on them through ``occface train``."""
    root = tmp_path_factory.mktemp("cli")
    faces, run = root / "faces", root / "run"
    assert main(["faces", "--out", str(faces), "--identities", "6", "--images", "5"]) == 0
    assert main(["train", "--config", str(default_config_path()), *TINY_TRAIN,
                 f"data.path={faces}", f"train.out_dir={run}"]) == 0
    return {"root": root, "faces": faces, "run": run, "model": run / "model"}


def first_images(faces: Path, count: int = 2) -> list[Path]:
    return sorted(faces.glob("*/*.png"))[:count]


def test_the_trained_model_is_calibrated_per_stratum(workspace):
    """The model the commands below use is one of those that broke `match`: its fusion statistics
    and weights are per visibility stratum, and it stores a chosen strata rule."""
    calibration = OccFaceModel.from_pretrained(workspace["model"]).config.calibration
    normalization = calibration["normalization"]
    assert isinstance(normalization["embedding"], dict) and "clean-clean" in normalization["embedding"]
    assert {"hidden_below", "hidden_share"} <= set(normalization)
    assert isinstance(calibration["fusion_weight"], dict)


def test_match_on_a_trained_model(workspace, capsys):
    first, second = first_images(workspace["faces"])
    picture = workspace["root"] / "match.png"
    assert main(["match", str(first), str(second), "--model", str(workspace["model"]), "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "fused" in out and "decision (fused)" in out and picture.is_file()
    folder = workspace["root"] / "pictures"  # --out naming a folder (not there yet): the picture goes inside
    assert main(["match", str(first), str(second), "--model", str(workspace["model"]), "--out", str(folder)]) == 0
    assert (folder / f"match_{first.stem}_{second.stem}.png").is_file()
    # Without --out: the current folder, never the folder the faces are in (a user's data).
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace["root"])
        assert main(["match", str(first), str(second), "--model", str(workspace["model"])]) == 0
    assert (workspace["root"] / f"match_{first.stem}_{second.stem}.png").is_file()
    assert not list(first.parent.glob("match_*"))


def test_synth_check_show_and_eval_on_what_training_made(workspace, capsys):
    occluded = workspace["root"] / "occluded"
    assert main(["synth", "--faces", str(workspace["faces"]), "--out", str(occluded), "--kinds", "niqab,mask"]) == 0
    assert main(["check-data", str(occluded)]) == 0
    assert "no problems found" in capsys.readouterr().out
    sheet = workspace["root"] / "sheet.png"
    assert main(["show-data", str(occluded), "--out", str(sheet), "--count", "8"]) == 0 and sheet.is_file()
    report = workspace["root"] / "eval"
    assert main(["eval", "--model", str(workspace["model"]), "--folder", str(workspace["faces"]),
                 "--occlude", "none", "--occlude", "niqab:probe", "--pairs-per-type", "20",
                 "--identification", "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["fused"]["all"]["pairs"] == 40 and "identification" in metrics


def test_train_resume_continues_the_run(workspace, capsys):
    args = ["train", "--config", str(default_config_path()), *TINY_TRAIN,
            f"data.path={workspace['faces']}", f"train.out_dir={workspace['run']}"]
    assert main([*args, "train.max_steps=3", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input, table-driven
def _png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit grayscale ([H, W]) or RGB ([H, W, 3]) PNG, written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib

    array = np.asarray(array, ">u2")
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in array.reshape(height, -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 0 if array.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad(workspace) -> dict[str, Path]:
    """One file or folder per kind of bad (or unusual but valid) input."""
    root = workspace["root"] / "bad"
    root.mkdir()
    face = np.asarray(Image.open(first_images(workspace["faces"], 1)[0]).convert("RGB"))
    valid = _png_bytes(face)
    paths = {"face": first_images(workspace["faces"], 1)[0]}
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "truncated.png").write_bytes(valid[: len(valid) // 2])
    (root / "empty.png").write_bytes(b"")
    write_png(root / "wrong_size.png", face[:100, :80])
    write_png(root / "gray.png", face.mean(2).astype(np.uint8))
    write_png(root / "rgba.png", np.dstack([face, np.full(face.shape[:2], 255, np.uint8)]))
    _write_png16(root / "gray16.png", face.mean(2).astype(np.uint16) * 257)
    _write_png16(root / "rgb16.png", face.astype(np.uint16) * 257)
    (root / "empty_folder").mkdir()
    for name in ("no_weights", "no_config", "other_arch"):
        shutil.copytree(workspace["model"], root / name)
    (root / "no_weights" / "model.safetensors").unlink()
    (root / "no_config" / "config.json").unlink()
    config = json.loads((root / "other_arch" / "config.json").read_text())
    (root / "other_arch" / "config.json").write_text(json.dumps({**config, "arch": "ir_34"}))
    # LFW layout: <root>/<name>/<name>_<NNNN>.png
    lfw = root / "lfw"
    for person in ("ann", "bob"):
        for number in (1, 2):
            write_png(lfw / person / f"{person}_{number:04d}.png", face)
    (root / "pairs_malformed.txt").write_text("ann 1 2\nbob 1 2\nann one 2\n")
    (root / "pairs_missing.txt").write_text("ann 1 2\nann 1 bob 7\n")
    (root / "pairs_good.txt").write_text("ann 1 2\nbob 1 2\nann 1 bob 1\nann 2 bob 2\n")
    (root / "occluded_unknown.txt").write_text("ann/ann_0001.png\nann/ann_0009.png\n")
    # An occlusion dataset whose mask has another shape than its image.
    occ = root / "occ_wrong_mask"
    write_png(occ / "images" / "a.png", face)
    write_png(occ / "masks" / "a_mask.png", np.full((50, 112), 255, np.uint8))
    (occ / "manifest.csv").write_text("image,mask,identity\nimages/a.png,masks/a_mask.png,ann\n")
    (root / "not_yunet.onnx").write_bytes(b"\x08\x07 not an onnx graph")
    (root / "typo.yaml").write_text("model:\n  arch: ir_18\n  widht: 0.5\n")
    paths.update({p.name: p for p in root.iterdir()})
    return paths


def _match(bad, workspace, first, second="face", model=None):
    return ["match", str(bad[first]), str(bad[second]), "--model", str(model or workspace["model"]),
            "--out", str(workspace["root"] / "bad_match.png")]


def _eval(bad, workspace, *extra, model=None):
    return ["eval", "--model", str(model or workspace["model"]), "--out", str(workspace["root"] / "bad_eval"), *extra]


def _train(bad, workspace, *extra):
    return ["train", "--config", str(default_config_path()), *TINY_TRAIN,
            f"train.out_dir={workspace['root'] / 'bad_run'}", *extra]


# (case, argv from (bad, workspace), exit code, texts the error line must hold)
CASES = [
    ("missing file", lambda b, w: _match(b, w, "face", "face")[:1] + [str(b["empty_folder"] / "nope.png")]
     + _match(b, w, "face")[2:], 2, ["nope.png", "not found"]),
    ("corrupt image", lambda b, w: _match(b, w, "corrupt.png"), 2, ["corrupt.png", "unreadable or corrupt image"]),
    ("truncated image", lambda b, w: _match(b, w, "truncated.png"), 2, ["truncated.png", "unreadable or corrupt image"]),
    ("empty image", lambda b, w: _match(b, w, "empty.png"), 2, ["empty.png", "unreadable or corrupt image"]),
    ("wrong size for an aligned face", lambda b, w: _match(b, w, "wrong_size.png") + ["--faces", "aligned"], 2,
     ["wrong_size.png", "got 80x100"]),
    ("photo with a missing detector", lambda b, w: _match(b, w, "wrong_size.png") + ["--detector", str(b["empty_folder"] / "yunet.onnx")],
     2, ["yunet.onnx", "face detector not found"]),
    ("photo with a wrong detector file", lambda b, w: _match(b, w, "wrong_size.png") + ["--detector", str(b["not_yunet.onnx"])],
     2, ["not_yunet.onnx", "not the YuNet 2023mar face detector", "truncated: 20 bytes where face_detection_yunet_2023mar.onnx has 232,589"]),
    ("match picture of an unknown type", lambda b, w: _match(b, w, "face")[:-1] + [str(w["root"] / "m.xyz")], 2,
     ["m.xyz", "cannot write a picture", "'.xyz'"]),
    ("align a missing folder", lambda b, w: ["align", str(b["empty_folder"] / "none"), str(w["root"] / "al")], 2,
     ["none", "not a folder of photos"]),
    ("align an empty folder", lambda b, w: ["align", str(b["empty_folder"]), str(w["root"] / "al")], 2,
     ["empty_folder", "no image files"]),
    ("grayscale PNG", lambda b, w: _match(b, w, "gray.png"), 0, []),
    ("RGBA PNG", lambda b, w: _match(b, w, "rgba.png"), 0, []),
    ("16-bit grayscale PNG", lambda b, w: _match(b, w, "gray16.png"), 0, []),
    ("16-bit RGB PNG", lambda b, w: _match(b, w, "rgb16.png"), 0, []),
    ("empty folder (check-data)", lambda b, w: ["check-data", str(b["empty_folder"])], 2, ["empty_folder", "1 problem"]),
    ("empty folder (eval)", lambda b, w: _eval(b, w, "--folder", str(b["empty_folder"])), 2,
     ["empty_folder", "no supported dataset layout"]),
    ("empty folder (train)", lambda b, w: _train(b, w, f"data.path={b['empty_folder']}"), 2,
     ["empty_folder", "no images found"]),
    ("model without weights", lambda b, w: _match(b, w, "face", model=b["no_weights"]), 2,
     ["no_weights/model.safetensors", "not found"]),
    ("model without config", lambda b, w: _match(b, w, "face", model=b["no_config"]), 2,
     ["no_config/config.json", "not found"]),
    ("weights of another architecture", lambda b, w: _match(b, w, "face", model=b["other_arch"]), 2,
     ["other_arch/model.safetensors", "do not fit"]),
    ("malformed pairs line", lambda b, w: _eval(b, w, "--pairs", str(b["pairs_malformed.txt"]), "--root", str(b["lfw"])),
     2, ["pairs_malformed.txt:3", "invalid literal"]),
    ("pairs naming missing images", lambda b, w: _eval(b, w, "--pairs", str(b["pairs_missing.txt"]), "--root", str(b["lfw"])),
     2, ["pairs_missing.txt:2", "bob_0007", "image not found"]),
    ("pairs without --root", lambda b, w: _eval(b, w, "--pairs", str(b["pairs_good.txt"])), 2, ["--pairs needs --root"]),
    ("occluded list naming unknown files", lambda b, w: _eval(b, w, "--pairs", str(b["pairs_good.txt"]), "--root",
                                                              str(b["lfw"]), "--occluded-list", str(b["occluded_unknown.txt"])),
     2, ["occluded_unknown.txt", "ann/ann_0009.png"]),
    ("mask of the wrong size (check-data)", lambda b, w: ["check-data", str(b["occ_wrong_mask"])], 2,
     ["occ_wrong_mask", "1 problem"]),
    ("mask of the wrong size (train)", lambda b, w: _train(b, w, "data.source=occlusion", f"data.path={b['occ_wrong_mask']}"),
     2, ["a_mask.png", "112x50", "different aspect ratio"]),
    ("config with an unknown key", lambda b, w: ["train", "--config", str(b["typo.yaml"])], 2,
     ["typo.yaml", "unknown key(s) ['widht']"]),
    ("config value not among the choices", lambda b, w: _train(b, w, "model.arch=ir_99"), 2,
     ["model.arch", "'ir_99' is not one of"]),
    ("resume without a checkpoint", lambda b, w: _train(b, w, f"data.path={w['faces']}", "--resume"), 2,
     ["last.ckpt", "no checkpoint to resume from"]),
    ("unknown occluder kind", lambda b, w: ["synth", "--faces", str(w["faces"]), "--out", str(w["root"] / "x"),
                                            "--kinds", "scarf"], 2, ["scarf"]),
]


@pytest.mark.parametrize("case, argv, code, texts", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, code, texts, bad, workspace, capsys):
    args = argv(bad, workspace)
    assert main(args) == code, capsys.readouterr().err
    err = capsys.readouterr().err
    if code == 0:
        assert "error" not in err
        return
    command = args[0]
    lines = [line for line in err.splitlines() if line.startswith(f"occface {command}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    error_text = err[err.index(lines[0]):]
    for text in texts:
        assert text in error_text, (text, err)


def test_debug_shows_the_traceback(bad, workspace, monkeypatch):
    from occface.data.errors import DataError

    with pytest.raises(DataError, match="corrupt.png"):
        main(["--debug", *_match(bad, workspace, "corrupt.png")])
    with pytest.raises(DataError, match="corrupt.png"):
        main([*_match(bad, workspace, "corrupt.png"), "--debug"])
    monkeypatch.setenv("OCCFACE_DEBUG", "1")
    with pytest.raises(DataError, match="corrupt.png"):
        main(_match(bad, workspace, "corrupt.png"))


def test_a_failure_of_occface_itself_exits_1(bad, workspace, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise IndexError("too many indices for array")

    monkeypatch.setattr("occface.service.core.match", broken)  # match goes through FaceService
    assert main(_match(bad, workspace, "face")) == 1
    err = capsys.readouterr().err
    assert err.startswith("occface match: internal error: IndexError: too many indices") and "--debug" in err
    assert "Traceback" not in err


def test_progress_in_a_log_is_a_line_now_and_then(workspace, tmp_path):
    """Training with stderr sent to a file: a few progress lines, no carriage-return redraws."""
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "occface.cli", "train", "--config", str(default_config_path()), *TINY_TRAIN,
               f"data.path={workspace['faces']}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=6"]
    with log.open("w") as handle:
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=handle, timeout=300)
    assert result.returncode == 0, log.read_text()[-2000:]
    text = log.read_text()
    progress = [line for line in text.splitlines() if line.startswith("train:")]
    assert "\r" not in text
    assert 1 <= len(progress) <= 3 and "6/6" in progress[-1], text


# ---------------------------------------------------------------- photos in (the real detector)
def test_match_and_eval_take_photos(workspace, yunet_file, shared_data, capsys):
    import cv2

    face = np.asarray(Image.open(sorted((shared_data / "faces112").glob("*/*.png"))[0]).convert("RGB"))
    paste = np.array([[1.5, 0.0, 140.0], [0.0, 1.5, 60.0]])
    scene = cv2.warpAffine(face, paste, (480, 360), borderValue=(150, 150, 150))
    photos = workspace["root"] / "photos"
    photo, aligned, wall = (write_png(photos / "ann" / "ann_0001.jpg", scene), write_png(photos / "ann" / "ann_0002.png", face),
                            write_png(workspace["root"] / "wall.png", np.full((300, 300, 3), 90, np.uint8)))
    detector = ["--detector", str(yunet_file)]
    assert main(["match", str(photo), str(aligned), "--model", str(workspace["model"]), *detector,
                 "--out", str(workspace["root"] / "photo_match.png")]) == 0
    out = capsys.readouterr().out
    assert f"{photo}: face detected (score" in out and f"{aligned}: taken as an aligned face" in out
    # A face the model sees as hidden: the photo's gets a note on alignment, the aligned crop's not.
    import occface.match

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(occface.match, "predicted_occluded", lambda occlusion, rule=None: np.ones(len(occlusion), bool))
        assert main(["match", str(photo), str(aligned), "--model", str(workspace["model"]), *detector,
                     "--out", str(workspace["root"] / "photo_match.png")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and str(photo) in notes[0] and "partly hidden" in notes[0]
    assert main(["match", str(wall), str(aligned), "--model", str(workspace["model"]), *detector]) == 2
    assert "occface match: error: " in (err := capsys.readouterr().err) and "wall.png: no face found" in err
    write_png(photos / "bob" / "bob_0001.png", face[:, ::-1])
    (workspace["root"] / "photo_pairs.txt").write_text("ann 1 2\nann 1 bob 1\n")
    report = workspace["root"] / "photo_eval"
    assert main(["eval", "--model", str(workspace["model"]), "--pairs", str(workspace["root"] / "photo_pairs.txt"),
                 "--root", str(photos), *detector, "--out", str(report)]) == 0
    assert "faces: 2 taken as aligned, 1 detected and aligned" in capsys.readouterr().out
    assert "1 detected and aligned" in (report / "report.md").read_text()
    assert main(["align", str(photos), str(workspace["root"] / "photos_aligned"), *detector]) == 0
    assert "3 photos: 3 aligned (3 faces), 0 failed" in capsys.readouterr().out
