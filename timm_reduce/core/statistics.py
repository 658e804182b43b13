"""Activation statistics of every MLP, measured on calibration images, for data-aware initialisation.

`collect_statistics` runs the model (unchanged, in eval mode, without gradients) over image batches and, for every MLP
block, accumulates over all tokens of all images (per batch in float32, across batches in float64):
  input_moment   E[x xᵀ]        (d x d) of the MLP's input x (what its input linears read);
  hidden_energy  E[h_j²]        (width) of fc2's input h (the hidden units after activation / norm);
  output_moment  E[y yᵀ]        (d x d) of y = fc2.weight · h (fc2's output without its bias).
Second moments (not covariances): a linear's output error E‖(W - Ŵ) x‖² = tr((W - Ŵ) E[x xᵀ] (W - Ŵ)ᵀ) involves
exactly these. Under torch.distributed every rank's sums are added (all ranks must call it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .discovery import find_mlp_sites
from .hidden_units import input_linears

__all__ = ['MlpStatistics', 'collect_statistics']


@dataclass
class MlpStatistics:
    """Second moments of one MLP's activations (float64, on the CPU) and the number of tokens they average."""

    input_moment: torch.Tensor
    hidden_energy: torch.Tensor
    output_moment: torch.Tensor
    tokens: int


class _Accumulator:
    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp
        d, h = getattr(mlp, input_linears(mlp)[0]).in_features, mlp.fc2.in_features
        device = mlp.fc2.weight.device
        self.x = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.h = torch.zeros(h, dtype=torch.float64, device=device)
        self.y = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.tokens = 0

    # each batch's sums in float32 (fast everywhere; float64 matmuls crawl on most GPUs), added up in float64
    def on_input(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.x.add_(x.T @ x)
        self.tokens += x.shape[0]

    def on_hidden(self, _module: nn.Module, args: tuple) -> None:
        h = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.h.add_(h.pow(2).sum(0))
        y = h @ self.mlp.fc2.weight.detach().float().T
        self.y.add_(y.T @ y)


@torch.no_grad()
def collect_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, MlpStatistics]:
    """Statistics of every MLP block of `model` over `batches` (image tensors), keyed by the block's path.

    The model's train/eval modes are restored afterwards; its weights are only read. Raises ValueError when no
    token was seen (empty `batches`).
    """
    sites = find_mlp_sites(model)
    accumulators = {s.path: _Accumulator(s.mlp) for s in sites}
    handles = []
    for site in sites:
        acc = accumulators[site.path]
        handles.append(site.mlp.register_forward_pre_hook(acc.on_input))
        handles.append(site.mlp.fc2.register_forward_pre_hook(acc.on_hidden))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for images in batches:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for acc in accumulators.values():
            count = torch.tensor([float(acc.tokens)], dtype=torch.float64, device=acc.x.device)
            for t in (acc.x, acc.h, acc.y, count):
                torch.distributed.all_reduce(t)
            acc.tokens = int(count.item())
    out = {}
    for path, acc in accumulators.items():
        if acc.tokens == 0:
            raise ValueError('collect_statistics: no tokens reached the MLPs (empty batches?).')
        n = float(acc.tokens)
        out[path] = MlpStatistics((acc.x / n).cpu(), (acc.h / n).cpu(), (acc.y / n).cpu(), acc.tokens)
    return out
