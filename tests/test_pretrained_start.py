"""Starting from pretrained weights: MobileFaceNet, input conventions, load_pretrained, fine-tuning."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from occface.config import load_config
from occface.data import ProceduralFaceDataset, ProceduralFaces
from occface.data.synth import OcclusionSynthesizer, SynthesizeOcclusion
from occface.data.transforms import Compose, adaface_augmentation
from occface.demo import default_config_path
from occface.models import (ADAFACE_INPUT, IMAGENET_INPUT, Backbone, CheckpointError, InputConvention, MobileFaceNet,
                            ModelConfig, OccFaceModel, load_pretrained)
from occface.objective import class_mean_embeddings
from occface.train import Trainer

from conftest import SHARED_MODELS

MOBILEFACENET = SHARED_MODELS / "mobilefacenet_ms1m.pt"


@pytest.fixture
def mobilefacenet_file() -> Path:
    if not MOBILEFACENET.is_file():
        pytest.skip(f"pretrained MobileFaceNet not found at {MOBILEFACENET} (set OCCFACE_SHARED_MODELS)")
    return MOBILEFACENET


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-default values in every float tensor, running statistics included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1 + 0.1 * torch.rand_like(tensor))
    return module.eval()


def saved_mobilefacenet(path: Path) -> dict:
    """A MobileFaceNet state dict saved as the public one is: legacy (non-zip) torch format."""
    state = perturbed(MobileFaceNet()).state_dict()
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return state


# ---------------------------------------------------------------- MobileFaceNet
@pytest.mark.parametrize("feature_level, shape", [("block3", (128, 14, 14)), ("block4", (512, 7, 7))])
def test_mobilefacenet_shapes(feature_level, shape):
    model = MobileFaceNet(feature_level).eval()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.embedding.shape == (2, 128) and out.norm.shape == (2, 1) and tuple(out.feature_map.shape[1:]) == shape
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    assert (model.feature_channels, model.feature_size) == (shape[0], shape[1])
    assert sum(p.numel() for p in model.parameters()) == 999_936  # as the released file has
    with pytest.raises(ValueError, match="112x112"):
        MobileFaceNet(input_size=224)


def test_the_released_mobilefacenet_loads_unchanged(mobilefacenet_file):
    state = torch.load(mobilefacenet_file, map_location="cpu", weights_only=True)
    model = MobileFaceNet("block3")
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- input conventions
def test_the_model_applies_its_convention_at_one_boundary(tmp_path):
    config = ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8, color_space="BGR",
                         input_mean=[0.4, 0.5, 0.6], input_std=[0.2, 0.25, 0.3])
    model = perturbed(OccFaceModel(config))
    images = torch.rand(2, 3, 112, 112)  # RGB in [0, 1], as every dataset yields
    expected_input = (images.flip(1) - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images).embedding, model.backbone(expected_input).embedding)
    model.save_pretrained(tmp_path)
    loaded = OccFaceModel.from_pretrained(tmp_path)
    assert loaded.config.convention == InputConvention("BGR", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).embedding, model(images).embedding)


def test_models_saved_before_conventions_keep_theirs(tmp_path):
    """Older config.json files have no input_mean/std: they were trained with mean = std = 0.5."""
    OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    del values["input_mean"], values["input_std"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert OccFaceModel.from_pretrained(tmp_path).config.convention == InputConvention("RGB")


def test_bad_conventions_are_errors():
    with pytest.raises(ValueError, match="color_space"):
        InputConvention("HSV")
    with pytest.raises(ValueError, match="std must be positive"):
        InputConvention("RGB", (0.5,) * 3, (0.5, 0.0, 0.5))


# ---------------------------------------------------------------- load_pretrained
def test_load_pretrained_recognises_a_mobilefacenet_state_dict(tmp_path):
    state = saved_mobilefacenet(tmp_path / "mfn.pt")
    model = OccFaceModel(ModelConfig(arch="mobilefacenet", feature_level="block3", occlusion_hidden_channels=8))
    description = load_pretrained(model, tmp_path / "mfn.pt")
    assert "mobilefacenet" in description and model.config.convention == IMAGENET_INPUT
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state.items())


def test_load_pretrained_recognises_adaface_weights_and_model_directories(tmp_path):
    source = perturbed(Backbone("ir_18", "block4", width=0.125))
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()} | {"head.kernel": torch.zeros(3)}},
               tmp_path / "adaface.ckpt")
    config = ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)
    model = OccFaceModel(config)
    load_pretrained(model, tmp_path / "adaface.ckpt")
    assert model.config.convention == ADAFACE_INPUT
    perturbed(model.occlusion_head, 1)
    model.save_pretrained(tmp_path / "run")
    again = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    load_pretrained(again, tmp_path / "run")
    assert again.config.convention == ADAFACE_INPUT
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    other = OccFaceModel(ModelConfig(arch="ir_18", width=0.25, occlusion_hidden_channels=8))
    with pytest.raises(CheckpointError, match=r"an occface model of another shape: width 0.125 \(model: 0.25\)"):
        load_pretrained(other, tmp_path / "run")


def test_weights_that_do_not_fit_are_clear_errors(tmp_path):
    saved_mobilefacenet(tmp_path / "mfn.pt")
    ir = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    with pytest.raises(CheckpointError, match=r"mfn.pt: weights of mobilefacenet .* but the model is ir_18"):
        load_pretrained(ir, tmp_path / "mfn.pt")
    blob = (tmp_path / "mfn.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    mfn = OccFaceModel(ModelConfig(arch="mobilefacenet", occlusion_hidden_channels=8))
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable PyTorch checkpoint"):
        load_pretrained(mfn, tmp_path / "truncated.pt")
    state = torch.load(tmp_path / "mfn.pt", weights_only=True)
    del state["conv3.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"(?s)partial.pt: checkpoint does not fit .*missing .*conv3"):
        load_pretrained(mfn, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="nowhere.pt: no such checkpoint file"):
        load_pretrained(mfn, tmp_path / "nowhere.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not an occface model directory"):
        load_pretrained(mfn, tmp_path / "folder")


def test_the_released_network_separates_the_faces112_test_people(mobilefacenet_file, shared_data):
    from sklearn.metrics import roc_auc_score

    from occface.data import ImageFolderDataset

    split = json.loads((shared_data / "faces112_split.json").read_text())
    dataset = ImageFolderDataset(shared_data / "faces112", identities=split["test"])
    chosen = [i for label in range(dataset.num_classes) for i in np.flatnonzero(np.asarray(dataset.targets) == label)[:25]]
    model = OccFaceModel(ModelConfig(arch="mobilefacenet", feature_level="block3"))
    load_pretrained(model, mobilefacenet_file)
    model.eval()
    with torch.inference_mode():
        images = torch.stack([dataset[int(i)].image for i in chosen])
        embedding = model.fused_embedding(images)
    labels = np.asarray(dataset.targets)[chosen]
    upper = np.triu_indices(len(chosen), 1)
    auc = roc_auc_score((labels[:, None] == labels[None, :])[upper], (embedding @ embedding.T).numpy()[upper])
    assert auc > 0.97, auc


# ---------------------------------------------------------------- fine-tuning
def test_clean_targets_share_the_augmentation_of_the_occluded_face():
    """Same flip and crop (the same random draws); outside the occluder the pixels are equal.
    (Blur and the contrast jitter mix in the occluder's pixels, so they are left out here.)"""
    faces = ProceduralFaces(3, 4, seed=0)
    transform = Compose([SynthesizeOcclusion(OcclusionSynthesizer(kinds=["niqab", "mask"]), 0.8),
                         adaface_augmentation(flip=0.5, crop=0.5, low_res=0.0, photometric=0.0)])
    dataset = ProceduralFaceDataset(faces, transform=transform, clean_targets=True, seed=3)
    with_occluder = 0
    for index in range(len(dataset)):
        sample = dataset[index]
        visible = (sample.mask == 1).expand(3, -1, -1)
        assert torch.equal(sample.clean[visible], sample.image[visible])
        with_occluder += not torch.equal(sample.clean, sample.image)
    assert with_occluder >= 6  # of 12, at p = 0.8
    plain = ProceduralFaceDataset(faces, transform=transform, seed=3)
    assert torch.equal(plain[5].image, dataset[5].image) and plain[5].clean.numel() == 0


FINETUNE = [
    "model.arch=mobilefacenet", "model.feature_level=block3", "model.width=1.0", "model.occlusion_hidden_channels=8",
    "model.freeze_backbone_steps=2", "model.train_from=features.5", "model.backbone_lr_scale=0.1",
    "loss.distill_weight=1.0", "loss.distill_map_weight=1.0", "loss.head_init=class_means", "loss.head_init_images=2",
    "data.procedural_identities=8", "data.procedural_images=4", "data.identities_per_batch=3",
    "data.images_per_identity=2", "optim.name=adamw", "optim.lr=1e-3", "optim.schedule=constant",
    "train.val_identities=2", "train.val_pairs=8", "train.log_every=1", "train.image_grid_every=0",
    "train.progress=false", "train.max_steps=4", "train.checkpoint_every=2",
]


def test_finetuning_from_pretrained_weights(tmp_path):
    state = saved_mobilefacenet(tmp_path / "mfn.pt")
    config = load_config(default_config_path(), [*FINETUNE, f"model.pretrained={tmp_path / 'mfn.pt'}",
                                                  f"train.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    assert trainer.fit(stop_after=2) == {"stopped_at": 2}
    backbone = trainer.module.model.backbone.state_dict()
    # The frozen warm-up leaves the pretrained backbone untouched, BatchNorm statistics included.
    assert all(torch.equal(backbone[k], v) for k, v in state.items())
    assert trainer.module.model.config.convention == IMAGENET_INPUT
    # The class centres started at the identities' mean pretrained embeddings.
    teacher = trainer.module.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    resumed = Trainer(config, resume=True)
    summary = resumed.fit()
    assert summary["steps"] == 4
    straight = Trainer(load_config(default_config_path(), [*FINETUNE, f"model.pretrained={tmp_path / 'mfn.pt'}",
                                                            f"train.out_dir={tmp_path / 'straight'}"]))
    straight.fit()
    for key, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], value), key
    after = resumed.module.model.backbone.state_dict()
    before_features_5 = ("conv1.", "dw_conv.", *(f"features.{i}." for i in range(5)))
    assert all(torch.equal(after[k], v) for k, v in state.items() if k.startswith(before_features_5))  # train_from
    assert not torch.equal(after["features.6.conv.3.running_mean"], state["features.6.conv.3.running_mean"])
    assert not torch.equal(after["features.6.conv.2.weight"], state["features.6.conv.2.weight"])
    model = OccFaceModel.from_pretrained(tmp_path / "run" / "model")
    assert model.config.convention == IMAGENET_INPUT and model.config.arch == "mobilefacenet"


def test_class_means_start_the_margin_head(tmp_path):
    model = perturbed(OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)))
    dataset = ProceduralFaceDataset(ProceduralFaces(4, 3, seed=0))
    centres = class_mean_embeddings(model, dataset, per_class=3)
    assert centres.shape == (4, 512)
    with torch.no_grad():
        embedding = model.fused_embedding(torch.stack([dataset[i].image for i in range(len(dataset))]))
    labels = torch.tensor(dataset.targets)
    expected = torch.nn.functional.normalize(torch.stack([embedding[labels == c].sum(0) for c in range(4)]), dim=1)
    torch.testing.assert_close(centres, expected, atol=1e-5, rtol=1e-4)


def test_distillation_needs_pretrained_weights(tmp_path):
    from occface.config import ConfigError
    from occface.objective import build_model

    config = load_config(default_config_path(), ["loss.distill_weight=1.0", "model.arch=ir_18", "model.width=0.125"])
    with pytest.raises(ConfigError, match="need model.pretrained"):
        build_model(config)


def test_frozen_backbone_statistics_and_teacher_stay_in_eval_mode():
    from occface.objective import MultiTaskModule

    config = load_config(default_config_path(), ["model.arch=ir_18", "model.width=0.125"])
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    module = MultiTaskModule(model, 4, config, teacher=OccFaceModel(ModelConfig(arch="ir_18", width=0.125,
                                                                                   occlusion_hidden_channels=8)))
    module.train()
    assert model.backbone.training and model.occlusion_head.training and not module.teacher.training
    module.backbone_frozen = True
    module.train()
    assert not model.backbone.training and model.occlusion_head.training and model.qaconv.training
    frozen = module.freeze_backbone_before("body.1")
    assert frozen and all(name.startswith("input_layer.") or name.startswith("body.0.") for name in frozen)
    module.backbone_frozen = False
    module.train()
    assert not model.backbone.input_layer[1].training and model.backbone.body[1].res_layer[1].training
    from occface.config import ConfigError

    with pytest.raises(ConfigError, match="names no backbone layer"):
        module.freeze_backbone_before("features.5")


@pytest.mark.parametrize("trains_backbone", [True, False])
def test_the_occlusion_loss_reaches_the_backbone_only_when_configured(trains_backbone):
    from occface.objective import MultiTaskModule

    config = load_config(default_config_path(), ["model.arch=ir_18", "model.width=0.125",
                                                 f"loss.occlusion_trains_backbone={str(trains_backbone).lower()}"])
    model = OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))
    module = MultiTaskModule(model, 3, config).train()
    masks = torch.ones(6, 1, 112, 112)
    masks[:3, :, 60:] = 0  # lower halves hidden: the loss has something to learn
    terms = module(torch.rand(6, 3, 112, 112), torch.tensor([0, 0, 1, 1, 2, 2]), masks)
    terms["occlusion"].backward()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.occlusion_head.parameters()
               if p.requires_grad and p.ndim > 1)
    assert bool(backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)) == trains_backbone


def test_the_teacher_in_onnx_runtime_gives_the_same_targets(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'occface[onnx]')")
    from occface.objective import MultiTaskModule

    config = load_config(default_config_path(), ["model.arch=ir_18", "model.width=0.125", "loss.distill_weight=1.0",
                                                 "loss.distill_map_weight=1.0"])
    make = lambda: OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8))  # noqa: E731
    torch.manual_seed(0)
    module = MultiTaskModule(make(), 4, config, teacher=perturbed(make(), seed=1)).eval()
    images, clean = torch.rand(2, 6, 3, 112, 112)
    labels, masks = torch.tensor([0, 0, 1, 1, 2, 2]), torch.ones(6, 1, 112, 112)
    eager = module(images, labels, masks, clean)
    graph = module.use_onnx_teacher(tmp_path / "teacher")
    assert graph.is_file() and module.teacher is not None  # the weights stay: checkpoints do not change
    onnx = module(images, labels, masks, clean)
    assert eager["distill"] > 0.01 and eager["distill_map"] > 0.01
    for term in ("distill", "distill_map"):
        torch.testing.assert_close(onnx[term], eager[term], atol=1e-4, rtol=1e-4)


def test_finetuning_with_the_teacher_in_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'occface[onnx]')")
    saved_mobilefacenet(tmp_path / "mfn.pt")
    config = load_config(default_config_path(), [*FINETUNE, f"model.pretrained={tmp_path / 'mfn.pt'}",
                                                  "loss.teacher_runtime=onnx", "train.max_steps=2",
                                                  f"train.out_dir={tmp_path / 'run'}"])
    trainer = Trainer(config)
    assert trainer.fit()["steps"] == 2
    assert trainer.module.teacher_onnx is not None and (tmp_path / "run" / "teacher" / "model.onnx").is_file()
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)  # RNG states
    assert any(key.startswith("teacher.") for key in checkpoint["module"])


def test_interpolating_the_backbone_with_its_pretrained_weights(tmp_path):
    from occface.models import interpolate_backbone

    state = saved_mobilefacenet(tmp_path / "mfn.pt")
    make = lambda: OccFaceModel(ModelConfig(arch="mobilefacenet", occlusion_hidden_channels=8))  # noqa: E731
    tuned = make()
    load_pretrained(tuned, tmp_path / "mfn.pt")
    perturbed(tuned, seed=5)  # stands for the fine-tuning
    fine_tuned = {k: v.clone() for k, v in tuned.state_dict().items()}
    for alpha in (1.0, 0.5, 0.0):
        model = make()
        model.load_state_dict(fine_tuned)
        interpolate_backbone(model, tmp_path / "mfn.pt", alpha)
        backbone = model.backbone.state_dict()
        for key, start in state.items():
            end = fine_tuned[f"backbone.{key}"]
            expected = start + alpha * (end - start) if start.is_floating_point() else end
            torch.testing.assert_close(backbone[key], expected, rtol=1e-6, atol=1e-7)
        head = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        assert all(torch.equal(v, fine_tuned[k]) for k, v in head.items())  # no pretrained counterpart
    assert not torch.equal(fine_tuned["backbone.conv2.0.weight"], state["conv2.0.weight"])
    with pytest.raises(ValueError, match="outside"):
        interpolate_backbone(make(), tmp_path / "mfn.pt", 1.5)


def test_a_run_saves_the_interpolated_backbone_and_checkpoints_the_fine_tuned_one(tmp_path):
    from occface.config import ConfigError
    from occface.objective import build_model

    state = saved_mobilefacenet(tmp_path / "mfn.pt")
    config = load_config(default_config_path(), [*FINETUNE, f"model.pretrained={tmp_path / 'mfn.pt'}",
                                                  "model.interpolate_pretrained=0", "model.freeze_backbone_steps=0",
                                                  "train.max_steps=2", f"train.out_dir={tmp_path / 'run'}"])
    Trainer(config).fit()
    saved = OccFaceModel.from_pretrained(tmp_path / "run" / "model").backbone.state_dict()
    # alpha 0: the pretrained backbone (BatchNorm's step counters are not weights: they stay)
    assert all(torch.equal(saved[k], v) for k, v in state.items() if v.is_floating_point())
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)  # RNG states
    assert not torch.equal(checkpoint["module"]["model.backbone.conv2.0.weight"], state["conv2.0.weight"])
    weights = f"model.pretrained={tmp_path / 'mfn.pt'}"
    for overrides, message in ((["model.interpolate_pretrained=0.5"], "needs model.pretrained"),
                               ([weights, "model.interpolate_pretrained=2"], "outside")):
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(default_config_path(), [*FINETUNE, *overrides]))
