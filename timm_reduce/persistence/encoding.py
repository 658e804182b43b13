"""The stored form of a model's tensors: every shared tensor once (aliases dropped), reduced layers in their compact
form (`core.protocol`: e.g. a FiPS factor as its non-zero values plus a packed bit mask). Below both serialization
and summary (which counts bytes at rest with it)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.protocol import decode_compact, encode_compact
from ..core.sharing import alias_map

__all__ = ['encode_state', 'decode_state']


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
