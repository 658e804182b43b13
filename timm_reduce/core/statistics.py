"""Activation statistics of every MLP, measured on calibration images, for data-aware initialisation.

`collect_statistics` runs the model (unchanged, in eval mode) over image batches and, for every MLP block,
accumulates over all tokens of all images (per batch in float32, across batches in float64):
  input_moment   E[x xᵀ]        (d x d) of the MLP's input x (what its input linears read);
  hidden_energy  E[h_j²]        (width) of fc2's input h (the hidden units after activation / norm);
  output_moment  E[y yᵀ]        (d x d) of y = fc2.weight · h (fc2's output without its bias).
Second moments (not covariances): a linear's output error E‖(W - Ŵ) x‖² = tr((W - Ŵ) E[x xᵀ] (W - Ŵ)ᵀ) involves
exactly these.

With `sensitivity=True` it also measures how much the model's prediction depends on each MLP: with g the gradient
of the cross-entropy to a label drawn from the model's own softmax (so E[g gᵀ] is the Fisher information of the
prediction) with respect to the MLP's output, per channel a_i = E_image[Σ_tokens g_i²], and
  sensitivity = ½ Σ_i a_i · E[y_i²],
the second-order estimate of the KL divergence between the model's predictions before and after the MLP's output y
is removed (channels and tokens taken as independent). A reduction that loses a fraction e of y's energy costs about
e · sensitivity; `core.allocation` spends a budget where it saves the most of that cost.
Under torch.distributed every rank's sums are added (all ranks must call it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ReduceError
from .discovery import find_mlp_sites
from .hidden_units import input_linears

__all__ = ['MlpStatistics', 'collect_statistics', 'sensitivities']


@dataclass
class MlpStatistics:
    """Second moments of one MLP's activations (float64, on the CPU), the number of tokens they average and, when
    measured, the MLP's `sensitivity` (see the module docstring). A moment set to None is not used (e.g. an
    allocation by sensitivity over a weight-only initialisation keeps only `sensitivity`)."""

    input_moment: torch.Tensor | None
    hidden_energy: torch.Tensor | None
    output_moment: torch.Tensor | None
    tokens: int
    sensitivity: float | None = None


class _Accumulator:
    def __init__(self, mlp: nn.Module) -> None:
        self.mlp = mlp
        d, h = getattr(mlp, input_linears(mlp)[0]).in_features, mlp.fc2.in_features
        device = mlp.fc2.weight.device
        self.x = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.h = torch.zeros(h, dtype=torch.float64, device=device)
        self.y = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.fisher = torch.zeros(mlp.fc2.out_features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.probe: torch.Tensor | None = None

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

    def on_output(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        # a zero leaf added to the output: its gradient is the output's, whether or not the weights require grad
        self.probe = torch.zeros_like(output, requires_grad=True)
        return output + self.probe


def _sampled_fisher_loss(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Summed cross-entropy to labels drawn from the model's own softmax (one per image)."""
    logits = logits.float()
    probs = logits.detach().softmax(-1).cpu()
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    return F.cross_entropy(logits, labels, reduction='sum')


def _overflowed(accumulators: dict[str, _Accumulator]) -> str | None:
    """The first block whose sums are no longer finite, else None."""
    for path, acc in accumulators.items():
        if not all(bool(torch.isfinite(t).all()) for t in (acc.x, acc.h, acc.y, acc.fisher)):
            return path
    return None


def collect_statistics(model: nn.Module, batches: Iterable[torch.Tensor], sensitivity: bool = False,
                       seed: int = 0, *, batch_name: Callable[[int], str] | None = None) -> dict[str, MlpStatistics]:
    """Statistics of every MLP block of `model` over `batches` (image tensors), keyed by the block's path.

    With `sensitivity` each block's sensitivity is measured too (one backward pass per batch; labels drawn with
    `seed`). The model's train/eval modes are restored afterwards; its weights are only read (no `.grad` is
    written). Raises ValueError when no token was seen (empty `batches`), ReduceError when a batch makes the
    statistics non-finite (naming the batch: `batch_name(i)` for the i-th batch of `batches`, default 'batch i');
    under torch.distributed every rank raises then, the others saying that another process overflowed.
    """
    sites = find_mlp_sites(model)
    accumulators = {s.path: _Accumulator(s.mlp) for s in sites}
    handles = []
    for site in sites:
        acc = accumulators[site.path]
        handles.append(site.mlp.register_forward_pre_hook(acc.on_input))
        handles.append(site.mlp.fc2.register_forward_pre_hook(acc.on_hidden))
        if sensitivity:
            handles.append(site.mlp.register_forward_hook(acc.on_output))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    images_seen = 0
    bad: tuple[str, int] | None = None  # (block, batch) where the sums first overflowed
    try:
        for index, images in enumerate(batches):
            with contextlib.nullcontext() if sensitivity else torch.no_grad():
                logits = model(images)
            if (path := _overflowed(accumulators)) is not None or not bool(torch.isfinite(logits).all()):
                bad = (f'block {path}' if path is not None else "the model's output", index)
                break
            if not sensitivity:
                continue
            images_seen += logits.shape[0]
            accs = list(accumulators.values())
            grads = torch.autograd.grad(_sampled_fisher_loss(logits, generator), [a.probe for a in accs])
            for acc, grad in zip(accs, grads):
                g = grad.detach().float()
                acc.fisher.add_(g.pow(2).reshape(-1, g.shape[-1]).sum(0))
                acc.probe = None
            if (path := _overflowed(accumulators)) is not None:
                bad = (f'block {path}', index)
                break
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    device = next(iter(accumulators.values())).x.device
    flag = torch.tensor([float(bad is not None)], device=device)
    if distributed:  # every rank stops together, none waits in the all-reduces below
        torch.distributed.all_reduce(flag)
    if bad is not None:
        name = batch_name(bad[1]) if batch_name is not None else f'batch {bad[1]}'
        raise ReduceError(f'collect_statistics: the activations of {bad[0]} overflowed on {name} (non-finite '
                          f"values); check that batch (pixel values far out of range?), or start from the "
                          f"weights with init_from='weights'.")
    if float(flag) > 0:
        raise ReduceError('collect_statistics: the activations overflowed on another process (see its error); '
                          'stopped on every process.')
    if distributed:
        images = torch.tensor([float(images_seen)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(images)
        images_seen = int(images.item())
        for acc in accumulators.values():
            count = torch.tensor([float(acc.tokens)], dtype=torch.float64, device=acc.x.device)
            for t in (acc.x, acc.h, acc.y, acc.fisher, count):
                torch.distributed.all_reduce(t)
            acc.tokens = int(count.item())
    out = {}
    for path, acc in accumulators.items():
        if acc.tokens == 0:
            raise ValueError('collect_statistics: no tokens reached the MLPs (empty batches?).')
        n = float(acc.tokens)
        output_moment = acc.y / n
        value = None
        if sensitivity:
            value = 0.5 * float((acc.fisher / images_seen * output_moment.diagonal()).sum())
        out[path] = MlpStatistics((acc.x / n).cpu(), (acc.h / n).cpu(), output_moment.cpu(), acc.tokens, value)
    return out


def sensitivities(statistics: Mapping[str, MlpStatistics] | None, paths: list[str], strategy: str,
                  instead: str) -> dict[str, float]:
    """The measured sensitivity of each block in `paths`, for `strategy`'s allocation; a ReduceError that says how to
    measure them (or what to give `instead`) when they are missing."""
    if statistics is None or any(statistics[p].sensitivity is None for p in paths):
        raise ReduceError(f"{strategy}: allocation='sensitivity' needs each block's measured sensitivity: use "
                          f"compress() (it measures it on the calibration images), or pass reduce(..., statistics="
                          f"collect_statistics(model, batches, sensitivity=True)); or give {instead}.")
    return {p: float(statistics[p].sensitivity) for p in paths}
