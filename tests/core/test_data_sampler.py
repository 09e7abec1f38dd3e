"""PKSampler invariants: P x K batches, coverage, ranks' slices of the global batch, determinism."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from reid_core.data import PKSampler

# 23 identities with 1..40 images each (some fewer than K, some many chunks), indices shuffled.
RNG = np.random.default_rng(0)
SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 20, 25, 31, 40, 4, 4, 6, 2, 10, 11, 3, 5]
LABELS = RNG.permutation(np.repeat(np.arange(100, 100 + len(SIZES)), SIZES)).tolist()
P, K = 4, 4


def check_pk(batch: list[int], labels: list[int]) -> set[int]:
    assert len(batch) == P * K
    pids = [labels[i] for i in batch]
    counts = Counter(pids)
    assert len(counts) == P and set(counts.values()) == {K}
    # each identity's K images are consecutive in the batch
    assert all(len(set(pids[j * K:(j + 1) * K])) == 1 for j in range(P))
    return set(counts)


def test_pk_structure_and_every_identity_each_epoch():
    sampler = PKSampler(LABELS, P * K, K, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        covered = set().union(*(check_pk(b, LABELS) for b in batches))
        assert covered == set(LABELS)


def test_epoch_is_about_one_pass_over_the_images():
    sampler = PKSampler(LABELS, P * K, K, seed=0)
    chunks = sum(-(-n // K) for n in SIZES)
    assert len(sampler) == round(chunks / P)
    used = Counter(i for b in sampler for i in b)
    # all but the images of at most the chunks of one dropped batch appear
    assert len(used) >= len(LABELS) - P * K


def test_identity_with_fewer_than_k_images_is_sampled_with_replacement():
    labels = [0] * 1 + [1] * 2 + [2] * 6 + [3] * 8
    sampler = PKSampler(labels, 2 * K, K, seed=1)
    batches = list(sampler)
    singles = [i for b in batches for i in b if labels[i] == 0]
    assert singles and set(singles) == {0} and len(singles) % K == 0


def test_two_ranks_split_each_global_batch_into_whole_identities():
    ranks = [PKSampler(LABELS, P * K, K, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(PKSampler(LABELS, P * K, K, seed=7))
    for epoch in (0, 1):
        for first, second in zip(ranks[0].batches(epoch), ranks[1].batches(epoch)):
            assert len(first) == len(second) == P * K // 2
            ids = [{LABELS[i] for i in half} for half in (first, second)]
            assert len(ids[0]) == len(ids[1]) == P // 2 and ids[0].isdisjoint(ids[1])
            check_pk(first + second, LABELS)


def test_same_epoch_same_batches_other_epoch_other_batches():
    a = PKSampler(LABELS, P * K, K, seed=3)
    b = PKSampler(LABELS, P * K, K, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # the iteration advanced to epoch 6
    a.set_epoch(5)
    assert list(a) == first
    assert PKSampler(LABELS, P * K, K, seed=4).batches(5) != first


def test_too_few_identities_per_rank_is_an_error():
    with pytest.raises(ValueError, match="identities"):
        PKSampler([0, 0, 1, 1, 2, 2], 4 * K, K)
    with pytest.raises(ValueError, match="multiple"):
        PKSampler(LABELS, 10, 4)
    with pytest.raises(ValueError, match="world_size x num_instance"):
        PKSampler(LABELS, 8, 4, rank=0, world_size=4)
