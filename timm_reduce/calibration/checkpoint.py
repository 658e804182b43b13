"""Per-epoch calibration checkpoints: written atomically, read back only by a run with the same fingerprint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ReduceError

__all__ = ['CHECKPOINT_NAME', 'save_checkpoint', 'load_checkpoint']

CHECKPOINT_NAME = 'calibration.pt'


def save_checkpoint(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)



def load_checkpoint(path: Path, fingerprint: dict, device: torch.device) -> dict[str, Any]:
    """Read a per-epoch checkpoint and check that it was written by a run with the same `fingerprint`."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ReduceError(f'calibration: cannot read checkpoint {path}: {e}') from e
    saved = state.get('fingerprint', {})
    diff = {k: (saved.get(k), v) for k, v in _normalise(fingerprint).items() if _normalise(saved).get(k) != v}
    if diff:
        details = ', '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in diff.items())
        raise ReduceError(f'calibration: checkpoint {path} is from a different run ({details}). Use the same options '
                          f'to resume, or another checkpoint_dir to start afresh.')
    return state


def _normalise(value: Any) -> Any:
    """Tuples -> lists, recursively, so a fingerprint compares equal after a save/load round trip."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


