"""ONNX export and the ONNX runtime: parity with eager PyTorch for every backbone and feature level,
metadata checks, and the commands with --runtime onnx."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'occface[onnx]')")
import onnx  # noqa: E402

from occface.cli import main  # noqa: E402
from occface.data.images import read_image, to_tensor  # noqa: E402
from occface.data.procedural import ProceduralFaces  # noqa: E402
from occface.errors import InputError  # noqa: E402
from occface.export import PARITY_TOLERANCE, export_onnx, parity  # noqa: E402
from occface.models import ARCHITECTURES, ModelConfig, OccFaceModel, load_pretrained, measure_batchnorm  # noqa: E402
from occface.onnx_model import GRAPH_FILE, OnnxFaceModel, load_face_model  # noqa: E402

from conftest import SHARED_DATA, SHARED_MODELS, write_png  # noqa: E402

MOBILEFACENET = SHARED_MODELS / "mobilefacenet_ms1m.pt"


def procedural_faces(count: int = 6) -> torch.Tensor:
    """[count, 3, 112, 112] rendered faces (distinct identities), RGB in [0, 1]."""
    faces = ProceduralFaces(num_identities=count, images_per_identity=1, seed=3)
    return torch.stack([to_tensor(faces.render(i, 0)) for i in range(count)])


def settled(model: OccFaceModel, seed: int = 0) -> OccFaceModel:
    """Batch-norm statistics measured on faces and noise, as in any trained network."""
    torch.manual_seed(seed)
    return measure_batchnorm(model, torch.cat((procedural_faces(8), torch.rand(8, 3, 112, 112))))


def saved_model(tmp_path, arch: str, level: str, name: str = "model") -> tuple[OccFaceModel, object]:
    width = 1.0 if arch == "mobilefacenet" else 0.25
    model = settled(OccFaceModel(ModelConfig(arch=arch, feature_level=level, width=width, occlusion_hidden_channels=16)))
    return model, model.save_pretrained(tmp_path / name)


@pytest.mark.parametrize("level", ["block3", "block4"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parity_every_backbone(tmp_path, arch, level):
    model, model_dir = saved_model(tmp_path, arch, level)
    result = export_onnx(model_dir)
    assert result.path == model_dir / GRAPH_FILE and result.path.is_file()
    exported = OnnxFaceModel(model_dir)
    # Rendered faces, noise and (where the shared data is) real faces, at a batch size other than the
    # one traced (2): the batch axis is dynamic.
    real = [to_tensor(read_image(p)) for p in sorted((SHARED_DATA / "faces112").glob("*/0000.png"))[:4]]
    faces = torch.cat((procedural_faces(5), torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)),
                       *([torch.stack(real)] if real else [])))
    differences = parity(model, exported, faces)
    assert max(differences.values()) <= PARITY_TOLERANCE, differences
    one = exported(faces[:1])
    assert one.feature_map.shape == (1, model.backbone.feature_channels, *(2 * [model.backbone.feature_size]))
    assert one.occlusion.shape == (1, 1, *(2 * [model.backbone.feature_size]))


@pytest.mark.parametrize("level", ["block3", "block4"])
def test_parity_pretrained_mobilefacenet_on_real_faces(tmp_path, shared_data, level):
    if not MOBILEFACENET.is_file():
        pytest.skip(f"pretrained MobileFaceNet not found at {MOBILEFACENET} (set OCCFACE_SHARED_MODELS)")
    model = OccFaceModel(ModelConfig(arch="mobilefacenet", feature_level=level))
    load_pretrained(model, MOBILEFACENET)
    model_dir = model.eval().save_pretrained(tmp_path / "mfn")
    paths = sorted((shared_data / "faces112").glob("*/000[0-3].png"))[:16]
    faces = torch.stack([to_tensor(read_image(p)) for p in paths])
    export_onnx(model_dir, check_faces=faces)
    differences = parity(model, OnnxFaceModel(model_dir), faces)
    assert max(differences.values()) <= PARITY_TOLERANCE, differences
    metadata = OnnxFaceModel(model_dir).metadata
    assert (metadata["color_space"], json.loads(metadata["input_std"])) == ("RGB", [0.229, 0.224, 0.225])


def test_metadata_carries_the_input_convention(tmp_path):
    model, model_dir = saved_model(tmp_path, "ir_18", "block4")
    model.set_convention(model.config.convention.__class__("BGR", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    model.save_pretrained(model_dir)
    export_onnx(model_dir)
    metadata = {p.key: p.value for p in onnx.load(str(model_dir / GRAPH_FILE)).metadata_props}
    assert (metadata["color_space"], json.loads(metadata["input_mean"])) == ("BGR", [0.5, 0.5, 0.5])
    assert OnnxFaceModel(model_dir).session.get_modelmeta().custom_metadata_map["color_space"] == "BGR"
    # The graph itself takes normalised BGR: fed RGB in [0, 1] directly, it disagrees with the model;
    # through OnnxFaceModel (which applies the metadata's convention) it agrees.
    faces = procedural_faces(3)
    exported = OnnxFaceModel(model_dir)
    raw = exported.session.run(["embedding"], {"images": faces.numpy()})[0]
    with torch.inference_mode():
        eager = model(faces).embedding.numpy()
    assert np.abs(raw - eager).max() > 1e-2
    assert np.abs(exported(faces).embedding.numpy() - eager).max() < 1e-4


def rewrite_metadata(path, **changes) -> None:
    graph = onnx.load(str(path))
    values = {p.key: p.value for p in graph.metadata_props} | changes
    del graph.metadata_props[:]
    for key, value in values.items():
        if value is not None:
            graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def test_graphs_that_do_not_fit_are_clear_errors(tmp_path):
    _, model_dir = saved_model(tmp_path, "ir_18", "block4")
    with pytest.raises(InputError, match="no such ONNX file.*occface export"):
        OnnxFaceModel(model_dir)
    export_onnx(model_dir)
    graph = model_dir / GRAPH_FILE
    # Another feature level (another shape), and the same shape with other weights.
    _, other_dir = saved_model(tmp_path, "ir_18", "block3", name="other")
    with pytest.raises(InputError, match=r"does not fit the model.*feature_level block4 vs block3"):
        OnnxFaceModel(other_dir, graph)
    model, retrained = saved_model(tmp_path, "ir_18", "block4", name="retrained")
    with pytest.raises(InputError, match="exported from other weights"):
        OnnxFaceModel(retrained, graph)
    # A graph from another occface graph format, and one without occface metadata.
    rewrite_metadata(graph, **{"occface.format_version": "99"})
    with pytest.raises(InputError, match="graph format version 99.*export the model again"):
        OnnxFaceModel(model_dir)
    rewrite_metadata(graph, **{"occface.format": None})
    with pytest.raises(InputError, match="not an occface network graph"):
        OnnxFaceModel(model_dir)
    (model_dir / GRAPH_FILE).write_bytes(b"not a graph")
    with pytest.raises(InputError, match="not a readable ONNX file"):
        OnnxFaceModel(model_dir)
    export_onnx(model_dir)
    with pytest.raises(InputError, match=r"takes faces \[batch, 3, 112, 112\], got \[2, 3, 96, 96\]"):
        OnnxFaceModel(model_dir)(torch.rand(2, 3, 96, 96))
    with pytest.raises(InputError, match="runtime 'onnx' only"):
        load_face_model(model_dir, "torch", graph)


def test_commands_with_the_onnx_runtime(tmp_path, capsys):
    """export, then match / enroll / search / eval with --runtime onnx give PyTorch's scores."""
    _, model_dir = saved_model(tmp_path, "mobilefacenet", "block3")
    renderer = ProceduralFaces(num_identities=4, images_per_identity=3, seed=5)
    people = tmp_path / "people"
    for identity in range(4):
        for index in range(3):
            write_png(people / f"p{identity}" / f"{index}.png", renderer.render(identity, index))
    assert main(["export", "--model", str(model_dir), "--onnx", str(tmp_path / "net.onnx")]) == 0
    assert "largest difference" in capsys.readouterr().out
    onnx_args = ["--runtime", "onnx", "--onnx", str(tmp_path / "net.onnx"), "--precision", "fp32"]
    first, second = str(people / "p0" / "0.png"), str(people / "p0" / "1.png")
    outputs = {}
    for runtime, extra in (("torch", ["--precision", "fp32"]), ("onnx", onnx_args)):
        assert main(["match", first, second, "--model", str(model_dir), "--out", str(tmp_path / f"{runtime}.png"), *extra]) == 0
        outputs[runtime] = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()
                            if line.startswith(("embedding", "qaconv"))}
    # Printed to 3 decimals: equal up to the rounding of the last one.
    assert len(outputs["onnx"]) == 3 and outputs["torch"] == pytest.approx(outputs["onnx"], abs=1.01e-3)
    # A gallery enrolled through PyTorch, searched through ONNX Runtime, and the other way round.
    gallery = str(tmp_path / "gallery")
    # fp32 on both sides: "auto" decides by timing, and on a loaded machine it may pick bf16.
    assert main(["enroll", str(people), "--model", str(model_dir), "--gallery", gallery, "--precision", "fp32"]) == 0
    capsys.readouterr()
    results = {}
    for runtime, extra in (("torch", ["--precision", "fp32"]), ("onnx", onnx_args)):
        assert main(["search", first, "--model", str(model_dir), "--gallery", gallery, "--json", "--top", "4", *extra]) == 0
        results[runtime] = json.loads(capsys.readouterr().out)[0]["candidates"]
    assert [c["identity"] for c in results["torch"]] == [c["identity"] for c in results["onnx"]]
    for a, b in zip(results["torch"], results["onnx"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert main(["enroll", str(people / "p0" / "0.png"), "--identity", "again", "--model", str(model_dir),
                 "--gallery", str(tmp_path / "g2"), *onnx_args]) == 0
    stored = np.load(next((tmp_path / "g2" / "shards").iterdir()) / "embeddings.npy")
    with torch.inference_mode():
        model = OccFaceModel.from_pretrained(model_dir)
        image = to_tensor(read_image(first))[None]
        eager = model.fused_embedding(image).numpy()
    assert np.abs(stored - eager).max() < 1e-4
    # eval on a folder: the same metrics from either runtime.
    metrics = {}
    for runtime, extra in (("torch", ["--precision", "fp32"]), ("onnx", onnx_args)):
        out = tmp_path / f"eval_{runtime}"
        assert main(["eval", "--model", str(model_dir), "--folder", str(people), "--pairs-per-type", "12",
                     "--out", str(out), *extra]) == 0
        metrics[runtime] = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    for source in ("embedding", "qaconv", "qaconv_weighted"):
        assert metrics["torch"][source]["clean-clean"]["auc"] == pytest.approx(metrics["onnx"][source]["clean-clean"]["auc"], abs=1e-6)


def test_info_names_the_onnx_runtime(capsys):
    import onnxruntime

    assert main(["info"]) == 0
    assert f"onnxruntime {onnxruntime.__version__}" in capsys.readouterr().out
