import pytest
import torch
from safetensors.torch import load_file, save_file

from occface.models import CheckpointError
from occface.models.occface import ModelConfig, OccFaceModel

TINY = ModelConfig(arch="ir_18", width=0.125, occlusion_hidden_channels=8)


def tiny_model() -> OccFaceModel:
    torch.manual_seed(0)
    model = OccFaceModel(TINY)
    with torch.no_grad():
        model.qaconv.visibility_fc.weight.normal_()
    return model.eval()


def test_round_trip_is_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = OccFaceModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_model_saved_before_the_visibility_term_loads_with_it_at_zero(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["qaconv.visibility_fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = OccFaceModel.from_pretrained(tmp_path)
    assert torch.all(loaded.qaconv.visibility_fc.weight == 0)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"ir_18"', '"ir_34"'))
    with pytest.raises(CheckpointError, match=r"model.safetensors: weights do not fit the model in config.json"):
        OccFaceModel.from_pretrained(tmp_path)
