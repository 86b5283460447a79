"""Identity-balanced batches (P identities x K images) for QAConv's pairwise losses."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from .errors import InputError


class IdentityBalancedSampler(Sampler[list[int]]):
    """Yields batches of ``identities_per_batch`` (P) identities x ``images_per_identity`` (K)
    dataset indices, so every batch holds K same-identity images of each of P people.

    Deterministic in ``(seed, epoch)``; call :meth:`set_epoch` each epoch. Under DDP each rank
    (``rank`` of ``world_size``) takes a disjoint share of the epoch's identity groups, and every
    rank yields the same number of batches. An identity with fewer than K images is sampled with
    replacement. Indices with a negative label are never used.

    With ``occluded`` flags and ``occluded_fraction``, each of the K picks of an identity that has
    both occluded and clean images is drawn from its occluded ones with that probability, so a
    batch mixes occluded and clean faces at a set ratio.

    ``set_epoch(epoch, start_batch=n)`` skips the epoch's first ``n`` batches, so a resumed run
    sees exactly the batches it had not seen yet (the trainer counts the batches it consumed; the
    sampler cannot, as data loaders fetch indices ahead).
    """

    def __init__(self, targets: Sequence[int], identities_per_batch: int, images_per_identity: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 occluded: Sequence[bool] | None = None, occluded_fraction: float | None = None) -> None:
        if identities_per_batch < 1 or images_per_identity < 1:
            raise ValueError("identities_per_batch and images_per_identity must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        targets = np.asarray(targets)
        labels = np.unique(targets[targets >= 0])
        if len(labels) < identities_per_batch * world_size:
            raise InputError(f"{len(labels)} identities cannot fill batches of {identities_per_batch} identities "
                             f"on {world_size} rank(s)")
        if occluded_fraction is not None and occluded is None:
            raise ValueError("occluded_fraction needs the per-index occluded flags")
        self.p, self.k = identities_per_batch, images_per_identity
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.occluded_fraction = occluded_fraction
        flags = np.zeros(len(targets), bool) if occluded is None else np.asarray(occluded, bool)
        self.pools = []  # per identity: (occluded indices, clean indices)
        for label in labels:
            members = np.flatnonzero(targets == label)
            self.pools.append((members[flags[members]], members[~flags[members]]))
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        """Batches per epoch (on every rank)."""
        return len(self.pools) // (self.p * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _pick(self, pool: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> list[int]:
        occluded, clean = pool
        every = np.concatenate([occluded, clean])
        if self.occluded_fraction is not None and len(occluded) and len(clean):
            from_occluded = rng.random(self.k) < self.occluded_fraction
            return [int(rng.choice(occluded if o else clean)) for o in from_occluded]
        return [int(i) for i in rng.choice(every, size=self.k, replace=len(every) < self.k)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.pools))
        batches = len(self)
        groups = order[: batches * self.p * self.world_size].reshape(batches, self.world_size, self.p)
        for number in range(batches):
            # Every rank draws the same picks, then keeps its own share: ranks stay in step.
            picks = [self._pick(self.pools[identity], rng) for identity in groups[number].ravel()]
            if number < self.start_batch:
                continue
            mine = picks[self.rank * self.p : (self.rank + 1) * self.p]
            yield [index for identity_picks in mine for index in identity_picks]
