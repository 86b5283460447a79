import pytest
import torch
import torch.nn.functional as F

from occface.models import QAConv
from occface.models import qaconv as qaconv_module


def make_matcher(channels=32, side=7, seed=0, eval_mode=True):
    """A QAConv with non-trivial parameters and running statistics."""
    torch.manual_seed(seed)
    qaconv = QAConv(channels, side, side)
    with torch.no_grad():
        qaconv.fc.weight.normal_(0.0, 0.05)
        qaconv.fc.bias.fill_(0.3)
        qaconv.visibility_fc.weight.normal_(0.0, 0.5)
        for bn, mean, var in ((qaconv.bn, 0.2, 0.05), (qaconv.logit_bn, -0.4, 2.5)):
            bn.weight.fill_(1.3)
            bn.bias.fill_(-0.1)
            bn.running_mean.fill_(mean)
            bn.running_var.fill_(var)
    return qaconv.eval() if eval_mode else qaconv


def reference_scores(qaconv, probe, gallery, probe_occ=None, gallery_occ=None):
    """An independent, literal implementation of the reference semantics (QAConv v1.2's conv2d
    formulation: probe locations as 1x1 kernels over the gallery), with the spec's weighting
    applied to the full correlation tensor before the max pooling."""
    probe, gallery = F.normalize(probe, dim=1), F.normalize(gallery, dim=1)
    num_p, channels, h, w = probe.shape
    num_g, hw = gallery.shape[0], h * w
    kernel = probe.permute(0, 2, 3, 1).reshape(-1, channels, 1, 1)
    corr = F.conv2d(gallery, kernel).view(num_g, num_p, hw, hw)  # [g, p, probe loc, gallery loc]
    if probe_occ is not None or gallery_occ is not None:
        o_p = torch.ones(num_p, hw) if probe_occ is None else probe_occ.reshape(num_p, hw)
        o_g = torch.ones(num_g, hw) if gallery_occ is None else gallery_occ.reshape(num_g, hw)
        corr = corr * o_p.reshape(1, num_p, hw, 1) * o_g.reshape(num_g, 1, 1, hw)
    pooled = torch.cat((corr.max(dim=2)[0], corr.max(dim=3)[0]), dim=-1)  # [g, p, 2hw]
    score = qaconv.bn(pooled.view(-1, 1, 2 * hw)).view(-1, 2 * hw)
    # occface's visibility term: the head also sees [O_g, O_p] for each pair (ones without maps)
    o_p = torch.ones(num_p, hw) if probe_occ is None else probe_occ.reshape(num_p, hw)
    o_g = torch.ones(num_g, hw) if gallery_occ is None else gallery_occ.reshape(num_g, hw)
    visibility = torch.cat((o_g[:, None].expand(num_g, num_p, hw), o_p[None].expand(num_g, num_p, hw)), dim=-1)
    score = qaconv.logit_bn(qaconv.fc(score) + qaconv.visibility_fc(visibility.reshape(-1, 2 * hw)))
    return score.view(num_g, num_p).t()


def features(n, channels=32, side=7, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, channels, side, side)


def maps(n, side=7, seed=2):
    torch.manual_seed(seed)
    return torch.rand(n, 1, side, side)


@pytest.mark.parametrize("side", [7, 14])
@pytest.mark.parametrize("eval_mode", [True, False])
def test_matches_reference_semantics(side, eval_mode):
    qaconv = make_matcher(side=side, eval_mode=eval_mode)
    probe, gallery = features(5, side=side), features(6, side=side, seed=3)
    with torch.no_grad():
        ours = qaconv(probe, gallery)
        expected = reference_scores(qaconv, probe, gallery)
    assert ours.shape == (5, 6)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_elements", [1 << 20, 1000])
@pytest.mark.parametrize("same", [False, True])
def test_gradients_match_autograd_through_the_full_correlations(monkeypatch, block_elements, same):
    """The lean backward (argmax routing, probe blocks in the forward, one max reduction when a
    batch is scored against itself) gives the gradients that autograd gives through the dense
    correlation tensor, for features and visibility maps."""
    monkeypatch.setattr(qaconv_module, "CPU_BLOCK_ELEMENTS", block_elements)
    qaconv = make_matcher(side=7, eval_mode=False)
    probe, probe_occ = features(5).requires_grad_(), maps(5).requires_grad_()
    gallery, gallery_occ = (probe, probe_occ) if same else (features(6, seed=3).requires_grad_(), maps(6, seed=4).requires_grad_())
    weights = torch.randn(5, gallery.shape[0])
    inputs = (probe, gallery, probe_occ, gallery_occ)
    leaves = (probe, probe_occ) if same else inputs
    ours = torch.autograd.grad((qaconv(*inputs) * weights).sum(), leaves)
    expected = torch.autograd.grad((reference_scores(qaconv, *inputs) * weights).sum(), leaves)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_weighted_scores_match_weighting_the_correlations():
    qaconv = make_matcher()
    probe, gallery = features(4), features(5, seed=3)
    probe_occ, gallery_occ = maps(4), maps(5, seed=4)
    with torch.no_grad():
        ours = qaconv(probe, gallery, probe_occ, gallery_occ)
        expected = reference_scores(qaconv, probe, gallery, probe_occ, gallery_occ)
        one_sided = qaconv(probe, gallery, None, gallery_occ)
        expected_one_sided = reference_scores(qaconv, probe, gallery, None, gallery_occ)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_sided, expected_one_sided, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, qaconv(probe, gallery))


def test_all_ones_and_none_give_exactly_the_unweighted_score():
    qaconv = make_matcher()
    probe, gallery = features(3), features(4, seed=3)
    plain = qaconv(probe, gallery)
    assert torch.equal(qaconv(probe, gallery, torch.ones(3, 1, 7, 7), torch.ones(4, 1, 7, 7)), plain)
    assert torch.equal(qaconv(probe, gallery, None, None), plain)


def test_maps_are_clamped_to_unit_range():
    qaconv = make_matcher()
    probe, gallery = features(3), features(4, seed=3)
    over = torch.full((3, 1, 7, 7), 1.7)
    under = torch.full((4, 1, 7, 7), -0.5)
    assert torch.equal(qaconv(probe, gallery, over, None), qaconv(probe, gallery))
    assert torch.equal(qaconv(probe, gallery, None, under), qaconv(probe, gallery, None, torch.zeros(4, 1, 7, 7)))


@pytest.mark.parametrize("side_to_hide", ["probe", "gallery"])
def test_a_region_with_zero_visibility_has_no_influence(side_to_hide):
    qaconv = make_matcher()
    probe, gallery = features(3), features(4, seed=3)
    probe_occ, gallery_occ = torch.ones(3, 1, 7, 7), torch.ones(4, 1, 7, 7)
    hidden = probe if side_to_hide == "probe" else gallery
    occ = probe_occ if side_to_hide == "probe" else gallery_occ
    occ[:, :, 4:, :] = 0.0  # lower face hidden, as under a mask
    before = qaconv(probe, gallery, probe_occ, gallery_occ)
    changed = hidden.clone()
    changed[:, :, 4:, :] = torch.randn_like(changed[:, :, 4:, :]) * 5
    if side_to_hide == "probe":
        after = qaconv(changed, gallery, probe_occ, gallery_occ)
    else:
        after = qaconv(probe, changed, probe_occ, gallery_occ)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # ...whereas without the maps the same change does move the scores.
    unweighted = qaconv(changed, gallery) if side_to_hide == "probe" else qaconv(probe, changed)
    assert not torch.allclose(unweighted, qaconv(probe, gallery), atol=1e-3)


def test_identical_faces_score_higher_than_different_ones():
    qaconv = QAConv(32, 7, 7).eval()
    faces = features(6)
    scores = qaconv(faces, faces + 0.1 * torch.randn_like(faces))
    assert torch.all(scores.diagonal() > scores.masked_fill(torch.eye(6, dtype=torch.bool), -1e9).amax(dim=1))


@pytest.mark.parametrize("side", [7, 14])
@pytest.mark.parametrize("weighted", [False, True])
def test_score_all_equals_forward(side, weighted):
    qaconv = make_matcher(side=side)
    probe, gallery = features(7, side=side), features(11, side=side, seed=3)
    probe_occ = maps(7, side) if weighted else None
    gallery_occ = maps(11, side, seed=4) if weighted else None
    with torch.no_grad():
        expected = qaconv(probe, gallery, probe_occ, gallery_occ)
    # Tiny blocks force many probe and gallery chunks, including ragged last ones.
    blocked = qaconv.score_all(probe, gallery, probe_occ, gallery_occ, block_elements=3 * 2 * side**4)
    whole = qaconv.score_all(probe, gallery, probe_occ, gallery_occ)
    torch.testing.assert_close(blocked, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, expected, atol=1e-4, rtol=1e-4)


def test_score_all_streams_a_gallery_in_chunks():
    qaconv = make_matcher()
    probe, gallery, gallery_occ = features(4), features(10, seed=3), maps(10, seed=4)
    expected = qaconv.score_all(probe, gallery, None, gallery_occ)
    stream = [(gallery[:3], gallery_occ[:3]), (gallery[3:], gallery_occ[3:])]
    torch.testing.assert_close(qaconv.score_all(probe, iter(stream)), expected)
    plain_stream = (chunk for chunk in (gallery[:6], gallery[6:]))
    torch.testing.assert_close(qaconv.score_all(probe, plain_stream), qaconv.score_all(probe, gallery))


def test_score_all_uses_running_statistics_even_in_training_mode():
    qaconv = make_matcher(eval_mode=False)
    probe, gallery = features(3), features(4, seed=3)
    scores = qaconv.score_all(probe, gallery)
    assert qaconv.training
    assert not scores.requires_grad
    torch.testing.assert_close(scores, qaconv.eval()(probe, gallery), atol=1e-4, rtol=1e-4)


def test_score_all_memory_budget_bounds_the_block():
    qaconv = make_matcher(side=14)
    probe, gallery = features(3, side=14), features(5, side=14, seed=3)
    small = qaconv.score_all(probe, gallery, memory_budget_mb=0.5)  # one pair per block
    torch.testing.assert_close(small, qaconv.score_all(probe, gallery), atol=1e-5, rtol=1e-5)


def test_score_all_rejects_half_precision_on_cpu(monkeypatch):
    with pytest.raises(ValueError, match="float16 matmuls are for GPUs"):
        make_matcher().score_all(features(2), features(2), dtype=torch.float16)
    monkeypatch.setattr("occface.precision.cpu_bf16_support", lambda: (False, "no avx512_bf16 or amx_bf16 CPU flag"))
    with pytest.raises(ValueError, match="bf16 on this CPU would be emulated"):
        make_matcher().score_all(features(2), features(2), dtype=torch.bfloat16)


@pytest.mark.parametrize("bad_map", [torch.ones(3, 1, 14, 14), torch.ones(3, 7, 7), torch.ones(2, 1, 7, 7)])
def test_mismatched_map_is_a_clear_error(bad_map):
    qaconv = make_matcher()
    with pytest.raises(ValueError, match=r"probe_occ must be \[3, 1, 7, 7\]"):
        qaconv(features(3), features(4), bad_map, None)


def test_mismatched_features_are_a_clear_error():
    qaconv = make_matcher()
    with pytest.raises(ValueError, match=r"gallery features must be \[B, 32, 7, 7\]"):
        qaconv(features(3), features(4, channels=16))


def test_reset_parameters_and_running_stats():
    qaconv = make_matcher(eval_mode=False)
    qaconv.reset_running_stats()
    assert torch.all(qaconv.bn.running_mean == 0) and torch.all(qaconv.logit_bn.running_var == 1)
    assert torch.all(qaconv.bn.weight == 1.3)  # parameters untouched
    qaconv.reset_parameters()
    assert torch.allclose(qaconv.fc.weight, torch.full((1, 98), 1 / 98)) and qaconv.fc.bias.item() == 0
    assert torch.all(qaconv.bn.weight == 1) and torch.all(qaconv.logit_bn.bias == 0)
    assert torch.all(qaconv.visibility_fc.weight == 0)


def test_visibility_term_is_per_face_and_counts_hidden_locations_as_missing():
    """The visibility term adds u . [O_g, O_p] to each logit: a per-face offset that cannot change
    which gallery face a probe prefers when the gallery's maps are equal, and that is zero at reset."""
    qaconv = make_matcher()
    probe, gallery = features(3), features(4, seed=3)
    probe_occ, gallery_occ = maps(3), torch.ones(4, 1, 7, 7)
    with_term = qaconv(probe, gallery, probe_occ, gallery_occ)
    with torch.no_grad():
        saved = qaconv.visibility_fc.weight.clone()
        qaconv.visibility_fc.weight.zero_()
        without = qaconv(probe, gallery, probe_occ, gallery_occ)
        qaconv.visibility_fc.weight.copy_(saved)
    offset = with_term - without  # [P, G]: constant along each probe's row
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset), atol=1e-5, rtol=0)
    assert offset.abs().max() > 1e-3
    assert torch.equal(with_term.argsort(dim=1), without.argsort(dim=1))


@pytest.mark.parametrize("weighted", [False, True])
def test_score_pairs_equals_the_diagonal_of_score_all(weighted):
    qaconv = make_matcher()
    probe, gallery = features(9), features(9, seed=3)
    probe_occ, gallery_occ = (maps(9), maps(9, seed=4)) if weighted else (None, None)
    expected = qaconv.score_all(probe, gallery, probe_occ, gallery_occ).diagonal()
    torch.testing.assert_close(qaconv.score_pairs(probe, gallery, probe_occ, gallery_occ, batch_size=4), expected,
                               atol=1e-5, rtol=1e-5)
