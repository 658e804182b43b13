"""FiPS step 3: sparsity of the factors. Masks, magnitude pruning (global or local), and the sparsifiers that run
during calibration: GMP (cubic schedule), RigL (drop by magnitude, regrow by dense gradient), static and dense.

Masks are bool buffers on the FipsLinear layers (`<layer>.mask`), so they travel with `state_dict()`. A masked entry
is zero in the factor, gets a zero gradient, and has zero optimizer moments. Selection is exact: `prune` keeps
exactly ⌊N(1 - s)⌋ entries (ties broken in parameter order), found by bisection on the float bit patterns, so no
sort of all factors at once is needed (memory stays O(largest factor)).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import ReduceError
from .layers import FipsLinear

__all__ = ['fips_layers', 'keep_count', 'select_top', 'prune', 'gmp_sparsity', 'rigl_drop_fraction',
           'FipsSparsifier', 'make_hooks']

_INF_BITS = 0x7F800000  # bit pattern of +inf as int32; every finite non-negative float32 is below it


def fips_layers(model: nn.Module) -> dict[str, FipsLinear]:
    """Every FipsLinear of `model` by its dotted path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FipsLinear)}


def keep_count(numel: int, sparsity: float) -> int:
    """⌊N(1 - s)⌋, robust to binary round-off (0.75 of 4096 entries keeps exactly 1024)."""
    return math.floor(round(numel * (1.0 - sparsity), 6))


def _score_bits(score: torch.Tensor) -> torch.Tensor:
    """Non-negative float scores as int32 keys with the same order; negative scores (excluded) map below zero."""
    score = score.detach().float()
    return torch.where(score >= 0, score, torch.full_like(score, -1.0)).view(torch.int32)


@torch.no_grad()
def select_top(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks selecting the `k` largest non-negative scores across all tensors (negative = not eligible).

    Exactly `k` entries are selected (fewer only if fewer are eligible); ties at the threshold go to the earliest
    entries in (tensor, row-major) order, so the result is deterministic and identical on every rank.
    """
    keys = [_score_bits(s) for s in scores]
    eligible = sum(int((b >= 0).sum()) for b in keys)
    k = min(k, eligible)
    if k <= 0:
        return [torch.zeros_like(b, dtype=torch.bool) for b in keys]

    def count_at_least(t: int) -> int:
        return sum(int((b >= t).sum()) for b in keys)

    lo, hi = 0, _INF_BITS + 1  # count_at_least(lo) >= k > count_at_least(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid
    remaining = k - count_at_least(lo + 1)  # entries equal to the threshold still to take
    out = []
    for b in keys:
        above = b > lo
        tie = b == lo
        if remaining > 0 and bool(tie.any()):
            order = tie.reshape(-1).cumsum(0).reshape(tie.shape)
            take = tie & (order <= remaining)
            remaining -= int(take.sum())
            above = above | take
        out.append(above)
    return out


@torch.no_grad()
def apply_masks(layers: Iterable[FipsLinear], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the masked entries of every factor, of its gradient and of its optimizer state tensors."""
    for layer in layers:
        mask = layer.mask
        layer.factor.mul_(mask)
        if layer.factor.grad is not None:
            layer.factor.grad.mul_(mask)
        if optimizer is not None:
            for value in optimizer.state.get(layer.factor, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    value.mul_(mask)


@torch.no_grad()
def prune(layers: Sequence[FipsLinear], sparsity: float, scope: str = 'global',
          optimizer: torch.optim.Optimizer | None = None) -> None:
    """Prune factors by magnitude among their active entries down to `sparsity`, in place.

    `scope='global'` keeps ⌊N(1 - s)⌋ entries over all factors together (one threshold); `'local'` keeps
    ⌊N_k(1 - s)⌋ in every factor. Masks only shrink: an entry already masked never comes back.
    """
    if not layers:
        return
    scores = [torch.where(m.mask, m.factor.detach().abs(), torch.full_like(m.factor, -1.0)) for m in layers]
    if scope == 'global':
        keeps = select_top(scores, keep_count(sum(m.mask.numel() for m in layers), sparsity))
    elif scope == 'local':
        keeps = [select_top([s], keep_count(m.mask.numel(), sparsity))[0] for s, m in zip(scores, layers)]
    else:
        raise ReduceError(f"fips: pruning must be 'global' or 'local', got {scope!r}.")
    for m, keep in zip(layers, keeps):
        m.mask.copy_(m.mask & keep)
    apply_masks(layers, optimizer)


def gmp_sparsity(step: int, final: float, initial: float, t0: int, t_end: int) -> float:
    """Cubic schedule s_t = s_f + (s_0 - s_f)(1 - (t - t0)/(t_end - t0))³, clamped to [t0, t_end]; s_f at t_end."""
    if step >= t_end:
        return final
    if step <= t0:
        return initial
    frac = (step - t0) / (t_end - t0)
    return final + (initial - final) * (1.0 - frac) ** 3


def rigl_drop_fraction(step: int, drop_fraction: float, t_end: int) -> float:
    """Cosine-decayed fraction of active entries to exchange: q_t = (q/2)(1 + cos(π t / t_end)); 0 after t_end."""
    if t_end <= 0 or step >= t_end:
        return 0.0
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / t_end))


class FipsSparsifier:
    """The calibration hooks of the `fips` strategy (see `make_hooks`).

    Steps are 0-based optimizer step indices: the engine calls, for step in range(total_steps),
    `after_backward(step)` between `loss.backward()` (and any gradient all-reduce) and `optimizer.step()`, then
    `after_step(step)` right after `optimizer.step()`. `setup` comes first, once per optimizer.

    Schedules (T = total_steps, ΔT = delta_t, t0 = ⌊t0_frac·T⌋, t_end = min(⌊t_end_frac·T⌋, T - 1)):
      gmp: at steps t0 + iΔT < t_end prune to s_t, and at the first step >= t_end to s_f (so s_f is always reached
        exactly by the last step); masks only shrink.
      rigl: at steps iΔT (i >= 1) < t_end, each factor exchanges ⌊q_t·active⌋ entries: the smallest-magnitude active
        ones are dropped and as many previously inactive ones with the largest dense-gradient magnitude are grown
        (at zero, with zero moments). Per-factor counts stay fixed, so the initial global/local distribution holds.
      static / dense: the masks never change (dense: no masks).
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.config = config
        self.layers = fips_layers(model)
        if not self.layers:
            raise ReduceError('fips hooks: the model has no FiPS layers; apply reduce(model, "fips", ...) first.')
        self.optimizer: torch.optim.Optimizer | None = None
        self.total_steps = 0
        self.t0 = self.t_end = 0
        self.last_step = -1
        self._dense_grads: dict[str, torch.Tensor] = {}

    # ---- schedule ----------------------------------------------------------------------------------------------

    @property
    def final_sparsity(self) -> float:
        return self.config.target_sparsity

    @property
    def start_sparsity(self) -> float:
        return self.config.start_sparsity

    def sparsity(self) -> float:
        """Current sparsity over all factors."""
        total = sum(m.mask.numel() for m in self.layers.values())
        return 1.0 - sum(m.active for m in self.layers.values()) / total

    def _prune_step(self, step: int) -> bool:
        cfg = self.config
        if cfg.sparsifier != 'gmp' or step < self.t0:
            return False
        if step >= self.t_end:
            return self.sparsity() < keep_sparsity(self.layers, self.final_sparsity, cfg.pruning)
        return (step - self.t0) % cfg.delta_t == 0

    def _rigl_step(self, step: int) -> bool:
        return self.config.sparsifier == 'rigl' and 0 < step < self.t_end and step % self.config.delta_t == 0

    # ---- hooks -------------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Remember the optimizer (its moments get masked) and the run length; prune to the start sparsity if the
        masks are not there yet (a resumed run keeps its masks)."""
        if total_steps < 1:
            raise ReduceError(f'fips hooks: total_steps must be >= 1, got {total_steps}.')
        self.layers = fips_layers(model)
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.t0 = math.floor(self.config.t0 * total_steps)
        self.t_end = max(self.t0, min(math.floor(self.config.t_end * total_steps), total_steps - 1))
        start = self.start_sparsity
        if self.sparsity() < keep_sparsity(self.layers, start, self.config.pruning):
            prune(list(self.layers.values()), start, self.config.pruning, optimizer)
        else:
            apply_masks(self.layers.values(), optimizer)

    def after_backward(self, step: int) -> None:
        """Keep the dense gradient where RigL will need it, then zero the gradients of masked entries."""
        if self._rigl_step(step):
            self._dense_grads = {n: m.factor.grad.detach().clone() for n, m in self.layers.items()
                                 if m.factor.grad is not None}
        with torch.no_grad():
            for m in self.layers.values():
                if m.factor.grad is not None:
                    m.factor.grad.mul_(m.mask)

    def after_step(self, step: int) -> None:
        """Re-apply the masks to factors and optimizer moments; prune or exchange entries on schedule."""
        self.last_step = step
        layers = list(self.layers.values())
        if self._prune_step(step):
            target = gmp_sparsity(step, self.final_sparsity, self.start_sparsity, self.t0, self.t_end)
            prune(layers, target, self.config.pruning, self.optimizer)
        elif self._rigl_step(step):
            self._exchange(step)
        apply_masks(layers, self.optimizer)

    @torch.no_grad()
    def _exchange(self, step: int) -> None:
        q = rigl_drop_fraction(step, self.config.drop_fraction, self.t_end)
        for name, m in self.layers.items():
            grad = self._dense_grads.get(name)
            if grad is None:
                continue
            active = m.active
            n = math.floor(q * active)
            if n == 0 or active == m.mask.numel():
                continue
            n = min(n, m.mask.numel() - active)
            magnitude = torch.where(m.mask, m.factor.abs(), torch.full_like(m.factor, -1.0))
            kept = select_top([magnitude], active - n)[0]
            grown = select_top([torch.where(m.mask, torch.full_like(grad, -1.0), grad.abs())], n)[0]
            m.factor.masked_fill_(grown, 0.0)
            m.mask.copy_(kept | grown)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(m.factor, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == grown.shape:
                        value.masked_fill_(grown, 0.0)
        self._dense_grads = {}

    def state_dict(self) -> dict[str, Any]:
        """Schedule position for resuming (the masks themselves are module buffers)."""
        return {'format': 1, 'last_step': self.last_step, 'total_steps': self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get('format') != 1:
            raise ReduceError(f'fips hooks: unknown state format {state.get("format")!r}.')
        if self.total_steps and state['total_steps'] != self.total_steps:
            raise ReduceError(f'fips hooks: the saved run had {state["total_steps"]} steps, this one '
                              f'{self.total_steps}; resume with the same schedule.')
        self.last_step = int(state['last_step'])
        self.total_steps = int(state['total_steps']) or self.total_steps

    def masks(self) -> dict[str, torch.Tensor]:
        """`{'<layer path>.mask': bool mask}` of every factor (the live buffers; do not modify)."""
        return {f'{name}.mask': m.mask for name, m in self.layers.items()}


def keep_sparsity(layers: dict[str, FipsLinear] | Sequence[FipsLinear], sparsity: float, scope: str) -> float:
    """The overall sparsity that `prune(layers, sparsity, scope)` produces (minus a hair, for comparisons)."""
    layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
    total = sum(m.mask.numel() for m in layers)
    if scope == 'global':
        kept = keep_count(total, sparsity)
    else:
        kept = sum(keep_count(m.mask.numel(), sparsity) for m in layers)
    return 1.0 - kept / total - 1e-12


def make_hooks(model: nn.Module, config: Any) -> FipsSparsifier:
    """Calibration hooks of the `fips` strategy for `model` (already reduced) and its FipsConfig."""
    return FipsSparsifier(model, config)
