"""Reading calibration data: this rank's share of the batches, each checked to be an image tensor."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from ..errors import ReduceError

__all__ = ['collect_batches']

_logger = logging.getLogger(__name__)


def _batch_images(batch: Any, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ReduceError(f'calibration data: batch {index} is a {type(batch).__name__}; expected an image tensor '
                          f'(B, C, H, W) or an (images, targets) tuple, as a DataLoader gives.')
    if not batch.is_floating_point() or batch.ndim < 2:
        raise ReduceError(f'calibration data: batch {index} is a {batch.dtype} tensor of shape {tuple(batch.shape)}; '
                          f'expected float images (B, C, H, W) after the model\'s transforms.')
    return batch


def collect_batches(data: Iterable, limit: int | None, rank: int, world: int) -> tuple[list[torch.Tensor], int]:
    """This rank's share of the first `limit` batches of `data`, and the number of batches read in total."""
    if data is None:
        raise ReduceError('calibration needs data: pass data=<a DataLoader or an iterable of image batches or '
                          '(images, targets) tuples>. For a reduction without data use timm_reduce.reduce().')
    try:
        iterator = iter(data)
    except TypeError:
        raise ReduceError(f'calibration data must be iterable (a DataLoader, a list of batches), '
                          f'got {type(data).__name__}.') from None
    mine, total = [], 0
    for i, batch in enumerate(iterator):
        if limit is not None and i >= limit:
            break
        images = _batch_images(batch, i)
        if i % world == rank:
            mine.append(images)
        total += 1
    usable = total // world
    if usable == 0:
        raise ReduceError(f'calibration data gave {total} batch(es); need at least {world} '
                          f'(one per process).' if total else 'calibration data is empty: it gave no batches.')
    if total % world:
        _logger.warning(f'calibration: {total} batches do not split evenly over {world} processes; '
                        f'using {usable * world}.')
    return mine[:usable], usable * world


