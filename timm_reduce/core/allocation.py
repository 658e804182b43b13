"""Spend a parameter budget over groups (blocks, groups of blocks) where it buys the most.

Each group g grows in steps of a fixed cost c_g (a hidden unit's weights, one rank of a shared basis); its i-th step
gains gains[g][i] (non-increasing in i: the units' or the spectrum's sorted shares, times the group's measured
sensitivity, `weighted_shares`). `allocate` keeps every group between half and twice its uniform count (within a
cap), starts every group at that minimum and takes, one at a time, the affordable step with the largest gain per
parameter; for non-increasing gains this is the optimum of the budget-constrained sum of gains up to the last, partly
affordable step. Steps past a group's listed gains gain 0 but are still taken up to the group's maximum while the
budget lasts, so the budget is spent to within one step of the cheapest group. With no positive gain at all nothing
tells the groups apart, and the uniform counts are kept.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch

from ..errors import ReduceError

__all__ = ['allocate', 'weighted_shares']


def weighted_shares(values: torch.Tensor, weight: float) -> list[float]:
    """`values` sorted in descending order, as shares of their sum, times `weight` ([] when they sum to 0): a group's
    gains when losing a share e of its energy costs e · weight."""
    total = float(values.sum())
    if total <= 0:
        return []
    return (values.double().sort(descending=True).values * (weight / total)).tolist()


def allocate(costs: Sequence[float], gains: Sequence[Sequence[float]], budget: float, uniform: Sequence[int],
             cap: Sequence[int]) -> list[int]:
    """Steps per group maximising the summed gains with Σ counts·costs <= budget, each group between
    max(1, uniform // 2) and min(cap, 2 · uniform) steps; `uniform` itself when no gain is positive.

    Raises:
        ReduceError: the budget does not pay for every group's minimum.
    """
    if not any(g > 0 for group in gains for g in group):
        return list(uniform)
    minimum = [max(1, u // 2) for u in uniform]
    maximum = [min(c, 2 * u) for u, c in zip(uniform, cap)]
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
