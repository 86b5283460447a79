from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from occface.data import IdentityBalancedSampler, ProceduralFaceDataset, ProceduralFaces

TARGETS = [label for label in range(10) for _ in range(3 + label % 4)] + [-1, -1]


def test_batches_hold_p_identities_times_k_images():
    sampler = IdentityBalancedSampler(TARGETS, identities_per_batch=4, images_per_identity=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        counts = Counter(TARGETS[i] for i in batch)
        assert len(batch) == 8 and len(counts) == 4 and set(counts.values()) == {2} and -1 not in counts
    used = [TARGETS[i] for batch in batches for i in batch]
    assert len(set(used)) == 8  # no identity twice within an epoch


def test_few_images_are_sampled_with_replacement():
    sampler = IdentityBalancedSampler([0, 1, 1, 1, 1, 2, 2, 2, 2], 3, 4, seed=1)
    (batch,) = list(sampler)
    assert Counter(batch)[0] == 4


def test_deterministic_per_seed_and_epoch():
    a = IdentityBalancedSampler(TARGETS, 2, 2, seed=5)
    b = IdentityBalancedSampler(TARGETS, 2, 2, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(IdentityBalancedSampler(TARGETS, 2, 2, seed=6)) != list(b)


def test_ranks_take_disjoint_equal_shares():
    shares = [list(IdentityBalancedSampler(TARGETS, 2, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2
    for step in range(2):
        ids = [{TARGETS[i] for i in shares[r][step]} for r in range(2)]
        assert not ids[0] & ids[1]
    every = [TARGETS[i] for share in shares for batch in share for i in batch]
    assert len(set(every)) == 8
    with pytest.raises(ValueError, match="cannot fill batches"):
        IdentityBalancedSampler(TARGETS, 6, 2, world_size=2)


def test_resume_skips_batches_already_seen():
    full = list(IdentityBalancedSampler(TARGETS, 2, 2, seed=9))
    resumed = IdentityBalancedSampler(TARGETS, 2, 2, seed=9)
    resumed.set_epoch(0, start_batch=3)
    assert list(resumed) == full[3:]


def test_occluded_fraction_sets_the_mix():
    targets = [label for label in range(4) for _ in range(20)]
    occluded = [i % 2 == 0 for i in range(80)]
    sampler = IdentityBalancedSampler(targets, 4, 10, seed=0, occluded=occluded, occluded_fraction=0.8)
    picks = []
    for epoch in range(30):
        sampler.set_epoch(epoch)
        picks += [occluded[i] for batch in sampler for i in batch]
    assert 0.75 < np.mean(picks) < 0.85


def test_loader_collates_face_samples():
    dataset = ProceduralFaceDataset(ProceduralFaces(6, 4, seed=0))
    sampler = IdentityBalancedSampler(dataset.targets, 3, 2, seed=0)
    batch = next(iter(DataLoader(dataset, batch_sampler=sampler)))
    assert batch.image.shape == (6, 3, 112, 112) and batch.mask.shape == (6, 1, 112, 112)
    assert batch.label.dtype == torch.int64 and batch.occluded.dtype == torch.bool
    assert torch.equal(batch.label[::2], batch.label[1::2])
