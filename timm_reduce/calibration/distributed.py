"""The distributed parts of calibration: this process's rank, and checks that every rank holds the same state."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from ..errors import ReduceError

__all__ = ['rank_and_world', 'collective_device', 'tensor_hash', 'check_identical']


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collective_device(model_device: torch.device) -> torch.device:
    """Where the small bookkeeping tensors of a collective (loss, error sums, hashes) must live.

    A process group created with plain `backend='nccl'` has no CPU backend: an all-reduce of a CPU tensor raises
    ("No backend type associated with device type cpu"). Those tensors then go to this rank's GPU (the model's
    device when it is a GPU, else the current CUDA device); with gloo, or `'cpu:gloo,cuda:nccl'`, they stay on the CPU.
    """
    backend = str(torch.distributed.get_backend()).lower()
    if backend != 'nccl':
        return torch.device('cpu')
    if model_device.type == 'cuda':
        return model_device
    return torch.device('cuda', torch.cuda.current_device())


def tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], 'little', signed=True)


def check_identical(what: str, value: int, device: torch.device | None = None) -> None:
    """Raise when the ranks disagree on `value` (a hash); `device`: see `collective_device` (default CPU)."""
    world = torch.distributed.get_world_size()
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(everyone, mine)
    values = [int(t) for t in everyone]
    if len(set(values)) != 1:
        raise ReduceError(f'distributed calibration: the {what} differ between ranks (hashes {values}); every rank '
                          f'must apply the same updates. Check that all ranks build the same model and options.')


