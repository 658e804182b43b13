"""The stored form of a model's tensors: every shared tensor once (aliases dropped), reduced layers in their compact
form (`core.protocol`: e.g. a FiPS factor as its non-zero values plus a packed bit mask). Below both serialization
and summary (which counts bytes at rest with it)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.protocol import StoredTensor, decode_compact, describe_compact, encode_compact
from ..core.sharing import alias_map

__all__ = ['encode_state', 'decode_state', 'stored_layout']


def encode_state(model: nn.Module, for_disk: bool = True) -> dict[str, torch.Tensor]:
    """The tensors that are written to disk: each shared tensor once, reduced modules in their compact form.

    With `for_disk=False` tensors stay where they are (also on the meta device): enough to count bytes.
    """
    state = model.state_dict()
    for alias in alias_map(state):
        del state[alias]
    encode_compact(model, state)
    if not for_disk:
        return state
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach().cpu()
        # safetensors refuses tensors that share memory: give any remaining overlap its own copy
        ident = t.untyped_storage().data_ptr()
        t = t.contiguous() if ident not in seen else t.clone().contiguous()
        seen.add(ident)
        out[key] = t
    return out


def decode_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `encode_state` for a model with the same structure: a full state_dict for `load_state_dict`."""
    state = dict(state)
    decode_compact(model, state)
    for alias, canonical in alias_map(model.state_dict()).items():
        if alias not in state and canonical in state:
            state[alias] = state[canonical]
    return state


def stored_layout(model: nn.Module) -> tuple[dict[str, StoredTensor], dict[str, str], list[str]]:
    """What `encode_state(model)` writes, known without data (works on the meta device).

    Returns:
        (layout, aliases, opaque): `{stored key: StoredTensor}`; the state_dict aliases `{alias: canonical}` that are
        not stored; the prefixes of compact layers that do not describe their stored form.
    """
    state = model.state_dict(keep_vars=True)  # the tensors themselves: on meta, sharing is only visible by identity
    aliases = alias_map(state)
    layout = {k: StoredTensor(t.dtype, tuple(t.shape)) for k, t in state.items() if k not in aliases}
    opaque = describe_compact(model, layout)
    return layout, aliases, opaque
