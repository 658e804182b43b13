"""Layers of the MorphReuse strategy: scaled views of a shared linear layer, and a shared residual core MLP.

A shared module (a `SharedLinear` bank or a `SharedCore`) is owned by the model: the first layer that uses it
registers it as its child `shared`; every other user keeps a plain (unregistered) reference to the same module object.
So `state_dict()`, `parameters()`, EMA and the de-duplicated save list each shared tensor exactly once, while deepcopy
and pickling (which copy the whole object graph with one memo) keep every user pointing at the one copy. Users read the
shared module's parameters at call time, so replacing a parameter inside it (`load_state_dict(assign=True)`,
`functional_call`, device moves) is seen by every user.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ReduceError

__all__ = ['SharedLinear', 'MorphLinear', 'SharedCore', 'MorphCoreMlp']

ScaleKind = Literal['scalar', 'channel']


def _attach(user: nn.Module, shared: nn.Module, owner: bool) -> None:
    """Give `user` access to `shared`; only the owner registers it in the module tree."""
    user.__dict__['_shared_ref'] = shared
    if owner:
        user.shared = shared


class _SharedUser(nn.Module):
    """A module that uses a shared module it may or may not own."""

    @property
    def shared_module(self) -> nn.Module:
        """The shared module (a bank or a core), whether this layer owns it or references it."""
        return self.__dict__['_shared_ref']

    @property
    def is_owner(self) -> bool:
        """True for the one user that registers the shared module (its parameters are in this layer's state_dict)."""
        return self._modules.get('shared') is self.shared_module

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters this layer shares with the other users (also when it only references them).

        `self.parameters()` lists them only for the owner; a block-wise optimiser that needs every tensor a block
        depends on should add these.
        """
        return list(self.shared_module.parameters())

    def referenced_parameters(self) -> list[nn.Parameter]:
        """The shared parameters this layer uses without registering them (`core.protocol`): all of them for a
        user that only references the shared module, none for its owner."""
        return [] if self.is_owner else self.shared_parameters()


class SharedLinear(nn.Module):
    """The (weight, bias) pair shared by every `MorphLinear` of one shape in a scope.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether the shared layer has a bias.
        tag: a short name shown in reprs (e.g. `'fc1 3072x768'`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tag: str = '',
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.tag = in_features, out_features, tag
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def extra_repr(self) -> str:
        return f'{self.tag!r}, in_features={self.in_features}, out_features={self.out_features}, ' \
               f'bias={self.bias is not None}'


class MorphLinear(_SharedUser):
    """A linear layer y = a ⊙ (W x + b): the shared (W, b) of a `SharedLinear`, times this layer's own scale `a`.

    The scale multiplies weight and bias alike, so the layer is a scaled copy of the shared affine map; `a` is a
    scalar (`scale_kind='scalar'`) or one value per output channel (`'channel'`).

    Args:
        shared: the bank.
        scale_kind: `'scalar'` or `'channel'`.
        owner: register the bank in this layer (exactly one user per bank does).
    """

    def __init__(self, shared: SharedLinear, scale_kind: ScaleKind = 'scalar', owner: bool = False) -> None:
        super().__init__()
        if scale_kind not in ('scalar', 'channel'):
            raise ReduceError(f"MorphLinear: scale_kind must be 'scalar' or 'channel', got {scale_kind!r}.")
        weight = shared.weight
        self.in_features, self.out_features, self.scale_kind = shared.in_features, shared.out_features, scale_kind
        shape = () if scale_kind == 'scalar' else (shared.out_features,)
        self.scale = nn.Parameter(torch.ones(shape, device=weight.device, dtype=weight.dtype))
        _attach(self, shared, owner)

    @property
    def bank(self) -> SharedLinear:
        return self.shared_module

    def _row_scale(self) -> torch.Tensor:
        return self.scale if self.scale_kind == 'scalar' else self.scale[:, None]

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer applies: a ⊙ W."""
        return self.bank.weight * self._row_scale()

    def effective_bias(self) -> torch.Tensor | None:
        """The bias this layer applies: a ⊙ b (None when the bank has no bias)."""
        return None if self.bank.bias is None else self.bank.bias * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.effective_bias())

    @torch.no_grad()
    def materialize(self) -> nn.Linear:
        """A plain `nn.Linear` computing exactly this layer (same tensors as the forward pass, so same outputs)."""
        weight = self.effective_weight()
        bias = self.effective_bias()
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        role = 'owner' if self.is_owner else 'user'
        return f'in_features={self.in_features}, out_features={self.out_features}, scale={self.scale_kind}, ' \
               f'shared={self.bank.tag!r} ({role})'


class SharedCore(nn.Module):
    """The shared residual core: y = z + 2·sigmoid(s)·(W2·GELU(LN(W1 z + b1)) + b2).

    With `s` initialised at -3 the residual branch starts at 2·sigmoid(-3) ≈ 0.095 of its size, so the core begins
    close to the identity.

    Args:
        dim: core width (input and output).
        hidden: width of the core's hidden layer.
        alpha_init: initial value of the gate logit `s`.
    """

    def __init__(self, dim: int, hidden: int, alpha_init: float = -3.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw = {'device': device, 'dtype': dtype}
        self.dim, self.hidden = dim, hidden
        self.fc1 = nn.Linear(dim, hidden, **kw)
        self.norm = nn.LayerNorm(hidden, **kw)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **kw)
        self.alpha = nn.Parameter(torch.full((), float(alpha_init), **kw))
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def gate(self) -> torch.Tensor:
        """The residual gain 2·sigmoid(s), in (0, 2)."""
        return 2 * torch.sigmoid(self.alpha)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.gate() * self.fc2(self.act(self.norm(self.fc1(z))))


class MorphCoreMlp(_SharedUser):
    """A block MLP replaced by bias-free projections around a shared core: x -> fc1 (d -> c) -> core -> fc2 (c -> d).

    `fc1` / `fc2` are this block's own projections (xavier-uniform init). The module declares `mlp_kind =
    'morphreuse_core'` for discovery; it has no plain-timm equivalent, so `materialize()` raises.

    Args:
        in_features: the block's MLP input width.
        out_features: the block's MLP output width.
        core: the shared core.
        owner: register the core in this module (exactly one user per core does).
    """

    mlp_kind = 'morphreuse_core'

    def __init__(self, in_features: int, out_features: int, core: SharedCore, owner: bool = False) -> None:
        super().__init__()
        kw = {'device': core.alpha.device, 'dtype': core.alpha.dtype}
        self.in_features, self.out_features = in_features, out_features
        self.fc1 = nn.Linear(in_features, core.dim, bias=False, **kw)
        self.fc2 = nn.Linear(core.dim, out_features, bias=False, **kw)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight)
        _attach(self, core, owner)

    @property
    def core(self) -> SharedCore:
        return self.shared_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.core(self.fc1(x)))

    def materialize(self) -> nn.Module:
        raise ReduceError(
            "materialize: the MorphReuse 'core' variant has no plain-timm form (its blocks compute fc2(core(fc1(x))), "
            "a core with a LayerNorm before the GELU and a gated residual, which timm's Mlp cannot express). Keep the "
            "timm_reduce model (save_pretrained without dense=True), or use variant='shape', which materialises to "
            'ordinary nn.Linear layers.')

    def extra_repr(self) -> str:
        role = 'owner' if self.is_owner else 'user'
        return f'in_features={self.in_features}, core_dim={self.core.dim}, out_features={self.out_features}, ' \
               f'core ({role})'
