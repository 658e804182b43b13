"""FiPS step 1: concatenate a group's MLP weights, decompose them into a shared basis and per-layer factors.

Every linear of an MLP is put in (d x width) orientation (input linears transposed, fc2 as stored) and the group's
slices are concatenated along the long axis: C = [W_1 | W_2 | ...] (d x M). With C = Q S Pᵀ,
U = Q[:, :r] is the shared basis and V = Uᵀ C = (S Pᵀ)[:r] is cut back into per-layer factors V_k (r x width_k), so
that W_k ≈ U V_k. The SVD is taken from the short side: the d x d Gram matrix C Cᵀ = Σ_k W_k W_kᵀ (accumulated
slice by slice, so C is never materialised) and its `eigh`, in float64.
With scaling vectors (paper §5) every hidden unit (column of a slice) is normalised before the decomposition and its
norm kept as a per-unit scale: W_k ≈ U V_k diag(scale_k).

Data-aware (with `SliceData` from activation statistics) each slice's term of the Gram matrix is the second moment of
what its truncation would lose, in output space, instead of W_k W_kᵀ: for an input linear (d side = input x,
E[x xᵀ] = S) S^½ W_k W_kᵀ S^½; for fc2 (d side = output) E[y yᵀ] with y = W_k h (or W_k diag(E[h²]) W_kᵀ on
normalised columns). Each term is rescaled to the trace ‖W_k‖²_F of its weight-only term, so the slices keep the
weight-only init's relative weights and only the directions follow the data. An input linear's factor is then the
least-squares fit on the data, V_k = (Uᵀ S U)⁻¹ Uᵀ S W_k, instead of the projection Uᵀ W_k (the same when r >= d).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch

from ...errors import ReduceError

__all__ = ['Growth', 'GroupFactors', 'SliceData', 'rank_for_budget', 'decompose_group', 'group_gram',
           'spectrum', 'single_thread']


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread (restored afterwards; not for concurrent torch threads).

    Small LAPACK and memory-bound element-wise work gain little from threads, and on a shared, oversubscribed CPU
    their thread barriers cost far more: a 768 x 768 `eigh` took 9-22 s on 2 threads at load 9 and 0.13 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


Growth = Literal['hybrid', 'random', 'split']


@dataclass
class GroupFactors:
    """The decomposition of one group: `basis` (d x r), one factor (r x width_k) per input slice and, with scaling
    vectors, one scale (width_k) per slice."""

    basis: torch.Tensor
    factors: list[torch.Tensor]
    scales: list[torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


@dataclass
class SliceData:
    """Activation statistics of one slice's linear (float64, d x d / width), see `core.statistics`.

    An input linear (fc1) gives `input_moment` E[x xᵀ]; fc2 gives `hidden_energy` E[h²] per column and
    `output_moment` E[y yᵀ] of y = W h."""

    input_moment: torch.Tensor | None = None
    hidden_energy: torch.Tensor | None = None
    output_moment: torch.Tensor | None = None


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    with single_thread():
        values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


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


def _growth_plan(dim: int, rank: int, growth: Growth) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source direction of each grown component, and (split only) the number of copies of every direction."""
    source = torch.arange(rank - dim) % dim
    copies = torch.bincount(source, minlength=dim).double() + 1 if growth == 'split' else None
    return source, copies


@torch.no_grad()
def decompose_group(
        slices: Sequence[torch.Tensor],
        rank: int,
        growth: Growth = 'hybrid',
        beta: float = 32.0,
        generator: torch.Generator | None = None,
        scaling_vectors: bool = False,
        names: Sequence[str] | None = None,
        data: Sequence[SliceData | None] | None = None,
        gram: torch.Tensor | None = None,
) -> GroupFactors:
    """Shared basis and per-slice factors of `slices` (each d x width_k), at `rank`.

    The Gram matrix Σ_k W_k W_kᵀ is accumulated slice by slice in float64 (no concatenated copy), `eigh` runs in
    float64, and every factor V_k = Uᵀ W_k is projected in the slices' precision (float64 for float64 inputs, else
    float32). With rank > d the decomposition grows, keeping U V_k unchanged:
      hybrid: zero basis columns; factor rows = copies of the top rows divided by `beta` (cycled when rank - d > d);
      random: zero basis columns; factor rows i.i.d. normal with the std of the SVD factors divided by `beta`;
      split: neuron splitting; direction i is split into c_i copies (same basis column, factor row / c_i), the
        extra components going to the top directions in order (cycled when rank - d > d).
    The result has the dtype and device of the slices. On the meta device only the shapes are produced (size
    arithmetic without memory). With rank >= d and no pruning, U V_k reproduces each slice up to the round-off of
    the dtype. With `data` (one entry per slice, None for a slice without), the Gram terms and input linears'
    factors are data-aware (see the module docstring). `gram`: this group's `group_gram` for the same arguments,
    when already computed.

    Raises:
        ReduceError: slices of different heights, NaN or infinite weights (named with `names`), unknown growth.
    """
    dim = slices[0].shape[0]
    dtype, device = slices[0].dtype, slices[0].device
    widths = [s.shape[1] for s in slices]
    if any(s.shape[0] != dim for s in slices):
        raise ReduceError(f'fips: a group mixes MLP widths {sorted({s.shape[0] for s in slices})}; all its linears '
                          f'must have the same model dimension.')
    if growth not in ('hybrid', 'random', 'split'):
        raise ReduceError(f"fips: growth must be 'hybrid', 'random' or 'split', got {growth!r}.")
    scales = [torch.empty(w, dtype=dtype, device=device) for w in widths] if scaling_vectors else None
    if device.type == 'meta':
        basis = torch.empty(dim, rank, dtype=dtype, device=device)
        return GroupFactors(basis, [torch.empty(rank, w, dtype=dtype, device=device) for w in widths], scales)
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def stats(i: int) -> SliceData | None:
        return data[i] if data is not None else None

    if gram is None:
        gram = _group_gram(slices, data, scales, names)
    with single_thread():
        _, eigvecs = torch.linalg.eigh(gram)
    keep = min(rank, dim)
    basis = eigvecs.flip(1)[:, :keep]  # eigh sorts ascending; the leading directions come first
    projector = basis.T.to(compute).contiguous()
    source, copies = _growth_plan(dim, rank, growth) if rank > dim else (None, None)
    factors = []
    for i in range(len(slices)):
        w = slices[i].to(compute) if scales is None else _normalised(slices[i], scales[i]).to(compute)
        v = torch.empty(rank, widths[i], dtype=compute, device=device)
        torch.mm(projector, w, out=v[:keep])  # = (S Pᵀ)[:keep] of this slice, without dividing by singular values
        moment = stats(i).input_moment if stats(i) is not None else None
        if moment is not None and keep < dim and float(moment.diagonal().sum()) > 0:  # dead inputs: keep Uᵀ W
            v[:keep] = _refit(basis, w.to(torch.float64), moment.to(device=device, dtype=torch.float64)).to(compute)
        factors.append(v)
    if source is not None:
        extra = rank - dim
        src = source.to(device)
        if growth == 'split':
            inv = (1.0 / copies).to(device=device, dtype=compute)
            for v in factors:
                v[:dim].mul_(inv[:, None])
                v[dim:] = v[src]
            basis = torch.cat([basis, basis[:, src]], 1)
        else:
            if growth == 'random':
                count = sum(v[:dim].numel() for v in factors)
                mean = sum(float(v[:dim].sum(dtype=torch.float64)) for v in factors) / count
                sq = sum(float(v[:dim].pow(2).sum(dtype=torch.float64)) for v in factors) / count
                std = math.sqrt(max(sq - mean * mean, 0.0) * count / max(count - 1, 1)) / beta
            for v in factors:
                if growth == 'hybrid':
                    v[dim:] = v[src] / beta
                else:
                    noise = torch.randn(extra, v.shape[1], generator=generator, dtype=torch.float64)
                    v[dim:] = (noise * std).to(device=device, dtype=compute)
            basis = torch.cat([basis, basis.new_zeros(dim, extra)], 1)
    if scales is not None:
        scales = [sc.to(dtype) for sc in scales]
    return GroupFactors(basis.to(dtype).contiguous(), [v.to(dtype) for v in factors], scales)


def _normalised(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The slice in float64; with a `scale` (scaling vectors) every hidden unit (column) divided by its norm, the
    norms written into `scale` (an all-zero unit keeps scale 1)."""
    w = w.to(torch.float64)
    if scale is None:
        return w
    norms = w.norm(dim=0)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    scale.copy_(norms)
    return w / norms


def _group_gram(slices: Sequence[torch.Tensor], data: Sequence[SliceData | None] | None,
                scales: Sequence[torch.Tensor] | None, names: Sequence[str] | None) -> torch.Tensor:
    """The group's d x d Gram matrix (float64): Σ_k W_k W_kᵀ, or each slice's data-aware term where it has one."""
    dim, device = slices[0].shape[0], slices[0].device
    roots: dict[int, torch.Tensor] = {}  # S^½ per input moment: SwiGLU's two input linears share one
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    for i in range(len(slices)):
        w = _normalised(slices[i], scales[i] if scales is not None else None)
        term = _data_term(w, data[i] if data is not None else None, device, scales is not None, roots)
        if term is None:
            gram.addmm_(w, w.T)
        else:
            gram.add_(term)
        if not torch.isfinite(gram).all():
            where = names[i] if names is not None else f'slice {i}'
            raise ReduceError(f'fips: {where} contains NaN or infinite values; cannot decompose it.')
    return gram


@torch.no_grad()
def group_gram(slices: Sequence[torch.Tensor], scaling_vectors: bool = False, names: Sequence[str] | None = None,
               data: Sequence[SliceData | None] | None = None) -> torch.Tensor:
    """The Gram matrix `decompose_group` decomposes for these arguments (float64, d x d); pass it back as its
    `gram` to decompose without accumulating it again.

    Raises:
        ReduceError: NaN or infinite weights (named with `names`).
    """
    scales = [torch.empty(s.shape[1], dtype=torch.float64, device=s.device) for s in slices] \
        if scaling_vectors else None
    return _group_gram(slices, data, scales, names)


def spectrum(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a group's Gram matrix (float64, descending, >= 0): the i-th is the (weight-space or
    data-aware) energy that a basis of rank i - 1 loses by leaving out component i."""
    with single_thread():
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _data_term(w: torch.Tensor, stats: SliceData | None, device: torch.device, normalised: bool,
               roots: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """A slice's data-aware Gram term (float64, d x d), scaled to trace ‖w‖²_F; None without statistics.
    `roots` caches S^½ by the moment tensor's id."""
    if stats is None:
        return None
    if stats.input_moment is not None:
        key = id(stats.input_moment)
        if key not in roots:
            roots[key] = _sqrt_psd(stats.input_moment.to(device=device, dtype=torch.float64))
        rw = roots[key] @ w
        term = rw @ rw.T
    elif stats.output_moment is not None and not normalised:
        term = stats.output_moment.to(device=device, dtype=torch.float64).clone()
    elif stats.hidden_energy is not None:
        term = (w * stats.hidden_energy.to(device=device, dtype=torch.float64)) @ w.T
    else:
        return None
    trace = float(term.diagonal().sum())
    if not math.isfinite(trace) or trace <= 0:
        return None  # dead inputs: fall back to the weights' own term
    return term * (float(w.pow(2).sum()) / trace)


def _refit(basis: torch.Tensor, w: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """argmin_V E‖(w - basis V)ᵀ x‖² for E[x xᵀ] = moment: (Uᵀ S U)⁻¹ Uᵀ S w, with a tiny ridge (float64)."""
    su = moment @ basis
    lhs = basis.T @ su
    ridge = 1e-9 * float(lhs.diagonal().mean().clamp_min(1e-30))
    lhs = lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    return torch.linalg.solve(lhs, su.T @ w)
