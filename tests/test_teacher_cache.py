"""The frozen teacher's targets computed once per image (and its mirror) and looked up each step."""
import pytest
import torch

from occface.config import ConfigError, load_config
from occface.data import ProceduralFaceDataset, ProceduralFaces
from occface.data.errors import DataError
from occface.data.images import to_tensor
from occface.data.synth import OcclusionSynthesizer, SynthesizeOcclusion
from occface.data.transforms import Compose, adaface_augmentation
from occface.demo import default_config_path
from occface.models import ModelConfig, OccFaceModel
from occface.training.teacher_cache import TeacherCache
from occface.train import Trainer, build_data

from test_pretrained_start import FINETUNE, perturbed, saved_mobilefacenet


def small_teacher() -> OccFaceModel:
    return perturbed(OccFaceModel(ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)), seed=1)


def occluding_transform(crop: float = 0.0) -> Compose:
    return Compose([SynthesizeOcclusion(OcclusionSynthesizer(kinds=["veil", "facemask"]), 0.8),
                    adaface_augmentation(flip=0.5, crop=crop, low_res=0.0, photometric=0.0)])


def test_the_cached_teacher_gives_the_targets_of_the_live_one():
    faces = ProceduralFaces(3, 4, seed=0)
    cached = ProceduralFaceDataset(faces, transform=occluding_transform(), teacher_views=True, seed=3)
    live = ProceduralFaceDataset(faces, transform=occluding_transform(), clean_targets=True, seed=3)
    teacher = small_teacher()
    network = lambda images: teacher.backbone(teacher.normalize(images))  # noqa: E731 - what training calls
    cache = TeacherCache(network, cached, mirrors=True)
    views = []
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        live.set_epoch(epoch)
        samples = [cached[i] for i in range(len(cached))]
        clean = torch.stack([live[i].clean for i in range(len(live))])
        assert all(torch.equal(s.image, live[i].image) for i, s in enumerate(samples))  # same draws either way
        index, view = torch.tensor([s.index for s in samples]), torch.tensor([s.view for s in samples])
        embedding, maps = cache.targets(index, view)
        with torch.inference_mode():
            expected = network(clean)
        torch.testing.assert_close(embedding, expected.embedding, atol=1e-5, rtol=1e-5)
        scale = expected.feature_map.abs().max()
        assert (maps - expected.feature_map).abs().max() <= 1e-3 * scale  # fp16 storage
        views += view.tolist()
    assert set(views) == {0, 1}  # the flip drew both views
    assert cache.embedding.shape == (12, 2, 512) and cache.feature_map.dtype == torch.float16
    # Class centres from the cache: each identity's mean embedding of its first images, as stored.
    centres = cache.class_means(cached.targets, per_class=2)
    labels = torch.tensor(cached.targets)
    with torch.inference_mode():
        stored = network(torch.stack([to_tensor(cached.read(i).image) for i in range(len(cached))])).embedding
    expected = torch.stack([stored[(labels == c).nonzero()[:2, 0]].mean(0) for c in range(3)])
    torch.testing.assert_close(centres, torch.nn.functional.normalize(expected, dim=1), atol=1e-5, rtol=1e-5)


def test_a_cache_refuses_faces_changed_beyond_mirroring():
    faces = ProceduralFaces(2, 4, seed=0)
    dataset = ProceduralFaceDataset(faces, transform=occluding_transform(crop=1.0), teacher_views=True, seed=0)
    with pytest.raises(DataError, match="beyond mirroring it; a cached teacher needs data.crop"):
        [dataset[i] for i in range(len(dataset))]
    config = load_config(default_config_path(), ["loss.teacher_cache=true", "loss.distill_weight=1.0", "data.crop=0.2",
                                                  "data.low_res=0", "data.photometric=0"])
    with pytest.raises(ConfigError, match="loss.teacher_cache: data.crop change the clean faces"):
        build_data(config)


def test_finetuning_with_cached_targets_trains_as_with_the_live_teacher(tmp_path):
    saved_mobilefacenet(tmp_path / "mfn.pt")
    common = [*FINETUNE, f"model.pretrained={tmp_path / 'mfn.pt'}", "model.freeze_backbone_steps=0",
              "loss.head_init=random",  # class centres from the cache are the teacher's unflipped embeddings
              "data.crop=0", "data.low_res=0", "data.photometric=0", "train.max_steps=3", "train.precision=32-true"]
    runs = {}
    for name, cached in (("live", "false"), ("cached", "true")):
        trainer = Trainer(load_config(default_config_path(), [*common, f"loss.teacher_cache={cached}",
                                                              f"train.out_dir={tmp_path / name}"]))
        assert trainer.fit()["steps"] == 3
        runs[name] = trainer
    assert runs["cached"].cache is not None and runs["live"].cache is None
    assert runs["cached"].cache.views == 2  # data.flip 0.5: each image and its mirror
    live, cached = runs["live"].module.state_dict(), runs["cached"].module.state_dict()
    for key, value in live.items():
        if value.is_floating_point():  # three steps apart only by the fp16 rounding of the map targets
            torch.testing.assert_close(cached[key], value, atol=2e-3, rtol=2e-2, msg=key)
