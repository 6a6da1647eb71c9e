"""Sample order as a pure function of (seed, stages, source sizes, global index): every sample of a source
exactly once per epoch across stages, mixtures followed over every prefix, the same answer whoever asks
for whichever indices in whatever grouping."""

from __future__ import annotations

import numpy as np
import pytest

from hyrun.runtime.data.order import SampleOrder, Stage, epoch_keys, permute

SIZES = {"web": 300, "code": 500, "math": 70}
STAGES = [
    Stage("pretrain", 2000, {"web": 0.5, "code": 0.3, "math": 0.2}),
    Stage("anneal", 600, {"web": 0.1, "math": 0.9}),  # a source left out gets nothing
    Stage("long_context", 1000, {"code": 1.0}),
]


def _order(**kwargs) -> SampleOrder:
    return SampleOrder(17, STAGES, SIZES, **kwargs)


def test_every_sample_of_a_source_exactly_once_per_epoch_across_stages():
    order = _order(block_samples=256)
    ids, samples = order.lookup(np.arange(order.total_samples))
    _, draws = order.draws(np.arange(order.total_samples))
    for j, name in enumerate(order.sources):
        mine = ids == j
        q, s = draws[mine], samples[mine]
        # Draw numbers run on across stages without a gap or a repeat ...
        assert np.array_equal(np.sort(q), np.arange(mine.sum())), name
        s = s[np.argsort(q)]
        size = SIZES[name]
        full, rest = divmod(len(s), size)
        # ... and each epoch of draws is a permutation of the source's samples.
        for epoch in range(full):
            assert np.array_equal(np.sort(s[epoch * size:(epoch + 1) * size]), np.arange(size)), (name, epoch)
        assert len(np.unique(s[full * size:])) == rest
        # Epochs are shuffled differently.
        if full >= 2:
            assert not np.array_equal(s[:size], s[size:2 * size])


def test_mixture_counts_follow_the_weights_over_every_prefix():
    for mixture in ({"web": 0.5, "code": 0.5}, {"web": 0.9, "code": 0.1}, {"web": 0.7, "code": 0.2, "math": 0.1},
                    {"web": 0.5, "code": 0.25, "math": 0.25}, {"web": 3, "code": 2, "math": 1}):
        n = 12_000
        order = SampleOrder(0, [Stage("s", n, mixture)], {name: 1000 for name in SIZES}, block_samples=1000)
        ids, _ = order.draws(np.arange(n))
        weights = np.array([mixture.get(name, 0) for name in order.sources], float)
        weights /= weights.sum()
        counts = np.cumsum(np.eye(len(order.sources))[ids], axis=0)
        prefix = np.arange(1, n + 1)[:, None]
        deviation = np.abs(counts - prefix * weights)
        # Within one sample of the weights after every prefix for these mixtures (half a sample for two) ...
        assert deviation.max() <= (0.5 if len(mixture) == 2 else 1.0) + 1e-9, (mixture, deviation.max())
        # ... so within 1% of them over the stage.
        assert np.all(np.abs(counts[-1] - n * weights) <= 0.01 * n * weights + 1e-9)


def test_many_sources_stay_within_the_proven_bound():
    # In general |count - p*w| <= 0.5 + w * sources / 2 (each source within 0.5 at the merge time t, and
    # p within sources/2 of t); six sources reach 1.5 here.
    mixture = {f"s{i}": w for i, w in enumerate((0.5, 0.1, 0.1, 0.1, 0.1, 0.1))}
    n = 10_000
    order = SampleOrder(0, [Stage("s", n, mixture)], {name: 100 for name in mixture}, block_samples=777)
    ids, _ = order.draws(np.arange(n))
    weights = np.array(list(mixture.values()))
    deviation = np.abs(np.cumsum(np.eye(len(mixture))[ids], axis=0) - np.arange(1, n + 1)[:, None] * weights)
    assert np.all(deviation <= 0.5 + weights * len(mixture) / 2 + 1e-9)


def test_the_anneal_stage_uses_its_own_mixture():
    order = _order()
    ids, _ = order.lookup(np.arange(2000, 2600))
    counts = np.bincount(ids, minlength=3)
    assert counts[order.sources.index("code")] == 0
    assert abs(counts[order.sources.index("math")] - 540) <= 1 and abs(counts[order.sources.index("web")] - 60) <= 1
    assert order.stage_of(1999).name == "pretrain" and order.stage_of(2000).name == "anneal"


def test_deterministic_and_seeded():
    a, b = _order().lookup(np.arange(3600)), _order().lookup(np.arange(3600))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = SampleOrder(18, STAGES, SIZES).lookup(np.arange(3600))
    assert np.array_equal(a[0], other[0])  # the interleaving depends on the weights only
    assert not np.array_equal(a[1], other[1])  # the permutations on the seed


def test_any_layout_asks_for_any_index():
    reference = _order(block_samples=4096).lookup(np.arange(3600))
    # Four ranks striding the indices, a different block size and a tiny cache, asked in shuffled chunks.
    order = _order(block_samples=97, cached_blocks=2)
    ids, samples = np.full(3600, -1), np.full(3600, -1)
    rng = np.random.default_rng(0)
    for rank in rng.permutation(4):
        mine = np.arange(rank, 3600, 4)
        for chunk in np.array_split(rng.permutation(mine), 7):
            ids[chunk], samples[chunk] = order.lookup(chunk)
    assert np.array_equal(ids, reference[0]) and np.array_equal(samples, reference[1])
    name, sample = order(2345)
    assert (order.sources.index(name), sample) == (reference[0][2345], reference[1][2345])


def test_far_indices_cost_no_more_than_near_ones():
    # A 10^9-sample stage: any index is computed from a small window, nothing of the stage's size is built.
    order = SampleOrder(3, [Stage("a", 10**9, {"x": 0.6, "y": 0.4}), Stage("b", 10**8, {"x": 0.1, "y": 0.9})],
                        {"x": 10**8, "y": 3 * 10**7}, block_samples=1024)
    ids, samples = order.lookup(np.arange(10**9 - 5, 10**9 + 5))
    assert np.all(samples >= 0) and np.all(samples < np.where(ids == 0, 10**8, 3 * 10**7))
    _, draws = order.draws([10**9])
    assert draws[0] in (0.6 * 10**9, 0.4 * 10**9)  # the first draw of stage b continues stage a's count


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 64, 65, 1000, 4097])
def test_permute_is_a_bijection(size):
    values = permute(np.arange(size), size, epoch_keys(5, "web", 2))
    assert np.array_equal(np.sort(values), np.arange(size))


def test_bad_stages_are_refused_with_the_field():
    with pytest.raises(ValueError, match="unknown sources books"):
        SampleOrder(0, [Stage("s", 10, {"books": 1})], SIZES)
    with pytest.raises(ValueError, match="positive sum"):
        SampleOrder(0, [Stage("s", 10, {"web": 0})], SIZES)
    with pytest.raises(ValueError, match="no samples"):
        SampleOrder(0, [Stage("s", 10, {"web": 1})], {"web": 0})
    with pytest.raises(ValueError, match="samples 0"):
        SampleOrder(0, [Stage("s", 0, {"web": 1})], SIZES)
    with pytest.raises(IndexError):
        _order().lookup([3600])
