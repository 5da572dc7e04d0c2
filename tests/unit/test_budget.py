"""Mixed precision's allocation: least summed sensitivity under a byte budget (multiple-choice knapsack)."""
from __future__ import annotations

import itertools
import random

import pytest

from llmship.compress.budget import allocate, matrix_bytes
from llmship.compress.grids import asymmetric, symmetric
from llmship.errors import ConfigError


def brute_force(costs, budget):
    names = sorted(costs)
    best = None
    for combo in itertools.product(*(sorted(costs[n]) for n in names)):
        b = sum(costs[n][k][0] for n, k in zip(names, combo))
        s = sum(costs[n][k][1] for n, k in zip(names, combo))
        if b <= budget and (best is None or s < best[0]):
            best = (s, dict(zip(names, combo)))
    return best


def test_the_allocation_is_optimal_on_convex_choices_and_never_exceeds_the_budget():
    rng = random.Random(0)
    worst_gap = 0.0
    for _ in range(60):
        costs = {}
        for m in range(5):
            size = rng.randint(10, 100)  # a quantization ladder: more bytes, less sensitivity, diminishing returns
            s4 = rng.uniform(0.1, 10)
            costs[f"m{m}"] = {"int4": (size, s4), "int8": (2 * size, s4 / 16), "fp32": (8 * size, 0.0)}
        low = sum(min(b for b, _ in o.values()) for o in costs.values())
        budget = int(low * rng.uniform(1.0, 3.0))
        choice = allocate(costs, budget)
        used = sum(costs[m][k][0] for m, k in choice.items())
        assert used <= budget
        ours = sum(costs[m][k][1] for m, k in choice.items())
        best = brute_force(costs, budget)[0]
        worst_gap = max(worst_gap, ours - best)
        # greedy on the convex hull is optimal up to the last partial upgrade: within one item's step
        assert ours <= best + max(max(s for _, s in o.values()) for o in costs.values()) + 1e-9
    assert worst_gap < 10  # and usually exact


def test_a_budget_below_every_matrix_at_its_smallest_grid_is_refused():
    costs = {"a": {"int4": (100, 1.0), "int8": (200, 0.1)}, "b": {"int4": (50, 2.0)}}
    assert allocate(costs, 150) == {"a": "int4", "b": "int4"}
    assert allocate(costs, 250) == {"a": "int8", "b": "int4"}
    with pytest.raises(ConfigError, match="150 bytes"):
        allocate(costs, 149)


def test_bytes_count_what_the_runtime_stores():
    assert matrix_bytes(None, (64, 128), 4) == 64 * 128 * 4
    assert matrix_bytes(symmetric(4, 32, "bf16"), (64, 128), 4) == 64 * 128 // 2 + 64 * 4 * 2  # codes + bf16 scales
    assert matrix_bytes(asymmetric(4, 32, zero_point="int"), (64, 128), 4) == 64 * 64 + 64 * 4 * (4 + 0.5)
    assert matrix_bytes(symmetric(8, None), (64, 128), 4, copies=2) == 2 * (64 * 128 + 64 * 4)  # a tied matrix stored twice
