"""Spend a parameter budget over groups (blocks, groups of blocks) where it buys the most.

Each group g grows in steps of a fixed cost c_g (a hidden unit's weights, one rank of a shared basis); its i-th step
gains gains[g][i] (non-increasing in i: the units' or the spectrum's sorted shares, times the group's measured
sensitivity). `allocate` starts every group at its minimum and takes, one at a time, the affordable step with the
largest gain per parameter; for non-increasing gains this is the optimum of the budget-constrained sum of gains up
to the last, partly affordable step. Steps past a group's listed gains gain 0 but are still taken up to the group's
maximum while the budget lasts, so the budget is spent to within one step of the cheapest group.
"""
from __future__ import annotations

import heapq
from typing import Sequence

from ..errors import ReduceError

__all__ = ['allocate']


def allocate(costs: Sequence[float], gains: Sequence[Sequence[float]], budget: float,
             minimum: Sequence[int], maximum: Sequence[int]) -> list[int]:
    """Steps per group maximising the summed gains with Σ counts·costs <= budget.

    Raises:
        ReduceError: the budget does not pay for every group's minimum.
    """
    counts = list(minimum)
    left = budget - sum(n * c for n, c in zip(counts, costs))
    if left < -1e-9 * max(budget, 1.0):
        raise ReduceError(f'the budget ({budget:,.0f} parameters) does not pay for the minimum of every group '
                          f'({budget - left:,.0f}); raise it.')

    def gain(g: int) -> float:
        return float(gains[g][counts[g]]) if counts[g] < len(gains[g]) else 0.0

    # max-heap on gain per parameter; ties go to the group listed first
    heap = [(-gain(g) / costs[g], g) for g in range(len(costs)) if counts[g] < maximum[g]]
    heapq.heapify(heap)
    while heap:
        _, g = heapq.heappop(heap)
        if costs[g] > left * (1 + 1e-12):
            continue  # its steps never fit again: costs are fixed and the budget only shrinks
        counts[g] += 1
        left -= costs[g]
        if counts[g] < maximum[g]:
            heapq.heappush(heap, (-gain(g) / costs[g], g))
    return counts
