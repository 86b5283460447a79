import pytest
import torch

from occface.models import FEATURE_LEVELS, STAGE_UNITS, Backbone, OcclusionHead, QAConv

SMALL = 0.125  # 8/16/32/64 channels: every arch and size runs in well under a second


@pytest.mark.parametrize("arch", list(STAGE_UNITS))
@pytest.mark.parametrize("feature_level", FEATURE_LEVELS)
@pytest.mark.parametrize("input_size", [112, 224])
def test_output_shapes(arch, feature_level, input_size):
    torch.manual_seed(0)
    model = Backbone(arch, feature_level, input_size, width=SMALL).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, input_size, input_size))
    stage = 2 if feature_level == "block3" else 3
    side = input_size // 2 ** (stage + 1)
    assert out.embedding.shape == (2, 512)
    assert out.norm.shape == (2, 1)
    assert out.feature_map.shape == (2, round((256, 512)[stage - 2] * SMALL), side, side)
    assert (model.feature_channels, model.feature_size) == tuple(out.feature_map.shape[1:3])
    torch.testing.assert_close(out.embedding.norm(dim=1), torch.ones(2))
    assert (out.norm > 0).all()


@pytest.mark.parametrize(
    "feature_level, channels, side", [("block4", 512, 7), ("block3", 256, 14)]
)
def test_full_width_ir50_feature_maps(feature_level, channels, side):
    model = Backbone("ir_50", feature_level).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 112))
    assert out.feature_map.shape == (1, channels, side, side)


def test_block3_is_read_after_the_last_unit_of_stage_three():
    assert Backbone("ir_50", "block3").feature_index == 20
    assert Backbone("ir_101", "block3").feature_index == 45
    assert Backbone("ir_18", "block3").feature_index == 5
    assert Backbone("ir_50", "block4").feature_index == 23


def test_block3_map_equals_running_the_body_prefix():
    torch.manual_seed(0)
    model = Backbone("ir_34", "block3", width=SMALL).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model.body[: model.feature_index + 1](model.input_layer(x))
        torch.testing.assert_close(model(x).feature_map, expected)


def test_parameter_names_follow_adaface_layout():
    state = Backbone("ir_50").state_dict()
    # Stage 1 keeps 64 channels: its first unit's shortcut is a parameter-free strided max-pool.
    assert not any(k.startswith("body.0.shortcut_layer") for k in state)
    assert state["body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
    assert state["body.3.shortcut_layer.1.running_var"].shape == (128,)
    assert state["body.23.res_layer.4.weight"].shape == (512, 512, 3, 3)
    assert state["body.23.res_layer.3.weight"].shape == (512,)  # PReLU
    assert state["input_layer.0.weight"].shape == (64, 3, 3, 3)
    assert state["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert "output_layer.4.weight" not in state  # BatchNorm1d(affine=False)
    assert "output_layer.4.running_mean" in state
    se = Backbone("ir_se_50").state_dict()
    assert se["body.5.res_layer.se_block.fc1.weight"].shape == (128 // 16, 128, 1, 1)
    assert set(Backbone("ir_50", "block3").state_dict()) == set(state)
    assert Backbone("ir_50", input_size=224).state_dict()["output_layer.3.weight"].shape == (512, 512 * 14 * 14)


def test_parameter_counts_match_the_published_networks():
    counts = {a: sum(p.numel() for p in Backbone(a).parameters()) for a in ("ir_50", "ir_101")}
    assert round(counts["ir_50"] / 1e6, 1) == 43.6
    assert round(counts["ir_101"] / 1e6, 1) == 65.2


def test_adaface_initialisation():
    torch.manual_seed(0)
    model = Backbone("ir_50", width=0.5)
    conv = model.body[10].res_layer[1].weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert torch.all(model.body[10].res_layer[0].weight == 1)
    assert torch.all(model.output_layer[3].bias == 0)


def test_wrong_input_shape_is_a_clear_error():
    model = Backbone("ir_18", width=SMALL)
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\]"):
        model(torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "ir_52"}, "unknown arch"),
    ({"feature_level": "block2"}, "unknown feature_level"),
    ({"input_size": 128}, "input_size"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Backbone(**kwargs)


@pytest.mark.parametrize("feature_level", FEATURE_LEVELS)
def test_gradients_reach_the_backbone_from_head_and_qaconv(feature_level):
    torch.manual_seed(0)
    model = Backbone("ir_18", feature_level, width=SMALL)
    out = model(torch.randn(4, 3, 112, 112))
    head = OcclusionHead(model.feature_channels, hidden_channels=16)
    qaconv = QAConv(model.feature_channels, model.feature_size, model.feature_size)
    first_conv = model.input_layer[0].weight
    tapped_unit = model.body[model.feature_index].res_layer[1].weight

    occ = head(out.feature_map)
    (grad_head,) = torch.autograd.grad(occ.mean(), [first_conv], retain_graph=True)
    assert grad_head.abs().sum() > 0

    scores = qaconv(out.feature_map, out.feature_map, occ, occ)
    # (a plain sum would be constant: logit_bn in training mode centres the batch of scores)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, torch.eye(4))
    first_grad, tapped_grad = torch.autograd.grad(loss, [first_conv, tapped_unit])
    assert first_grad.abs().sum() > 0 and tapped_grad.abs().sum() > 0


def test_measure_batchnorm_sets_exact_statistics_of_the_images():
    """After one pass, every BatchNorm layer holds the mean and (unbiased) variance of its input
    over the given images; its momentum is what it was, the weights are untouched, eval mode."""
    from occface.models import measure_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3))
    net[1].running_mean.fill_(5.0)
    weight = net[0].weight.clone()
    images = torch.rand(6, 3, 8, 8) * 3
    assert measure_batchnorm(net, images) is net and not net.training
    inner = net[0](images).detach()
    assert torch.allclose(net[1].running_mean, inner.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var, inner.transpose(0, 1).flatten(1).var(1), atol=1e-5)
    assert net[1].momentum == 0.3 and torch.equal(net[0].weight, weight)
