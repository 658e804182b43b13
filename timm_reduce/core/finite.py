"""Finding NaN and infinite values: one scan shared by reduce, calibration, its checkpoints, save and push."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

__all__ = ['non_finite']


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, int, int]]:
    """`(name, non-finite values, size)` of every floating tensor of `named` that holds NaN or ±inf, lazily
    (a caller may stop at the first); tensors on the meta device hold no values and are skipped."""
    for name, t in named:
        if t.is_floating_point() and t.device.type != 'meta' and not bool(torch.isfinite(t).all()):
            yield name, int((~torch.isfinite(t)).sum()), t.numel()
