import json
import logging

import numpy as np
import pytest
import torch

from occface.config import ConfigError, load_config
from occface.demo import default_config_path, run_demo
from occface.errors import InputError
from occface.scoring import calibrated_fusion_weight, choose_strata_rule, fuse, strata_rule
from occface.metrics import threshold_at_far
from occface.evaluate import evaluate_occlusion_pairs
from occface.models.occface import OccFaceModel
from occface.objective import MultiTaskModule
from occface.train import Trainer, TrainingError, atomic_save, build_data, calibrate, recalibrate

from conftest import write_png

TINY = [
    "model.arch=ir_18", "model.width=0.125", "model.occlusion_hidden_channels=8",
    "data.procedural_identities=8", "data.procedural_images=4", "data.identities_per_batch=3",
    "data.images_per_identity=2", "data.crop=0.2", "data.low_res=0.2",
    "optim.warmup_steps=2", "optim.schedule=cosine", "optim.lr=0.05",
    "train.val_identities=2", "train.val_pairs=8", "train.log_every=1", "train.image_grid_every=2",
    "train.progress=false",
]


def tiny_config(tmp_path, *extra):
    return load_config(default_config_path(), [*TINY, f"train.out_dir={tmp_path}", *extra])


def module_state(trainer):
    return {k: v.clone() for k, v in trainer.module.state_dict().items()}


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  arch: ir_50\n  widht: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.model: unknown key\(s\) \['widht'\]"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not a valid"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    shipped = sorted(default_config_path().parent.glob("*.yaml"))
    assert {"demo_cpu.yaml", "finetune_adaface.yaml", "finetune_mobilefacenet.yaml"} <= {p.name for p in shipped}
    for path in shipped:
        load_config(path)


@pytest.mark.parametrize("width", ["0.125", "0.25"])
def test_a_killed_run_resumes_to_the_same_weights(tmp_path, width):
    """6 steps straight vs 3 steps, a 'kill', and a resume: identical weights (CPU, fixed seed). At
    width 0.25 the run trains in channels-last memory; at 0.125 it cannot (channels_last_trains)."""
    steps = ("train.max_steps=6", "train.checkpoint_every=3", f"model.width={width}")
    straight = Trainer(tiny_config(tmp_path / "a", *steps))
    straight.fit()
    assert straight.channels_last == (width == "0.25")
    first = Trainer(tiny_config(tmp_path / "b", *steps))
    assert first.fit(stop_after=3) == {"stopped_at": 3}
    resumed = Trainer(tiny_config(tmp_path / "b", *steps), resume=True)
    summary = resumed.fit()
    assert summary["steps"] == 6
    expected, actual = module_state(straight), module_state(resumed)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    before_kill = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert before_kill["step"] == 6 and before_kill["num_classes"] == 6


def test_outputs_of_a_run(tmp_path, monkeypatch):
    # A tiny run's sources barely separate anything, and the chosen weight would be the 0.5 the
    # validation used to fuse with anyway; a lopsided choice shows which weight the validation uses.
    monkeypatch.setattr("occface.training.calibration.choose_fusion_weights", lambda *args, **kwargs: {"all": 0.9})
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=2"))
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["validation"]["fused"]["all"]["pairs"] == 24
    for name in ("config.yaml", "summary.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "images/step_000002.png"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    model = OccFaceModel.from_pretrained(tmp_path / "model")
    assert set(model.config.calibration) == {"embedding", "qaconv", "qaconv_weighted", "fused", "normalization",
                                             "fusion_weight", "precision", "search"}
    search = model.config.calibration["search"]  # the re-rank fitted on searches of the validation people
    assert set(search) >= {"normalization", "fusion_weight", "threshold", "fpir", "validation"}
    assert model.config.calibration["precision"] == "fp32"
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model(images)
    assert out.occlusion.shape == (2, 1, 7, 7) and out.embedding.shape == (2, 512)
    # The validation's fused figures are those of the exported model's own (calibrated) fusion.
    metrics, _, _ = evaluate_occlusion_pairs(model, trainer.data.validation,
                                             fusion_weight=calibrated_fusion_weight(model))
    assert strata_rule(model) == {"hidden_below": 0.2, "hidden_share": 0.25}  # the fixed rule by default
    assert metrics["fused"]["all"]["auc"] == pytest.approx(summary["validation"]["fused"]["all"]["auc"])
    assert metrics["fused"]["all"]["accuracy"] == pytest.approx(summary["validation"]["fused"]["all"]["accuracy"])
    # A model saved with another rule's calibration is calibrated again with this version's; the
    # weights stay as they were.
    monkeypatch.undo()
    calibration = recalibrate(tmp_path)
    again = OccFaceModel.from_pretrained(tmp_path / "model")
    assert calibration["fusion_weight"] != {"all": 0.9}
    assert again.config.calibration["fusion_weight"] == calibration["fusion_weight"]
    assert again.config.calibration["fused"]["threshold"] == pytest.approx(calibration["fused"]["threshold"])
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_run_without_qaconv_is_decided_by_its_embedding_alone(tmp_path):
    """An embedding-only fine-tune (QAConv's pair loss at 0) leaves QAConv and the occlusion head as
    initialised: its saved model fuses nothing, so `match`, verification and search use the embedding."""
    from occface.galleries.search import fusion_for_search
    from occface.match import match

    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1", "loss.qaconv_weight=0", "loss.occlusion_weight=0"))
    trainer.fit()
    model = OccFaceModel.from_pretrained(tmp_path / "model")
    assert set(model.config.calibration) == {"embedding", "precision"}
    assert fusion_for_search(model.config.calibration)[3] == "none"
    faces = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    result = match(model, faces[0], faces[1], precision="fp32")
    assert "fused" not in result["scores"] and set(result["decisions"]) == {"embedding"}
    assert set(recalibrate(tmp_path)) == {"embedding", "precision"}


def test_calibrated_strata_rule_is_stored_and_used(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1", "train.calibrate_strata=true"))
    trainer.fit()
    model = OccFaceModel.from_pretrained(tmp_path / "model")
    _, _, features = evaluate_occlusion_pairs(model, trainer.data.validation)
    assert strata_rule(model) == choose_strata_rule(features.occlusion, features.occluded.numpy())


def test_calibration_thresholds_the_fusion_it_stores():
    rng = np.random.default_rng(0)
    issame = np.tile([True, False], 200)
    strata = np.repeat(["occluded-clean", "clean-clean"], 200)
    scores = {"embedding": np.where(strata == "clean-clean", issame * 2.0, 0) + rng.normal(0, 1, 400),
              "qaconv": rng.normal(0, 1, 400), "qaconv_weighted": issame * 1.0 + rng.normal(0, 1, 400),
              "fused": np.zeros(400)}  # the validation's fusion at 0.5: replaced
    calibration, stored_fused = calibrate(scores, issame, strata)
    weight = calibration["fusion_weight"]
    # plain QAConv is noise here: no share anywhere
    assert weight["occluded-clean"]["embedding"] < 0.2 < weight["clean-clean"]["embedding"]
    assert all(shares["qaconv"] == 0 for shares in weight.values())
    fused = fuse(scores, calibration["normalization"], weight, strata)
    assert calibration["fused"]["threshold"] == threshold_at_far(fused, issame, 0.01)
    np.testing.assert_array_equal(stored_fused, fused)
    assert calibration["qaconv"]["threshold"] == threshold_at_far(scores["qaconv"], issame, 0.01)
    assert calibrate(scores, issame, strata, choose_weights=False)[0]["fusion_weight"] == 0.5


def test_non_finite_losses_skip_the_update_then_stop_the_run(tmp_path, monkeypatch):
    original = MultiTaskModule.forward
    calls = {"n": 0}

    def sometimes_nan(self, images, labels, masks, clean=None, targets=None):
        terms = original(self, images, labels, masks, clean, targets)
        calls["n"] += 1
        if calls["n"] == 2 or calls["n"] >= 4:
            terms["qaconv"] = terms["qaconv"] * float("nan")
        return terms

    monkeypatch.setattr(MultiTaskModule, "forward", sometimes_nan)
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=20", "train.max_bad_steps=2"))
    with pytest.raises(TrainingError, match=r"non-finite for 3 steps in a row \(last at step 6: qaconv\)"):
        trainer.fit()
    assert trainer.skipped == 4


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before:UserWarning")
def test_a_skipped_step_leaves_the_weights_alone(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=1"))
    original = MultiTaskModule.forward

    def nan_once(self, images, labels, masks, clean=None, targets=None):
        terms = original(self, images, labels, masks, clean, targets)
        terms["adaface"] = torch.full_like(terms["adaface"], float("inf"))
        return terms

    monkeypatch.setattr(MultiTaskModule, "forward", nan_once)
    trainer._setup()
    before = {k: v.clone() for k, v in trainer.module.named_parameters()}
    trainer.resume = False
    monkeypatch.setattr(trainer, "_setup", lambda: None)
    trainer.fit()
    assert trainer.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.module.named_parameters())


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)

    def broken_save(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        Trainer(tiny_config(tmp_path, "train.max_steps=1"), resume=True).fit()


def test_demo_end_to_end_at_tiny_size(tmp_path, capsys):
    report = run_demo(tmp_path, [*TINY, "train.max_steps=2"], eval_pairs=12)
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) == {"embedding", "qaconv", "qaconv_weighted", "fused", "visibility", "comparisons"}
    for source in ("embedding", "qaconv", "qaconv_weighted", "fused"):
        assert set(metrics[source]) == {"occluded-occluded", "occluded-clean", "clean-clean", "all"}
        assert {"accuracy", "tar@far=1e-2", "auc", "pairs"} <= set(metrics[source]["all"])
    for name in ("report.md", "roc.png", "visibility_grid.png"):
        assert (report / name).is_file()
    out = capsys.readouterr().out
    assert "| qaconv_weighted |" in out and "| qaconv_weighted − qaconv |" in out and str(report) in out


def test_train_command_and_resume_flag(tmp_path, capsys):
    from occface.cli import main

    args = ["train", "--config", str(default_config_path()), *TINY, f"train.out_dir={tmp_path}"]
    assert main([*args, "train.max_steps=2"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main([*args, "train.max_steps=3", "--resume"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["step"] == 3


def test_ddp_on_cpu_with_torchrun(tmp_path):
    """Two CPU ranks (gloo) under torchrun: one shared run, checkpoints written once."""
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this Python")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "occface.cli", "train",
               "--config", str(default_config_path()), *TINY, f"train.out_dir={tmp_path}", "train.max_steps=2",
               "train.devices=2", "train.accelerator=cpu", "data.procedural_identities=14"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trained 2 steps") == 1
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["step"] == 2 and state["num_classes"] == 12


def test_channels_last_training_guard():
    """IR nets below width 0.25 have 1x1 stride-2 shortcuts on 8 channels, whose channels-last CPU
    backward crashes PyTorch: they train contiguous; wider ones and MobileFaceNet channels-last."""
    from occface.models import ModelConfig, OccFaceModel
    from occface.train import channels_last_trains

    assert not channels_last_trains(OccFaceModel(ModelConfig(arch="ir_18", width=0.125)))
    assert channels_last_trains(OccFaceModel(ModelConfig(arch="ir_18", width=0.25)))
    assert channels_last_trains(OccFaceModel(ModelConfig(arch="mobilefacenet")))


def test_extra_val_identities_hold_people_of_every_extra_folder_out_of_training(tmp_path, face_folder):
    """`data.extra_val_identities=N`: the last N identities of each extra folder validate and never
    train; a folder without images (CFP's Protocol/) is not an identity; asking for more than a
    folder has, or for the option without extra folders, is an error."""
    rng = np.random.default_rng(1)
    extra = tmp_path / "extra"
    for identity in ("d01", "d02", "d03", "d04"):
        for index in range(3):
            write_png(extra / identity / f"{index}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    (extra / "Protocol").mkdir()
    (extra / "Protocol" / "pairs.txt").write_text("not an identity\n")
    folder = ["data.source=folder", f"data.path={face_folder}", f"data.extra_paths=[{extra}]", "train.val_identities=2"]
    bundle = build_data(tiny_config(tmp_path, *folder, "data.extra_val_identities=2"))
    assert sorted(bundle.train.identities) == ["alice", "d01", "d02"]
    assert sorted(bundle.holdout.identities) == ["bob", "carol", "d03", "d04"]
    assert len(bundle.train) == 4 + 6 and len(bundle.holdout) == 8 + 6
    variants = bundle.validation.dataset
    labels = {variants.identities[variants.targets[i]] for i in bundle.validation.pairs.ravel()}
    assert {"d03", "d04"} & labels  # validation pairs are drawn from the extra folder's people too
    plain = build_data(tiny_config(tmp_path, *folder))
    assert sorted(plain.train.identities) == ["alice", "d01", "d02", "d03", "d04"]
    assert sorted(plain.holdout.identities) == ["bob", "carol"]
    with pytest.raises(ConfigError, match=r"extra: data.extra_val_identities=4: .*at least one of the 4 identities"):
        build_data(tiny_config(tmp_path, *folder, "data.extra_val_identities=4"))
    # The same check for data.path's own validation people (it used to train on a wrong slice).
    with pytest.raises(ConfigError, match=r"faces: train.val_identities=3: .*at least one of the 3 identities"):
        build_data(tiny_config(tmp_path, *folder[:3], "train.val_identities=3"))
    with pytest.raises(ConfigError, match="needs data.source=folder and data.extra_paths"):
        build_data(tiny_config(tmp_path, "data.extra_val_identities=1"))


def test_identities_of_extra_folders_merge_by_name_unless_told_apart(tmp_path, face_folder, caplog):
    """Same-named identity folders of data.path and data.extra_paths are one person by default (and
    the log says how many); `data.merge_identities=false` keeps each folder's people apart, in
    training and validation; a folder named twice is an error."""
    rng = np.random.default_rng(2)
    extra = tmp_path / "numbered"
    for identity in ("alice", "bob", "dave", "erin"):  # numbered datasets collide like this
        for index in range(2):
            write_png(extra / identity / f"{index}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    folder = ["data.source=folder", f"data.path={face_folder}", f"data.extra_paths=[{extra}]", "train.val_identities=1"]
    with caplog.at_level(logging.INFO, logger="occface.data.datasets"):
        merged = build_data(tiny_config(tmp_path, *folder, "data.extra_val_identities=1"))
    assert merged.train.num_classes == 3  # alice, bob (merged across the two folders), dave
    assert "2 identity names occur in more than one dataset" in caplog.text
    apart = build_data(tiny_config(tmp_path, *folder, "data.extra_val_identities=1", "data.merge_identities=false"))
    assert apart.train.num_classes == 2 + 3
    assert sorted(apart.train.identities) == sorted([f"{face_folder}/alice", f"{face_folder}/bob", f"{extra}/alice",
                                                     f"{extra}/bob", f"{extra}/dave"])
    assert sorted(apart.holdout.identities) == [f"{face_folder}/carol", f"{extra}/erin"]
    labels = [apart.train.targets[i] for i in range(len(apart.train))]
    assert labels.count(apart.train.identities.index(f"{extra}/alice")) == 2
    (extra / "erin").rename(extra / "carol")  # carol validates in data.path and would train from the extra folder
    with pytest.raises(ConfigError, match=r"1 validation identities also train \(carol\)"):
        build_data(tiny_config(tmp_path, *folder))
    kept_apart = build_data(tiny_config(tmp_path, *folder, "data.extra_val_identities=1", "data.merge_identities=false"))
    assert f"{extra}/carol" in kept_apart.train.identities and kept_apart.train.num_classes == 2 + 3
    with pytest.raises(ConfigError, match="name a folder twice"):
        build_data(tiny_config(tmp_path, *folder[:2], f"data.extra_paths=[{extra}, {extra}/]"))
