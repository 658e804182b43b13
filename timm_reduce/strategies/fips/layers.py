"""FiPS step 2: the layers. A group's shared basis U and a drop-in replacement for each fc1/fc2 of its MLPs.

`FipsLinear` computes `W = U V_k` (fc2) or `(U V_k)ᵀ` (fc1, fc1_g, fc1_x) plus a dense bias. The basis module is
registered as a child of every FipsLinear of its group, the way `grouped` registers one MLP in several blocks:
`parameters()` lists U once, a block's own `parameters()` holds everything its forward depends on (so block-wise
calibration and DDP see the sharing by tensor identity), deepcopy keeps one copy, and `state_dict()` lists U under
every alias, which `timm_reduce.sharing`/`serialization` de-duplicate on save and re-tie on load (update EMA over
de-duplicated tensors, as for `grouped`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

__all__ = ['FipsBasis', 'FipsLinear', 'pack_bits', 'unpack_bits']

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries per byte (row-major, most significant bit first)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits` for a mask of `shape`."""
    numel = int(torch.Size(shape).numel())
    flat = (bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)) != 0
    return flat.reshape(-1)[:numel].reshape(shape)


class FipsBasis(nn.Module):
    """The dense basis U (d x r) shared by all FipsLinear layers of one group.

    Attributes:
        weight: the basis, a Parameter of shape (d, r).
        group: dotted paths of the blocks sharing it (informational, for `summary()`).
    """

    def __init__(self, weight: torch.Tensor, group: list[str] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.group = list(group or [])

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.weight.shape[1]

    def summary_info(self) -> dict[str, Any]:
        return {'kind': 'fips_basis', 'rank': self.rank, 'dim': self.dim, 'group': list(self.group),
                'stored_params': self.weight.numel(), 'bytes': self.weight.numel() * self.weight.element_size()}

    def extra_repr(self) -> str:
        return f'dim={self.dim}, rank={self.rank}'


class FipsLinear(nn.Module):
    """A linear layer whose weight is a shared basis times a masked per-layer factor.

    Args:
        basis: the group's FipsBasis (d x r).
        factor: V_k, shape (r, width).
        bias: dense bias of the original layer (width for an input linear, d for fc2) or None.
        transposed: True for input linears (fc1: d -> width, weight (U V)ᵀ), False for fc2 (width -> d, weight U V).
        storage_dtype: dtype of the factor's values in the compact saved form (`torch.float32` or `torch.bfloat16`).
        scale: optional per-hidden-unit scale (width,), trainable (scaling vectors): W = U V_k diag(scale).

    In eval mode without autograd the dense weight is computed once and cached until a parameter changes in place
    (optimizer step, `load_state_dict`), is replaced (`.to()`), or `train()` is called. Changes made through
    `.data` bypass the version counter: call `invalidate_cache()` after those.
    """

    def __init__(
            self,
            basis: FipsBasis,
            factor: torch.Tensor,
            bias: torch.Tensor | None,
            transposed: bool,
            storage_dtype: torch.dtype = torch.float32,
            scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.basis = basis
        self.factor = nn.Parameter(factor)
        self.register_buffer('mask', torch.ones(factor.shape, dtype=torch.bool, device=factor.device))
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.scale = nn.Parameter(scale) if scale is not None else None
        self.transposed = transposed
        self.storage_dtype = storage_dtype
        width = factor.shape[1]
        self.in_features, self.out_features = (basis.dim, width) if transposed else (width, basis.dim)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.factor.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (out_features, in_features), differentiable w.r.t. U and V."""
        return self.dense_weight()

    def scaled_factor(self) -> torch.Tensor:
        """V_k with masked entries zeroed, times the per-unit scales when the layer has scaling vectors.

        The mask is applied to the value only: the gradient still reaches every entry (RigL regrows by that dense
        gradient; the sparsity hooks zero it for masked entries). So a training loop without the hooks can never
        make the layer compute something its compact saved form (unmasked values only) does not store.
        """
        factor = self.factor
        if not bool(self.mask.all()):
            factor = factor - (factor * ~self.mask).detach()
        return factor if self.scale is None else factor * self.scale

    def dense_weight(self) -> torch.Tensor:
        w = self.basis.weight @ self.scaled_factor()  # (d, width)
        return w.T.contiguous() if self.transposed else w

    # ---- cache -------------------------------------------------------------------------------------------------

    def _cache_key(self) -> tuple:
        u, v, s = self.basis.weight, self.factor, self.scale
        scale_key = (s._version, s.data_ptr()) if s is not None else None
        return (u._version, v._version, u.data_ptr(), v.data_ptr(), u.dtype, v.dtype, u.device, tuple(u.shape),
                scale_key)

    def invalidate_cache(self) -> None:
        self._cache = None

    def cached_weight(self) -> torch.Tensor:
        """The dense weight, computed once per parameter version (no autograd)."""
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.dense_weight())
        return self._cache[1]

    def train(self, mode: bool = True) -> 'FipsLinear':
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_cache'] = None  # pickles and deep copies do not carry the materialised weight
        return state

    # ---- forward -----------------------------------------------------------------------------------------------

    def _low_rank_cheaper(self, x: torch.Tensor) -> bool:
        """x·U·V costs T·r·(d + w); materialising costs d·r·w + T·d·w (T tokens)."""
        d, w, r = self.basis.dim, self.factor.shape[1], self.rank
        tokens = x.numel() // max(x.shape[-1], 1)
        return tokens * r * (d + w) < d * r * w + tokens * d * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if not self.training and not needs_grad:
            # under torch.compile the cache lookup runs eagerly (one graph break): traced, its key would specialise
            # the graph to every layer's data pointers and recompile per layer
            weight = _cached_weight_eagerly(self) if torch.compiler.is_compiling() else self.cached_weight()
            return F.linear(x, weight, self.bias)
        if self._low_rank_cheaper(x):
            u, v = self.basis.weight, self.scaled_factor()
            if self.transposed:  # x (.., d) -> x U (.., r) -> x U V (.., w)
                return F.linear(F.linear(x, u.T), v.T, self.bias)
            return F.linear(F.linear(x, v), u, self.bias)  # x (.., w) -> x Vᵀ (.., r) -> x Vᵀ Uᵀ (.., d)
        return F.linear(x, self.dense_weight(), self.bias)

    def materialize(self) -> nn.Linear:
        """A plain nn.Linear with the same weight and bias (what the eval-mode cache computes)."""
        with torch.no_grad():
            weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.factor.requires_grad)
        return linear

    # ---- sparsity and storage ----------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Number of stored (unmasked) factor entries."""
        return int(self.mask.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.mask.numel()

    def _bits_stored(self) -> bool:
        return not bool(self.mask.all())

    def encode_state_dict(self, prefix: str, state: dict[str, torch.Tensor]) -> None:
        """Replace `factor` and `mask` by `factor.values` (unmasked entries, row-major) and `factor.bits`
        (the packed mask, omitted when nothing is masked)."""
        factor, mask = state.pop(prefix + 'factor'), state.pop(prefix + 'mask')
        state[prefix + 'factor.values'] = factor[mask].to(self.storage_dtype)
        if not bool(mask.all()):
            state[prefix + 'factor.bits'] = pack_bits(mask)

    def decode_state_dict(self, prefix: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `encode_state_dict`; a state that already holds `factor` is left alone."""
        values = state.pop(prefix + 'factor.values', None)
        if values is None:
            return
        bits = state.pop(prefix + 'factor.bits', None)
        shape = self.factor.shape
        mask = unpack_bits(bits, shape) if bits is not None else torch.ones(shape, dtype=torch.bool)
        mask = mask.to(values.device)
        if int(mask.sum()) != values.numel():
            from ...errors import ReduceError

            raise ReduceError(f'{prefix}factor: the stored mask has {int(mask.sum())} entries but '
                              f'{values.numel()} values are stored; the file is corrupt or from another model.')
        factor = torch.zeros(shape, dtype=self.factor.dtype, device=values.device)
        state[prefix + 'factor'] = factor.masked_scatter(mask, values.to(self.factor.dtype))
        state[prefix + 'mask'] = mask

    def summary_info(self) -> dict[str, Any]:
        active = self.active
        value_bytes = active * torch.empty(0, dtype=self.storage_dtype).element_size()
        bit_bytes = (self.mask.numel() + 7) // 8 if self._bits_stored() else 0
        return {'kind': 'fips_factor', 'rank': self.rank, 'shape': list(self.factor.shape),
                'sparsity': self.sparsity, 'stored_params': active, 'bytes': value_bytes + bit_bytes,
                'bias_params': self.bias.numel() if self.bias is not None else 0,
                'scale_params': self.scale.numel() if self.scale is not None else 0}

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, '
                f'bias={self.bias is not None}, scale={self.scale is not None}, '
                f'{"transposed" if self.transposed else "direct"}')


@functools.cache
def _compile_hint() -> None:
    _logger.warning('torch.compile of a FiPS model: every FipsLinear reads its cached eval weight outside the compiled '
                    'graph (one graph break per layer), so it runs slower than the compiled original. For compiled '
                    'inference, compile timm_reduce.materialize(model): plain timm layers, same outputs.')


@torch.compiler.disable
def _cached_weight_eagerly(layer: FipsLinear) -> torch.Tensor:
    _compile_hint()
    return layer.cached_weight()
