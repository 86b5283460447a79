
import pytest
import torch
import torch.nn.functional as F

from occface.losses import LossWeights, MarginHead, QAConvPairLoss, occlusion_loss
from occface.models import QAConv


def unit(x):
    return F.normalize(x, dim=1)


def test_adaface_defaults_are_the_papers():
    head = MarginHead(8, 5)
    assert (head.kind, head.m, head.h, head.s, head.t_alpha) == ("adaface", 0.4, 0.333, 64.0, 0.01)


def test_adaface_margin_follows_the_norm():
    torch.manual_seed(0)
    head = MarginHead(8, 5).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(5.0)
    embeddings = unit(torch.randn(2, 8)).repeat(2, 1)
    labels = torch.tensor([1, 3, 1, 3])
    norms = torch.tensor([[10.0], [10.0], [30.0], [30.0]])  # low quality, then high quality
    logits = head(embeddings, norms, labels)
    cosine = embeddings @ F.normalize(head.kernel, dim=0)
    theta = torch.acos(cosine[torch.arange(4), labels])
    g = (torch.tensor([-10.0, -10.0, 10.0, 10.0]) / 5.001 * 0.333).clamp(-1, 1)  # z-scored norm times h
    expected = 64 * (torch.cos(theta - 0.4 * g) - (0.4 + 0.4 * g))
    torch.testing.assert_close(logits[torch.arange(4), labels], expected, atol=1e-3, rtol=1e-4)
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(4), labels] = False
    torch.testing.assert_close(logits[others], 64 * cosine[others])


def test_adaface_updates_norm_statistics_only_in_training():
    head = MarginHead(8, 5)
    norms = torch.full((4, 1), 40.0)
    head(unit(torch.randn(4, 8)), norms, torch.arange(4))
    assert head.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * 40)
    head.eval()
    head(unit(torch.randn(4, 8)), norms, torch.arange(4))
    assert head.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * 40)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_arcface_and_cosface(kind):
    torch.manual_seed(1)
    head = MarginHead(8, 4, kind=kind, m=0.5 if kind == "arcface" else 0.35, s=30)
    embeddings, labels = unit(torch.randn(3, 8)), torch.tensor([0, 2, 3])
    logits = head(embeddings, torch.ones(3, 1), labels)
    cosine = (embeddings @ F.normalize(head.kernel, dim=0))[torch.arange(3), labels]
    expected = torch.cos(torch.acos(cosine) + 0.5) if kind == "arcface" else cosine - 0.35
    torch.testing.assert_close(logits[torch.arange(3), labels], 30 * expected, atol=1e-4, rtol=1e-4)


def test_unknown_head_and_too_few_classes():
    with pytest.raises(ValueError, match="unknown margin head"):
        MarginHead(8, 4, kind="sphereface")
    with pytest.raises(ValueError, match="at least 2 classes"):
        MarginHead(8, 1)


def test_qaconv_pair_loss_and_accuracy():
    torch.manual_seed(0)
    matcher = QAConv(16, 7, 7)
    loss_fn = QAConvPairLoss(matcher, triplet_margin=0.5)
    identities = torch.randn(3, 16, 7, 7)
    features = identities.repeat_interleave(2, 0) + 0.05 * torch.randn(6, 16, 7, 7)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, accuracy = loss_fn(features, labels)
    assert accuracy.item() == 1.0 and loss.item() > 0
    shuffled = torch.tensor([0, 1, 2, 0, 1, 2])
    _, wrong = loss_fn(features, shuffled)
    assert wrong.item() < 1.0
    loss.backward()
    assert matcher.fc.weight.grad is not None and matcher.fc.weight.grad.abs().sum() > 0


def test_occlusion_loss_downsamples_the_mask():
    mask = torch.ones(2, 1, 112, 112)
    mask[:, :, 64:] = 0
    predicted = torch.zeros(2, 1, 7, 7)
    predicted[:, :, :4] = 1
    assert occlusion_loss(predicted, mask).item() == 0.0
    assert occlusion_loss(torch.ones(2, 1, 7, 7), mask).item() == pytest.approx(3 / 7)


def test_occlusion_weight_warms_up_linearly():
    weights = LossWeights(occlusion=1.0, occlusion_start=0.1, occlusion_warmup_steps=10)
    assert weights.at(0)["occlusion"] == pytest.approx(0.1)
    assert weights.at(5)["occlusion"] == pytest.approx(0.55)
    assert weights.at(50)["occlusion"] == 1.0
    assert LossWeights(occlusion=0.5).at(0)["occlusion"] == 0.5
