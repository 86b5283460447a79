import pytest
import torch

from occface.models import OcclusionHead


@pytest.mark.parametrize("channels, side", [(512, 7), (256, 14)])
def test_shape_and_range(channels, side):
    torch.manual_seed(0)
    head = OcclusionHead(channels).eval()
    x = torch.randn(3, channels, side, side) * 100  # large inputs drive the sigmoid to its ends
    out = head(x)
    assert out.shape == (3, 1, side, side)
    assert out.min() >= 0 and out.max() <= 1
    assert out.min() < 0.05 and out.max() > 0.95


def test_layers_and_initialisation():
    torch.manual_seed(0)
    head = OcclusionHead(512, hidden_channels=128)
    assert head.conv1.kernel_size == (3, 3) and head.conv1.padding == (1, 1)
    assert head.conv2.kernel_size == (1, 1) and head.conv2.out_channels == 1
    assert head.conv1.weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    assert head.conv2.weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.2)
    assert torch.all(head.conv1.bias == 0) and torch.all(head.conv2.bias == 0)
    assert torch.all(head.bn.weight == 1) and torch.all(head.bn.bias == 0)
    head.conv1.weight.data.zero_()
    head.reset_parameters()
    assert head.conv1.weight.std() > 0


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, 256, H, W\]"):
        OcclusionHead(256)(torch.randn(1, 512, 7, 7))
