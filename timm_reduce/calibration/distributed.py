"""The distributed parts of calibration: this process's rank, and checks that every rank holds the same state."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from ..errors import ReduceError

__all__ = ['rank_and_world', 'tensor_hash', 'check_identical']


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], 'little', signed=True)


def check_identical(what: str, value: int) -> None:
    """Raise when the ranks disagree on `value` (a hash)."""
    world = torch.distributed.get_world_size()
    mine = torch.tensor([value], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(everyone, mine)
    values = [int(t) for t in everyone]
    if len(set(values)) != 1:
        raise ReduceError(f'distributed calibration: the {what} differ between ranks (hashes {values}); every rank '
                          f'must apply the same updates. Check that all ranks build the same model and options.')


