import argparse

import pytest
import torch
from safetensors.torch import save_file

from occface.models import Backbone, CheckpointError, describe_backbone_state, load_adaface_checkpoint


def trained_like(arch="ir_50", width=0.125, seed=0, **kwargs):
    """A backbone with non-default weights and running statistics in every tensor."""
    torch.manual_seed(seed)
    model = Backbone(arch, width=width, **kwargs)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(1 + 0.1 * torch.rand_like(tensor))
    return model.eval()


def save_adaface_ckpt(model, path):
    """The layout of AdaFace's released files: a Lightning checkpoint whose state_dict holds
    model.-prefixed backbone keys and head.* keys, beside pickled hyper-parameters."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["head.kernel"] = torch.randn(512, 10)
    state["head.t"] = torch.zeros(1)
    torch.save(
        {"epoch": 24, "global_step": 1000, "state_dict": state,
         "hyper_parameters": argparse.Namespace(arch="ir_50", head="adaface", m=0.4)},
        path,
    )


@pytest.mark.parametrize("arch", ["ir_50", "ir_se_50"])
@pytest.mark.parametrize("feature_level", ["block4", "block3"])
def test_adaface_lightning_checkpoint_round_trip(tmp_path, arch, feature_level):
    source = trained_like(arch)
    path = tmp_path / "adaface_ir50_ms1mv2.ckpt"
    save_adaface_ckpt(source, path)
    target = load_adaface_checkpoint(Backbone(arch, feature_level, width=0.125), path).eval()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected, loaded = source(x), target(x)
    assert torch.isfinite(expected.embedding).all()
    torch.testing.assert_close(loaded.embedding, expected.embedding)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_plain_state_dicts(tmp_path, suffix):
    source = trained_like("ir_18")
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    target = load_adaface_checkpoint(Backbone("ir_18", "block3", width=0.125), path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())


def test_ddp_prefixed_state_dict(tmp_path):
    source = trained_like("ir_18")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    target = load_adaface_checkpoint(Backbone("ir_18", width=0.125), tmp_path / "ddp.pt")
    assert torch.equal(target.input_layer[0].weight, source.input_layer[0].weight)


def test_another_architecture_is_an_error_naming_the_keys(tmp_path):
    path = tmp_path / "ir18.ckpt"
    save_adaface_ckpt(trained_like("ir_18"), path)
    target = Backbone("ir_50", width=0.125)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_adaface_checkpoint(target, path)
    message = str(error.value)
    assert str(path) in message
    assert "looks like ir_18, width 0.125, input 112x112" in message
    assert "missing (306 tensors in 102 modules): body.3.shortcut_layer.0, body.3.shortcut_layer.1" in message
    assert "unexpected (18 tensors" in message and "shape mismatches (72)" in message
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_another_width_or_input_size_is_a_shape_error(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(trained_like("ir_18", width=0.25).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(146\): .*checkpoint \[16, 16, 3, 3\] vs model \[8, 8, 3, 3\]"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), path)
    torch.save(trained_like("ir_18", input_size=224).state_dict(), path)
    with pytest.raises(CheckpointError, match="input 224x224"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), path)


def test_unexpected_keys_are_an_error(tmp_path):
    state = trained_like("ir_18").state_dict()
    state["occlusion_head.conv1.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected \(1 tensors in 1 modules\): occlusion_head.conv1$"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), tmp_path / "extra.pt")


def test_unreadable_files_are_errors_naming_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.ckpt: not a readable PyTorch checkpoint"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), corrupt)
    with pytest.raises(CheckpointError, match="missing.ckpt: no such checkpoint file"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), tmp_path / "missing.ckpt")
    torch.save({"not": "weights"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), tmp_path / "other.pt")


class _Custom:  # a class no allow-list knows: loading a pickle holding it needs trust
    pass


def test_untrusted_pickled_objects_need_an_explicit_opt_in(tmp_path):
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained_like("ir_18").state_dict().items()},
                "extra": _Custom()}, path)
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_adaface_checkpoint(Backbone("ir_18", width=0.125), path)
    load_adaface_checkpoint(Backbone("ir_18", width=0.125), path, trusted=True)


def test_describe_full_size_states():
    assert describe_backbone_state(Backbone("ir_101").state_dict()) == "ir_101, width 1, input 112x112"
    assert describe_backbone_state(Backbone("ir_se_50", width=0.125).state_dict()).startswith("ir_se_50")
    assert describe_backbone_state({"weight": torch.zeros(1)}).startswith("no backbone occface knows")
