"""Per-epoch calibration checkpoints: written atomically with a checksum, read back only by the same run.

File layout: the line `MAGIC`, the SHA-256 (hex) of the payload and a newline, then the payload (`torch.save` of a
dict). Reading checks, in this order, and refuses with a ReduceError that names the file and says what is wrong:
the file is readable and not empty; it starts with `MAGIC`; the checksum matches the payload (a flipped or missing
byte anywhere is caught); the payload loads with `weights_only=True` (no code runs); it is a dict with every key;
its fingerprint equals this run's (strategy recipe, calibration options, SHA-256 of the calibration batches, the
teacher's weights, world size, steps, parameter shapes, blocks); `epoch` is an integer in [1, epochs]; the model
state has this model's keys, shapes and dtypes, finite values, and frozen tensors equal to the model's; the
optimizer/hooks states hold finite tensors; the scheduler stands at `epoch * steps_per_epoch`; the RNG state is a
uint8 tensor of the size torch uses; the report lists one finite loss per epoch.

The checksum detects corruption (disk, copy, truncation, an edited byte), not a forger who recomputes it: a
checkpoint is trusted like the code that runs the calibration. Even a forged file cannot run code (weights_only
load) and cannot put non-finite or out-of-range values into the run.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import ReduceError
from ..core.finite import non_finite
from ..persistence.files import new_temp_file

__all__ = ['CHECKPOINT_NAME', 'MAGIC', 'save_checkpoint', 'load_checkpoint', 'validate_state']

CHECKPOINT_NAME = 'calibration.pt'
MAGIC = b'timm_reduce calibration checkpoint 2\n'
KEYS = ('fingerprint', 'epoch', 'model', 'optimizer', 'scheduler', 'hooks', 'rng', 'report')
_RESTART = "Pass resume='restart' (CLI: --resume restart) to discard it and start afresh, or use another checkpoint_dir."


def save_checkpoint(obj: Any, path: Path) -> None:
    """Write `obj` with a checksum header, atomically (temporary file in the same folder, fsync, `os.replace`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, path.name)  # the mode open() gives (mkstemp's 0600 would hide it from others)
    try:
        with open(tmp, 'wb') as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b'\n' + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, fingerprint: dict, device: torch.device) -> dict[str, Any]:
    """Read a per-epoch checkpoint, check its checksum, structure and `fingerprint` (see the module docstring).

    The values are checked by `validate_state`, which needs the run's model and schedule.
    """
    def refuse(what: str) -> ReduceError:
        return ReduceError(f'calibration: checkpoint {path} {what}. {_RESTART}')

    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise refuse(f'cannot be read ({e.strerror or e})') from None
    if not raw:
        raise refuse('is empty (0 bytes; an interrupted copy?)')
    if not raw.startswith(MAGIC):
        raise refuse('is not a timm_reduce calibration checkpoint with a checksum (it does not start with the '
                     'expected header; an older version or another file)')
    header_end = raw.find(b'\n', len(MAGIC))
    stored = raw[len(MAGIC):header_end] if header_end >= 0 else b''
    payload = raw[header_end + 1:] if header_end >= 0 else b''
    if len(stored) != 64 or hashlib.sha256(payload).hexdigest().encode() != stored:
        raise refuse(f'is corrupt: the SHA-256 of its {len(payload)}-byte content does not match the checksum it '
                     f'was written with (flipped, missing or edited bytes)')
    try:
        state = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
    except Exception as e:
        raise refuse(f'cannot be loaded as plain tensors and numbers ({type(e).__name__})') from None
    if not isinstance(state, dict):
        raise refuse(f'holds a {type(state).__name__}, not the dict a calibration checkpoint is')
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise refuse(f'lacks {", ".join(missing)}')
    saved = state['fingerprint']
    if not isinstance(saved, dict):
        raise refuse('has no valid fingerprint')
    now, then = _normalise(fingerprint), _normalise(saved)
    diff = {k: (then.get(k), v) for k, v in now.items() if then.get(k) != v}
    if diff:
        details = ', '.join(f'{k}: checkpoint {_short(a)} vs now {_short(b)}' for k, (a, b) in diff.items())
        raise ReduceError(f'calibration: checkpoint {path} is from a different run ({details}). Use the same '
                          f'options, strategy and data to resume. {_RESTART}')
    return state


def validate_state(state: dict, path: Path, *, epochs: int, steps: int, model_state: dict[str, torch.Tensor],
                   trainable: set[str], rng_size: int, distill_epochs: int = 0) -> None:
    """Check the values of a loaded checkpoint against the run before anything is loaded into it.

    Args:
        model_state: the model's current state dict (names -> tensors); `trainable`: the names that calibration
            changes (every other tensor must equal the model's).
        epochs / distill_epochs: the run's block-wise and distillation epochs; a checkpoint after distillation
            epoch j says epoch `epochs + j` and holds the distillation optimizer and schedule.
    """
    def refuse(what: str) -> ReduceError:
        return ReduceError(f'calibration: checkpoint {path} {what}. {_RESTART}')

    epoch, last = state['epoch'], epochs + distill_epochs
    if not (isinstance(epoch, int) and not isinstance(epoch, bool)) or not 1 <= epoch <= last:
        raise refuse(f'says epoch {epoch!r}; a checkpoint of this run is written after epoch 1 to {last}')
    blockwise = min(epoch, epochs)
    weights = state['model']
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise refuse('holds no model state dict (names -> tensors)')
    if set(weights) != set(model_state):
        extra, lost = sorted(set(weights) - set(model_state)), sorted(set(model_state) - set(weights))
        raise refuse(f'holds other tensors than the model (unexpected: {", ".join(extra[:3]) or "none"}; '
                     f'missing: {", ".join(lost[:3]) or "none"})')
    for name, mine in model_state.items():
        t = weights[name]
        if t.shape != mine.shape or t.dtype != mine.dtype:
            raise refuse(f'holds {name} as {t.dtype} {tuple(t.shape)}; the model has {mine.dtype} {tuple(mine.shape)}')
        if any(non_finite([(name, t)])):
            raise refuse(f'holds NaN or infinite values in {name}')
        if name not in trainable and not torch.equal(t, mine.to(t.device)):
            raise refuse(f'holds a {name} that differs from the model\'s, though calibration never changes it '
                         f'(a checkpoint of another model?)')
    for what in ('optimizer', 'hooks'):
        for name, _, _ in non_finite(_tensors(state[what], what)):
            raise refuse(f'holds NaN or infinite values in {name}')
    optimizer = state['optimizer']
    if not isinstance(optimizer, dict) or not {'state', 'param_groups'} <= set(optimizer):
        raise refuse('holds no optimizer state')
    for i, group in enumerate(optimizer['param_groups'] if isinstance(optimizer['param_groups'], list) else []):
        for key, value in (group.items() if isinstance(group, dict) else ()):
            if isinstance(value, float) and not math.isfinite(value):
                raise refuse(f'holds optimizer setting {key}={value} (parameter group {i})')
    scaler = state.get('scaler')  # fp16 loss scaling (amp='fp16')
    if scaler is not None and not (isinstance(scaler, dict) and _finite(scaler.get('scale'))
                                   and scaler['scale'] > 0):
        raise refuse(f'holds a loss-scaler state {_short(scaler)}; expected a finite scale > 0')
    scheduler = state['scheduler']
    stage_steps = (epoch if epoch <= epochs else epoch - epochs) * steps  # the distillation has its own schedule
    if not isinstance(scheduler, dict) or scheduler.get('last_epoch') != stage_steps:
        at = scheduler.get('last_epoch') if isinstance(scheduler, dict) else None
        raise refuse(f'has its LR schedule at step {at!r}; after epoch {epoch} it is at {stage_steps}')
    if not isinstance(state['hooks'], list):
        raise refuse('holds no list of strategy hook states')
    rng = state['rng']
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.ndim == 1 and rng.numel() == rng_size):
        shape = f'{rng.dtype} {tuple(rng.shape)}' if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise refuse(f'holds an RNG state of {shape}; torch uses a uint8 tensor of {rng_size} bytes')
    report = state['report']
    if not isinstance(report, dict):
        raise refuse('holds no report')
    counts = {'epoch_loss': blockwise, 'epoch_time': epoch}
    if epoch > epochs or 'distill_loss' in report:
        counts['distill_loss'] = epoch - blockwise
    for key, count in counts.items():
        values = report.get(key)
        if not (isinstance(values, list) and len(values) == count and all(_finite(v) for v in values)):
            raise refuse(f'lists {key} {_short(values)}; expected {count} finite number(s), one per epoch')
    blockwise_error = report.get('output_error_blockwise')
    if not (blockwise_error is None or _finite(blockwise_error)):
        raise refuse(f'lists output_error_blockwise {blockwise_error!r}; expected a finite number')
    before = report.get('block_error_before')
    if not (isinstance(before, list) and all(_finite(v) for v in before)):
        raise refuse(f'lists block_error_before {_short(before)}; expected finite numbers')
    if not (report.get('output_error_before') is None or _finite(report.get('output_error_before'))):
        raise refuse(f'lists output_error_before {report.get("output_error_before")!r}; expected a finite number')


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tensors(value: Any, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts / lists / tuples, with a dotted name."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f'{prefix}.{k}')
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f'{prefix}.{i}')


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _normalise(value: Any) -> Any:
    """Tuples -> lists, recursively, so a fingerprint compares equal after a save/load round trip."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value
