"""GPU behaviour: half-precision scoring and autocast training steps. Skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

from occface.models import Backbone, OcclusionHead, QAConv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def trained_matcher(side):
    torch.manual_seed(0)
    qaconv = QAConv(64, side, side)
    with torch.no_grad():
        qaconv.fc.weight.normal_(0.02, 0.01)
        qaconv.logit_bn.running_var.fill_(0.01)
    return qaconv.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", [7, 14])
def test_score_all_on_gpu_matches_cpu(dtype, side):
    qaconv = trained_matcher(side)
    probe, gallery = torch.randn(20, 64, side, side), torch.randn(50, 64, side, side)
    probe_occ, gallery_occ = torch.rand(20, 1, side, side), torch.rand(50, 1, side, side)
    expected = qaconv.score_all(probe, gallery, probe_occ, gallery_occ)
    gpu = qaconv.cuda().score_all(probe, gallery, probe_occ, gallery_occ, device="cuda", dtype=dtype,
                                  block_elements=4 * side**4 * 6)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    tolerance = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.3}[dtype]
    assert (gpu.cpu() - expected).abs().max().item() < tolerance
    assert torch.corrcoef(torch.stack([gpu.cpu().flatten(), expected.flatten()]))[0, 1] > 0.999


def test_streamed_cpu_gallery_scored_on_gpu():
    qaconv = trained_matcher(7).cuda()
    probe, gallery = torch.randn(4, 64, 7, 7), torch.randn(30, 64, 7, 7)
    whole = qaconv.score_all(probe.cuda(), gallery.cuda())
    streamed = qaconv.score_all(probe, (gallery[i : i + 7].half() for i in range(0, 30, 7)), device="cuda")
    torch.testing.assert_close(streamed, whole, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("feature_level", ["block4", "block3"])
def test_autocast_training_step(feature_level):
    torch.manual_seed(0)
    backbone = Backbone("ir_50", feature_level).cuda()
    head = OcclusionHead(backbone.feature_channels).cuda()
    qaconv = QAConv(backbone.feature_channels, backbone.feature_size, backbone.feature_size).cuda()
    images = torch.randn(8, 3, 112, 112, device="cuda")
    labels = torch.arange(4, device="cuda").repeat(2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = backbone(images)
        occ = head(out.feature_map)
        scores = qaconv(out.feature_map, out.feature_map, occ, occ)
        same = (labels[:, None] == labels[None, :]).float()
        loss = F.binary_cross_entropy_with_logits(scores.float(), same) + F.mse_loss(occ.float(), torch.ones_like(occ).float())
    loss.backward()
    assert torch.isfinite(loss)
    grad = backbone.input_layer[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
