"""FiPS step 2: the layers. A group's shared basis U and a drop-in replacement for each fc1/fc2 of its MLPs.

`FipsLinear` computes `W = U V_k` (fc2) or `(U V_k)ᵀ` (fc1, fc1_g, fc1_x) plus a dense bias. The basis module is
registered as a child of every FipsLinear of its group, the way `grouped` registers one MLP in several blocks:
`parameters()` lists U once, a block's own `parameters()` holds everything its forward depends on (so block-wise
calibration and DDP see the sharing by tensor identity), deepcopy keeps one copy, and `state_dict()` lists U under
every alias, which `timm_reduce.sharing`/`serialization` de-duplicate on save and re-tie on load (update EMA over
de-duplicated tensors, as for `grouped`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.protocol import StoredTensor

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

        On an accelerator the masking always runs (two small elementwise kernels): asking whether the mask is
        full would copy a flag to the host and stall the device queue in every forward of every layer. With a full
        mask the result is the factor exactly (x - 0 = x).
        """
        factor = self.factor
        if factor.device.type != 'cpu' or not bool(self.mask.all()):
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
        """The dense weight, computed once per parameter version (no autograd).

        Always in the parameters' dtype, also when first asked for under autocast: a half-precision weight cached
        there would break (dtype mismatch) or silently degrade every later float32 call. Under autocast F.linear
        casts it per call, as it does a plain nn.Linear's weight.
        """
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad(), _no_autocast(self.factor.device):
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
        """Inverse of `encode_state_dict`; a state that already holds `factor` is left alone.

        The compact form is validated first, nothing is cast: `factor.values` must be 1-D in exactly this layer's
        `storage_dtype`; `factor.bits` uint8 of exactly ceil(numel / 8) bytes, its padding bits zero and as many bits
        set as values are stored; without bits, one value per factor entry. A ReduceError names the tensor.
        """
        from ...errors import ReduceError

        values = state.pop(prefix + 'factor.values', None)
        if values is None:
            return
        bits = state.pop(prefix + 'factor.bits', None)
        shape = self.factor.shape
        numel = shape.numel()
        where = f'{prefix}factor.values'

        def refuse(what: str) -> ReduceError:
            return ReduceError(f'{what}; the file is corrupt, edited or from another model (the {tuple(shape)} '
                               f'factor of this layer is stored as {self.storage_dtype} values plus a uint8 bit mask).')

        if values.dtype != self.storage_dtype:
            raise refuse(f'{where} is stored as {values.dtype}, but this layer stores its factor as '
                         f'{self.storage_dtype} (storage_dtype of its recipe); nothing is cast on load')
        if values.dim() != 1:
            raise refuse(f'{where} has shape {tuple(values.shape)}, not 1-D')
        if bits is None:
            if values.numel() != numel:
                raise refuse(f'{where} holds {values.numel()} values and no {prefix}factor.bits mask is stored, so '
                             f'the factor is dense and needs exactly {numel}')
            mask = torch.ones(shape, dtype=torch.bool, device=values.device)
        else:
            bits_name, nbytes = f'{prefix}factor.bits', (numel + 7) // 8
            if bits.dtype != torch.uint8:
                raise refuse(f'{bits_name} is stored as {bits.dtype}, not torch.uint8')
            if bits.dim() != 1 or bits.numel() != nbytes:
                raise refuse(f'{bits_name} has shape {tuple(bits.shape)}; a mask of {numel} entries packs into '
                             f'exactly ({nbytes},) bytes')
            flat = ((bits.reshape(-1, 1) & _BIT_WEIGHTS.to(bits.device)) != 0).reshape(-1)
            if bool(flat[numel:].any()):
                raise refuse(f'{bits_name} sets padding bits beyond the {numel} mask entries')
            mask = flat[:numel].reshape(shape).to(values.device)
            if int(mask.sum()) != values.numel():
                raise refuse(f'{bits_name} marks {int(mask.sum())} entries but {where} holds {values.numel()} values')
        factor = torch.zeros(shape, dtype=self.factor.dtype, device=values.device)
        state[prefix + 'factor'] = factor.masked_scatter(mask, values.to(self.factor.dtype))
        state[prefix + 'mask'] = mask

    def describe_stored(self, prefix: str, layout: dict[str, StoredTensor]) -> None:
        """`encode_state_dict` without data: the entries, dtypes and sizes a loader checks before allocating."""
        layout.pop(prefix + 'factor', None)
        layout.pop(prefix + 'mask', None)
        numel = self.factor.shape.numel()
        layout[prefix + 'factor.values'] = StoredTensor(self.storage_dtype, max_numel=numel, exact_dtype=True)
        layout[prefix + 'factor.bits'] = StoredTensor(torch.uint8, ((numel + 7) // 8,), exact_dtype=True,
                                                      optional=True)

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


def _no_autocast(device: torch.device) -> Any:
    """Autocast switched off for `device` (a no-op context where autocast does not exist, e.g. meta)."""
    if device.type in ('cpu', 'cuda', 'xpu'):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@functools.cache
def _compile_hint() -> None:
    _logger.warning('torch.compile of a FiPS model: every FipsLinear reads its cached eval weight outside the compiled '
                    'graph (one graph break per layer), so it runs slower than the compiled original. For compiled '
                    'inference, compile timm_reduce.materialize(model): plain timm layers, same outputs.')


@torch.compiler.disable
def _cached_weight_eagerly(layer: FipsLinear) -> torch.Tensor:
    _compile_hint()
    return layer.cached_weight()
