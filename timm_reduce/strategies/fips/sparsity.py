"""FiPS step 3: sparsity of the factors. Masks, magnitude pruning (global or local), and the sparsifiers that run
during calibration: GMP (cubic schedule), RigL (drop by magnitude, regrow by dense gradient), static and dense.

Masks are bool buffers on the FipsLinear layers (`<layer>.mask`), so they travel with `state_dict()`. A masked entry
is zero in the factor, gets a zero gradient, and has zero optimizer moments. Selection is exact: `prune` keeps
exactly ⌊N(1 - s)⌋ entries (ties broken in parameter order), found by a radix select on the float bit patterns, so
no sort of all factors at once is needed (memory stays O(largest factor)).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ...errors import ReduceError
from .decompose import single_thread
from .layers import FipsLinear

__all__ = ['fips_layers', 'keep_count', 'magnitude_keys', 'select_top', 'prune', 'gmp_sparsity', 'derived_delta_t',
           'rigl_drop_fraction', 'FipsSparsifier', 'make_hooks']


def fips_layers(model: nn.Module) -> dict[str, FipsLinear]:
    """Every FipsLinear of `model` by its dotted path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FipsLinear)}


def keep_count(numel: int, sparsity: float) -> int:
    """⌊N(1 - s)⌋, robust to binary round-off (0.75 of 4096 entries keeps exactly 1024)."""
    return math.floor(round(numel * (1.0 - sparsity), 6))


def magnitude_keys(values: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like |values| (as float32) where `eligible`, and -1 (never selected) elsewhere."""
    keys = values.detach().abs().float().view(torch.int32)  # non-negative floats order like their bit patterns
    return keys.masked_fill(~eligible, -1)


def _digit_at_rank(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """For a histogram of digits, the digit holding the k-th largest entry and how many entries of it are needed."""
    above = counts.flip(0).cumsum(0).flip(0)  # above[b] = entries with digit >= b
    digit = int((above >= k).nonzero().max())
    return digit, k - int(above[digit]) + int(counts[digit])


@torch.no_grad()
def select_top(keys: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks selecting the `k` largest keys across all tensors (keys from `magnitude_keys`; -1 = ineligible).

    Exactly `k` entries are selected (fewer only if fewer are eligible); ties at the threshold go to the earliest
    entries in (tensor, row-major) order, so the result is deterministic and identical on every rank. The threshold
    is found by a two-pass radix select (16 high bits, then 16 low bits): no sort, memory O(largest tensor).
    """
    high = torch.zeros((1 << 15) + 1, dtype=torch.int64)  # bin 0 holds the ineligible -1 keys
    for b in keys:
        high += torch.bincount(((b >> 16) + 1).reshape(-1), minlength=high.numel()).cpu()
    k = min(k, int(high[1:].sum()))
    if k <= 0:
        return [torch.zeros_like(b, dtype=torch.bool) for b in keys]
    top, need = _digit_at_rank(high[1:], k)  # `need` entries whose high digit is `top` complete the k
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for b in keys:
        low += torch.bincount((b[(b >> 16) == top] & 0xFFFF), minlength=1 << 16).cpu()
    bottom, remaining = _digit_at_rank(low, need)  # `remaining` entries equal to the threshold are taken
    threshold = (top << 16) | bottom
    if remaining == int(low[bottom]):  # every tie is taken (the usual case): one comparison per tensor
        return [b >= threshold for b in keys]
    out = []
    for b in keys:
        above = b > threshold
        if remaining > 0:
            tie = b == threshold
            order = tie.reshape(-1).cumsum(0).reshape(tie.shape)
            take = tie & (order <= remaining)
            remaining -= int(take.sum())
            above |= take
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
    with single_thread():  # memory-bound passes; thread barriers only cost on a shared CPU
        _prune(layers, sparsity, scope, optimizer)


def _prune(layers: Sequence[FipsLinear], sparsity: float, scope: str,
           optimizer: torch.optim.Optimizer | None) -> None:
    scores = [magnitude_keys(m.factor, m.mask) for m in layers]
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


def derived_delta_t(span: int, updates: int = 20) -> int:
    """The update interval when `delta_t` is not given: max(1, ⌊span / updates⌋) steps, so that a schedule spanning
    `span` steps (GMP: t_end - t0, RigL: t_end) gets at least `updates` updates in it (every step if it is shorter)."""
    return max(1, span // updates)


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

    Schedules (T = total_steps, t0 = ⌊t0_frac·T⌋, t_end = min(⌊t_end_frac·T⌋, T - 1), ΔT = delta_t, or when it
    is None `derived_delta_t(S)` = max(1, ⌊S / 20⌋) with S = t_end - t0 for GMP and t_end for RigL):
      gmp: at steps t0 + iΔT < t_end prune to s_t, and at the first step >= t_end to s_f (so s_f is always reached
        exactly by the last step); masks only shrink.
      rigl: at steps iΔT (i >= 1) < t_end, each factor exchanges ⌊q_t·active⌋ entries: the smallest-magnitude active
        ones are dropped and as many previously inactive ones with the largest dense-gradient magnitude are grown
        (at zero, with zero moments). Per-factor counts stay fixed, so the initial global/local distribution holds.
      static / dense: the masks never change (dense: no masks).
    Steps >= T (a later stage, e.g. distillation, numbered on): the schedule is over; masks are only re-applied.
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.config = config
        self.all_layers = fips_layers(model)
        if not self.all_layers:
            raise ReduceError('fips hooks: the model has no FiPS layers; apply reduce(model, "fips", ...) first.')
        self.layers = self.all_layers  # the factors the schedule acts on (those the optimizer trains)
        self.optimizer: torch.optim.Optimizer | None = None
        self.total_steps = 0
        self.t0 = self.t_end = 0
        self.delta_t = 1
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
        """Current sparsity over the scheduled factors."""
        total = sum(m.mask.numel() for m in self.layers.values())
        return 1.0 - sum(m.active for m in self.layers.values()) / total

    def _prune_step(self, step: int) -> bool:
        cfg = self.config
        if cfg.sparsifier != 'gmp' or step < self.t0:
            return False
        if step >= self.t_end:
            return self.sparsity() < keep_sparsity(self.layers, self.final_sparsity, cfg.pruning)
        return (step - self.t0) % self.delta_t == 0

    def _rigl_step(self, step: int) -> bool:
        return self.config.sparsifier == 'rigl' and 0 < step < self.t_end and step % self.delta_t == 0

    # ---- hooks -------------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Remember the optimizer (its moments get masked) and the run length; prune to the start sparsity if the
        masks are not there yet (a resumed run keeps its masks).

        The schedule acts on the factors this optimizer trains (all of them when it is None): one joint run over
        the whole model prunes globally across the model; a run per group of blocks prunes within that group.
        """
        if total_steps < 1:
            raise ReduceError(f'fips hooks: total_steps must be >= 1, got {total_steps}.')
        self.all_layers = fips_layers(model)
        self.layers = self.all_layers
        if optimizer is not None:
            trained = {id(p) for group in optimizer.param_groups for p in group['params']}
            self.layers = {n: m for n, m in self.all_layers.items() if id(m.factor) in trained}
            if not self.layers:
                raise ReduceError('fips hooks: the optimizer trains none of the FiPS factors; pass the optimizer '
                                  'of the calibrated blocks (it must hold their `factor` parameters).')
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.t0 = math.floor(self.config.t0 * total_steps)
        self.t_end = max(self.t0, min(math.floor(self.config.t_end * total_steps), total_steps - 1))
        span = self.t_end - (self.t0 if self.config.sparsifier == 'gmp' else 0)
        self.delta_t = self.config.delta_t if self.config.delta_t is not None else derived_delta_t(span)
        start = self.start_sparsity
        if self.sparsity() < keep_sparsity(self.layers, start, self.config.pruning):
            prune(list(self.layers.values()), start, self.config.pruning, optimizer)
        else:
            apply_masks(self.layers.values(), optimizer)

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A later stage's optimizer over the same parameters: its moments get masked from now on."""
        self.optimizer = optimizer
        apply_masks(self.layers.values(), optimizer)

    def after_backward(self, step: int) -> None:
        """Keep the dense gradient where RigL will need it, then zero the gradients of masked entries.

        Gradients must be unscaled by then (fp16 loss scaling: `GradScaler.unscale_` first). A RigL step whose
        gradients hold inf/NaN (an fp16 overflow, a step the GradScaler skips) exchanges no entries: such a
        gradient says nothing about which entries to grow.
        """
        if self.config.sparsifier == 'dense':
            return
        if self._rigl_step(step):
            grads = {n: m.factor.grad.detach().clone() for n, m in self.layers.items() if m.factor.grad is not None}
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all())
            self._dense_grads = grads if finite else {}
        with torch.no_grad():
            for m in self.layers.values():
                if m.factor.grad is not None:
                    m.factor.grad.mul_(m.mask)

    def after_step(self, step: int) -> None:
        """Re-apply the masks to factors and optimizer moments; prune or exchange entries on schedule."""
        self.last_step = step
        if self.config.sparsifier == 'dense':
            return
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
            kept = select_top([magnitude_keys(m.factor, m.mask)], active - n)[0]
            grown = select_top([magnitude_keys(grad, ~m.mask)], n)[0]
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
        """`{'<layer path>.mask': bool mask}` of every factor of the model (the live buffers; do not modify)."""
        return {f'{name}.mask': m.mask for name, m in self.all_layers.items()}


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
