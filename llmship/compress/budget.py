"""Mixed precision under a size budget: one candidate grid per matrix, least summed sensitivity, bytes within budget.

A multiple-choice knapsack solved the standard way: per matrix, keep the candidates on the lower convex hull of
(bytes, sensitivity); start every matrix at its smallest candidate; then repeatedly take the upgrade that
removes the most sensitivity per byte added, while the budget allows it. On a convex hull this is optimal up to
the last partial upgrade.
"""
from __future__ import annotations

import heapq

from llmship.errors import ConfigError

FLOAT_BYTES = {"fp32": 4, "fp16": 2}


def matrix_bytes(grid, shape: tuple[int, int], float_bytes: int, copies: int = 1) -> int:
    """Bytes the runtime stores for one matrix on `grid` (None: in float), times the copies it keeps."""
    n, k = shape
    if grid is None:
        return n * k * float_bytes * copies
    if grid.palette:
        return int(n * k * grid.bits / 8 + (n // grid.group_size) * 2 ** grid.bits * 2) * copies
    groups = grid.groups(k)
    scale = {"fp32": 4, "fp16": 2, "bf16": 2}[grid.scale_dtype]
    zero = 0 if grid.zero_point is None else (grid.bits / 8 if grid.zero_point == "int" else 4)
    return int(n * k * grid.bits / 8 + n * groups * (scale + zero)) * copies


def _hull(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The candidates worth choosing: cheapest first, each strictly less sensitive, on the lower convex hull."""
    pts = sorted(options, key=lambda o: (o[1], o[2]))
    front = []
    for o in pts:
        if front and o[2] >= front[-1][2]:
            continue  # more bytes, no less error
        front.append(o)
    hull: list[tuple[str, int, float]] = []
    for o in front:
        while len(hull) >= 2:
            (_, b1, s1), (_, b2, s2) = hull[-2], hull[-1]
            if (s2 - s1) * (o[1] - b1) >= (o[2] - s1) * (b2 - b1):  # hull[-1] above the chord: not worth it
                hull.pop()
            else:
                break
        hull.append(o)
    return hull


def allocate(costs: dict[str, dict[str, tuple[int, float]]], budget: int) -> dict[str, str]:
    """{module: candidate} with total bytes <= budget and the least summed sensitivity (see the module docstring)."""
    hulls = {m: _hull([(k, b, s) for k, (b, s) in opts.items()]) for m, opts in costs.items()}
    choice = {m: 0 for m in hulls}
    used = sum(h[0][1] for h in hulls.values())
    if used > budget:
        raise ConfigError(f"recipe.budget: {budget:,} bytes is below the smallest this runtime can store for these "
                          f"matrices, {used:,} bytes (every matrix at its smallest grid)")
    heap = []

    def push(m):
        i = choice[m]
        if i + 1 < len(hulls[m]):
            (_, b0, s0), (_, b1, s1) = hulls[m][i], hulls[m][i + 1]
            heapq.heappush(heap, (-(s0 - s1) / max(b1 - b0, 1), m, i))

    for m in hulls:
        push(m)
    while heap:
        _, m, i = heapq.heappop(heap)
        if choice[m] != i:
            continue
        extra = hulls[m][i + 1][1] - hulls[m][i][1]
        if used + extra > budget:
            continue  # this upgrade does not fit; a smaller one elsewhere still may
        choice[m] = i + 1
        used += extra
        push(m)
    return {m: hulls[m][i][0] for m, i in choice.items()}


def smallest_bytes(costs: dict[str, dict[str, tuple[int, float]]]) -> int:
    return sum(min(b for b, _ in opts.values()) for opts in costs.values())
