"""The exact inner splits agree with brute force: micro-batches over replicas, experts over ranks,
layers over stages."""

import itertools
import random

import numpy as np
import pytest

from hyrun.planner.allocate import (allocate_units, compositions, contiguous_owners, even_split, place_experts,
                                    split_layers)


def brute_force_units(total, a, b, minimum):
    best = None
    for units in itertools.product(range(minimum, total + 1), repeat=len(a)):
        if sum(units) == total:
            finish = max(bi + ai * u for ai, bi, u in zip(a, b, units))
            best = finish if best is None else min(best, finish)
    return best


def test_allocate_units_matches_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 4)
        a = [rng.choice([0.5, 1.0, 1.5, 3.0, rng.uniform(0.1, 4)]) for _ in range(n)]
        b = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(n)]
        minimum = rng.choice([0, 1])
        total = rng.randint(max(1, minimum * n), 12)
        units = allocate_units(total, a, b, minimum=minimum)
        assert units.sum() == total and units.min() >= minimum
        finish = max(bi + ai * u for ai, bi, u in zip(a, b, units))
        assert finish == pytest.approx(brute_force_units(total, a, b, minimum), rel=1e-12)


def test_micro_batches_follow_speed():
    speeds = np.array([1.0, 1.0, 0.5, 0.25])
    units = allocate_units(44, 1.0 / speeds)
    assert list(units) == [16, 16, 8, 4]


def test_allocate_units_refuses_too_few_units():
    with pytest.raises(ValueError, match="at least 1"):
        allocate_units(2, [1.0, 1.0, 1.0])


def test_experts_follow_speed_and_every_rank_keeps_one():
    assert list(place_experts(16, [1.0, 1.0, 1.0, 1.0])) == [4, 4, 4, 4]
    assert list(place_experts(16, [3.0, 1.0])) == [12, 4]
    assert list(place_experts(4, [100.0, 1.0, 1.0])) == [2, 1, 1]
    assert contiguous_owners([2, 1, 3]) == (0, 0, 1, 2, 2, 2)


def brute_force_split(cost, extra, speed, memory, fixed, capacity):
    best = None
    pp, layers = len(speed), len(cost)
    for split in compositions(layers, pp):
        bounds = np.concatenate([[0], np.cumsum(split)])
        times, fits = [], True
        for s in range(pp):
            lo, hi = bounds[s], bounds[s + 1]
            times.append((sum(cost[lo:hi]) + extra[s]) / speed[s])
            fits &= sum(memory[s][lo:hi]) + fixed[s] <= capacity[s]
        if fits and (best is None or max(times) < best):
            best = max(times)
    return best


def test_split_layers_matches_brute_force():
    rng = random.Random(2)
    for _ in range(150):
        layers, pp = rng.randint(1, 9), rng.randint(1, 4)
        cost = [rng.choice([1.0, 2.0, rng.uniform(0.5, 3)]) for _ in range(layers)]
        extra = [rng.choice([0.0, 1.5]) for _ in range(pp)]
        speed = [rng.choice([1.0, 2.0, 3.0]) for _ in range(pp)]
        memory = [[rng.uniform(1, 3) * (pp - s) for _ in range(layers)] for s in range(pp)]
        fixed = [rng.uniform(0, 2) for _ in range(pp)]
        capacity = [rng.uniform(3, 15) for _ in range(pp)]
        split = split_layers(np.array(cost), np.array(extra), np.array(speed), np.array(memory), np.array(fixed),
                             np.array(capacity))
        expected = brute_force_split(cost, extra, speed, memory, fixed, capacity)
        if expected is None:
            assert split is None
            continue
        bounds = np.concatenate([[0], np.cumsum(split)])
        got = max((sum(cost[bounds[s]:bounds[s + 1]]) + extra[s]) / speed[s] for s in range(pp))
        assert got == pytest.approx(expected, rel=1e-6)


def test_layers_follow_stage_speed():
    split = split_layers(np.ones(16), np.zeros(2), np.array([3.0, 1.0]), np.zeros((2, 16)), np.zeros(2), np.ones(2))
    assert split == (12, 4)


def test_even_split_and_compositions():
    assert even_split(10, 4) == (3, 3, 2, 2)
    assert len(list(compositions(8, 3))) == 21
    assert all(sum(c) == 8 and min(c) >= 1 for c in compositions(8, 3))
