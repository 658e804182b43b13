"""FiPS step 1: concatenate a group's MLP weights, decompose them into a shared basis and per-layer factors.

Every linear of an MLP is put in (d x width) orientation (input linears transposed, fc2 as stored) and the group's
slices are concatenated along the long axis: C = [W_1 | W_2 | ...] (d x M). With C = Q S Pᵀ,
U = Q[:, :r] is the shared basis and V = Uᵀ C = (S Pᵀ)[:r] is cut back into per-layer factors V_k (r x width_k), so
that W_k ≈ U V_k. The SVD is taken from the short side: the d x d Gram matrix C Cᵀ and its `eigh`, in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..errors import ReduceError

__all__ = ['Growth', 'GroupFactors', 'rank_for_budget', 'decompose_group']

Growth = Literal['hybrid', 'random', 'split']


@dataclass
class GroupFactors:
    """The decomposition of one group: `basis` (d x r) and one factor (r x width_k) per input slice."""

    basis: torch.Tensor
    factors: list[torch.Tensor]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def rank_for_budget(dim: int, widths: Sequence[int], budget: float, sparsity: float) -> int:
    """Rank r of a group's basis so that the basis plus the factors' non-zeros store `budget` of its weights.

    With N = d·M weights (M = Σ widths), p·N = d·r + (1 - s)·r·M, hence r = ⌊p·N / (d + (1 - s)·M)⌋. The widths are
    the real ones (fc1/fc2 hidden sizes, GluMlp's doubled fc1), never an assumed 4·d.

    Raises:
        ReduceError: the budget does not pay for even a rank-1 basis.
    """
    total = sum(widths)
    exact = budget * dim * total / (dim + (1.0 - sparsity) * total)
    rank = math.floor(exact * (1 + 1e-12))  # 2048.0 must not become 2047 by rounding
    if rank < 1:
        raise ReduceError(f'fips: budget={budget} with sparsity={sparsity} is too small for a group with d={dim} and '
                          f'{total} concatenated columns (rank would be {exact:.3f} < 1); raise the budget.')
    return rank


def _grow(
        basis: torch.Tensor,
        factors: torch.Tensor,
        rank: int,
        growth: Growth,
        beta: float,
        generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend a full-rank (d x d, d x M) decomposition to `rank` > d components, keeping U V unchanged.

    hybrid: zero basis columns; factor rows = copies of the top rows divided by `beta` (cycled when rank - d > d).
    random: zero basis columns; factor rows i.i.d. normal with the std of the SVD factor divided by `beta`.
    split: neuron splitting; component i is split into c_i copies (same basis column, factor row / c_i), the extra
        components going to the top directions in order (cycled when rank - d > d).
    """
    d = basis.shape[1]
    extra = rank - d
    source = torch.arange(extra, device=basis.device) % d
    if growth == 'split':
        copies = torch.ones(d, dtype=factors.dtype, device=factors.device)
        copies.index_add_(0, source, torch.ones(extra, dtype=factors.dtype, device=factors.device))
        factors = factors / copies[:, None]
        return torch.cat([basis, basis[:, source]], 1), torch.cat([factors, factors[source]], 0)
    zeros = basis.new_zeros(basis.shape[0], extra)
    if growth == 'hybrid':
        new_rows = factors[source] / beta
    elif growth == 'random':
        std = factors.std() / beta
        noise = torch.randn(extra, factors.shape[1], generator=generator, dtype=torch.float64)
        new_rows = (noise.to(factors.device) * std).to(factors.dtype)
    else:
        raise ReduceError(f"fips: growth must be 'hybrid', 'random' or 'split', got {growth!r}.")
    return torch.cat([basis, zeros], 1), torch.cat([factors, new_rows], 0)


@torch.no_grad()
def decompose_group(
        slices: Sequence[torch.Tensor],
        rank: int,
        growth: Growth = 'hybrid',
        beta: float = 32.0,
        generator: torch.Generator | None = None,
) -> GroupFactors:
    """Shared basis and per-slice factors of `slices` (each d x width_k), at `rank`.

    The result has the dtype and device of the slices. On the meta device only the shapes are produced (used for
    size arithmetic without memory). With rank >= d and no pruning, U V_k reproduces each slice (up to the
    precision of the dtype: exactly the float64 round-off for float64 inputs).
    """
    dim = slices[0].shape[0]
    dtype, device = slices[0].dtype, slices[0].device
    widths = [s.shape[1] for s in slices]
    if any(s.shape[0] != dim for s in slices):
        raise ReduceError(f'fips: a group mixes MLP widths {sorted({s.shape[0] for s in slices})}; all its linears '
                          f'must have the same model dimension.')
    if device.type == 'meta':
        basis = torch.empty(dim, rank, dtype=dtype, device=device)
        return GroupFactors(basis, [torch.empty(rank, w, dtype=dtype, device=device) for w in widths])
    concat = torch.cat([s.to(torch.float64) for s in slices], 1)
    gram = concat @ concat.T
    _, eigvecs = torch.linalg.eigh(gram)
    eigvecs = eigvecs.flip(1)  # eigh sorts ascending; the leading directions come first
    keep = min(rank, dim)
    basis = eigvecs[:, :keep].contiguous()
    factors = basis.T @ concat  # = (S Pᵀ)[:keep], without dividing by singular values
    if rank > dim:
        basis, factors = _grow(basis, factors, rank, growth, beta, generator)
    pieces = torch.split(factors, widths, dim=1)
    return GroupFactors(basis.to(dtype).contiguous(), [p.to(dtype).contiguous() for p in pieces])
