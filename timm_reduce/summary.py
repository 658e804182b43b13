"""summary(): parameters, unique parameters, MLP parameters before/after, bytes at rest, MACs, per-block table."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core.api import mlp_unique_params
from .core.discovery import find_mlp_sites, mlp_kind
from .core.record import base_name, get_record
from .core.protocol import layer_rows, referenced_parameters
from .persistence.encoding import encode_state
from .core.sharing import count_unique

__all__ = ['summary', 'format_summary', 'count_macs', 'model_input_size', 'stored_params']


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model takes now (after any img_size override), from timm's model traits; for a model timm did
    not create (built from its class: no traits, no `pretrained_cfg`), from the model itself (`patch_embed.img_size`,
    its input channels) instead of timm's 224 default."""
    from timm.models import get_model_input_config, get_model_traits

    size = tuple(get_model_input_config(model)['input_size'])
    known = get_model_traits(model).get('img_size') is not None or 'input_size' in (
        getattr(model, 'pretrained_cfg', None) or {})
    return size if known else _own_input_size(model) or size


def _own_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from the model's patch embedding (ViT, DeiT, Swin, EVA, BEiT, ...), or None if it has none."""
    embed = getattr(model, 'patch_embed', None)
    img_size = getattr(embed, 'img_size', None) or getattr(model, 'img_size', None)
    if img_size is None:
        return None
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    proj = getattr(embed, 'proj', None)
    channels = getattr(proj, 'in_channels', None) or getattr(model, 'in_chans', None) or 3
    return (int(channels), *(int(v) for v in hw[-2:]))


def count_macs(model: nn.Module, input_size: tuple[int, ...] | None = None) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (matmuls, convolutions, attention), via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    if input_size is None:
        input_size = model_input_size(model)
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)  # fills eval-mode weight caches (FiPS), so the one-off rebuild is not counted as per-image work
            with FlopCounterMode(display=False) as counter:
                model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def stored_params(model: nn.Module) -> int:
    """Parameters the saved file holds: unique tensors, a masked tensor (FiPS factor) counted by its non-zeros."""
    from .core.sharing import tensor_identity

    counts: dict[tuple, int] = {}
    for module in model.modules():
        mask = getattr(module, 'mask', None)
        for p in module.parameters(recurse=False):
            masked = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == p.shape
            counts.setdefault(tensor_identity(p), int(mask.sum()) if masked else p.numel())
    return sum(counts.values())


def params_per_use(module: nn.Module) -> int:
    """Parameters `module`'s forward pass computes with, a shared tensor counted once per use: every registered
    parameter (duplicates kept) plus the shared tensors a layer only references (`referenced_parameters()`, e.g.
    MorphReuse users other than the bank's owner)."""
    count = sum(p.numel() for _, p in module.named_parameters(remove_duplicate=False))
    for _, m in module.named_modules(remove_duplicate=False):
        count += sum(p.numel() for p in referenced_parameters(m))
    return count


def summary(model: nn.Module, input_size: tuple[int, ...] | None = None, macs: bool = True) -> dict[str, Any]:
    """Size and cost of a (reduced) timm model.

    Returns a dict with:
        params: parameters as the forward pass uses them (a shared tensor counted once per use);
        unique_params: distinct parameters (shared tensors once);
        stored_params: what the saved file holds: unique parameters, sparse (masked) tensors by their non-zeros;
        params_before / mlp_params_before: of the dense model before reduction (equal to now if never reduced);
        mlp_params: unique parameters of the block MLPs now;
        bytes: tensor bytes of the saved form (model.safetensors without its small JSON header);
        macs: multiply-accumulates of one image at `input_size` (default: the model's data config);
        recipe: the reductions applied; blocks: one row per block (path, kind, hidden units, params, group);
        layers: one row per module that reports itself via `summary_info()` (e.g. FiPS bases and factors: rank,
            sparsity, stored params, bytes), each with its `path`.
    """
    record = get_record(model)
    params = params_per_use(model)
    sites = find_mlp_sites(model)
    owner: dict[int, int] = {}
    blocks = []
    for site in sites:
        mlp = site.mlp
        group = owner.setdefault(id(mlp), site.index)
        blocks.append({
            'index': site.index,
            'path': site.path,
            'kind': mlp_kind(mlp),
            'type': type(mlp).__name__,
            'hidden': mlp.fc2.in_features,
            'params': params_per_use(mlp),
            'shared_with': group if group != site.index else None,
        })
    mlp_now = mlp_unique_params(model)
    stored = stored_params(model)
    info = {
        'model': type(model).__name__,
        'base': base_name(model),
        'recipe': [str(s) for s in record.recipe] if record else [],
        'params': params,
        'unique_params': count_unique(model),
        'stored_params': stored,
        'params_before': record.params_before if record else params,
        'mlp_params_before': record.mlp_params_before if record else mlp_now,
        'mlp_params': mlp_now,
        'bytes': sum(t.numel() * t.element_size() for t in encode_state(model, for_disk=False).values()),
        'blocks': blocks,
        'layers': layer_rows(model),
    }
    if macs:
        info['macs'] = count_macs(model, input_size)
    return info


def _human(n: float, unit: str = '') -> str:
    for suffix in ('', 'K', 'M', 'G', 'T'):
        if abs(n) < 1000:
            return f'{n:.3g}{suffix}{unit}' if suffix else f'{n:,.0f}{unit}'
        n /= 1000
    return f'{n:.3g}P{unit}'


def format_summary(info: dict[str, Any], blocks: bool = True) -> str:
    """A readable text table of `summary()`."""
    mb = info['bytes'] / 2 ** 20
    before, mlp_before = info['params_before'], info['mlp_params_before']
    lines = [
        f"model          {info['model']} (base: {info['base']})",
        f"recipe         {' -> '.join(info['recipe']) or '(not reduced)'}",
        f"params         {info['params']:,} (as used in the forward pass)",
        f"unique params  {info['unique_params']:,} ({info['unique_params'] / before:.1%} of {before:,})",
        f"stored params  {info['stored_params']:,} ({info['stored_params'] / before:.1%}, sparse tensors by their "
        f"non-zeros)",
        f"MLP params     {info['mlp_params']:,} ({info['mlp_params'] / mlp_before:.1%} of {mlp_before:,})",
        f"bytes at rest  {info['bytes']:,} ({mb:.2f} MiB)",
    ]
    if 'macs' in info:
        lines.append(f"MACs           {_human(info['macs'])} per image")
    if blocks:
        lines.append('')
        lines.append(f"{'block':<22} {'mlp':<10} {'hidden':>7} {'params':>12}  shared with")
        for b in info['blocks']:
            shared = f"block {b['shared_with']}" if b['shared_with'] is not None else ''
            lines.append(f"{b['path']:<22} {b['type']:<10} {b['hidden']:>7} {b['params']:>12,}  {shared}")
    if blocks and info.get('layers'):
        lines.append('')
        lines.append(f"{'layer':<28} {'kind':<12} {'rank':>6} {'sparsity':>9} {'stored params':>14} {'bytes':>12}")
        for row in info['layers']:
            sparsity = f"{row['sparsity']:.1%}" if 'sparsity' in row else ''
            lines.append(f"{row['path']:<28} {row.get('kind', ''):<12} {row.get('rank', ''):>6} {sparsity:>9} "
                         f"{row.get('stored_params', 0):>14,} {row.get('bytes', 0):>12,}")
        stored = sum(r.get('stored_params', 0) for r in info['layers'])
        nbytes = sum(r.get('bytes', 0) for r in info['layers'])
        lines.append(f"{'total':<28} {'':<12} {'':>6} {'':>9} {stored:>14,} {nbytes:>12,}")
    return '\n'.join(lines)
