"""Calibration options (`CalibrationConfig`), the report of a run (`CalibrationReport`) and the memory estimate."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from ..errors import ReduceError

__all__ = ['CalibrationConfig', 'CalibrationReport', 'calibration_report', 'estimate_memory', 'REPORT_ATTR']

REPORT_ATTR = '_timm_reduce_calibration'


@dataclass
class CalibrationConfig:
    """Options of the calibration loop (all keyword options of `compress`/`calibrate` that are not strategy options).

    Attributes:
        epochs: passes over the calibration batches (>= 1). The paper's FiPS recipe uses 20.
        batches: how many batches of `data` form the calibration set (>= 1); None takes all of `data`.
        lr: peak AdamW learning rate (> 0). 1e-3 gave the lowest output error of 1e-4 / 3e-4 / 1e-3 / 3e-3 on the
            CIFAR-10 benchmark ViT (bench/results/compress_lr_pilot.json).
        weight_decay: AdamW decoupled weight decay (>= 0), applied to matrices only (not to biases / vectors).
        warmup_steps: linear warmup steps before the per-step cosine decay (>= 0).
        min_lr_ratio: the cosine ends at `lr * min_lr_ratio` (in [0, 1]).
        seed: seeds the batch order and any randomness of the strategy's hooks (the caller's RNG is untouched).
        shuffle: visit the calibration batches in a new seeded order every epoch.
        cache: `'none'` recomputes teacher activations every step (least memory); `'bf16'` / `'fp32'` store every
            block's teacher input and output once (no teacher forward per step; see the memory formula).
        checkpoint_dir: write a checkpoint after every epoch there and resume from it when it exists.
        stop_after: end this call once this many epochs (counted from the start of the run) are complete; the
            LR and sparsity schedules still span `epochs`. Resume later with the same `checkpoint_dir`.
        progress: show tqdm progress bars (rank 0 only).
        callback: called as `callback(report)` after every epoch (after its checkpoint is written).
        count_flops: count the FLOPs of one step (torch FlopCounterMode) into `report.step_flops`.
        evaluate: measure the per-block and output errors before and after (two extra passes over the batches).
    """

    epochs: int = 20
    batches: int | None = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    seed: int = 0
    shuffle: bool = True
    cache: Literal['none', 'bf16', 'fp32'] = 'none'
    checkpoint_dir: str | os.PathLike | None = None
    stop_after: int | None = None
    progress: bool = False
    callback: Callable[['CalibrationReport'], Any] | None = None
    count_flops: bool = False
    evaluate: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ReduceError(f'calibration: {what}.')

        need(_is_int(self.epochs) and self.epochs >= 1, f'epochs must be an integer >= 1, got {self.epochs!r}')
        need(self.batches is None or (_is_int(self.batches) and self.batches >= 1),
             f'batches must be an integer >= 1 or None (all of data), got {self.batches!r}')
        need(_is_num(self.lr) and math.isfinite(self.lr) and self.lr > 0, f'lr must be a number > 0, got {self.lr!r}')
        need(_is_num(self.weight_decay) and self.weight_decay >= 0,
             f'weight_decay must be a number >= 0, got {self.weight_decay!r}')
        need(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f'warmup_steps must be an integer >= 0, got {self.warmup_steps!r}')
        need(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
             f'min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}')
        need(_is_int(self.seed), f'seed must be an integer, got {self.seed!r}')
        need(self.cache in ('none', 'bf16', 'fp32'), f"cache must be 'none', 'bf16' or 'fp32', got {self.cache!r}")
        need(self.stop_after is None or (_is_int(self.stop_after) and self.stop_after >= 1),
             f'stop_after must be an integer >= 1 or None, got {self.stop_after!r}')
        need(self.callback is None or callable(self.callback), 'callback must be callable')

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return {k: getattr(self, k) for k in ('epochs', 'batches', 'lr', 'weight_decay', 'warmup_steps',
                                               'min_lr_ratio', 'seed', 'shuffle')}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class CalibrationReport:
    """What a calibration did. Errors are mean squared errors over the calibration set.

    Attributes:
        blocks: block paths, in model order.
        block_error_before / block_error_after: per block, MSE between the student block (fed the teacher's
            input) and the teacher block's output, before and after calibration. "Before" is the model as
            `reduce()` left it: for FiPS with GMP that is the start sparsity s0, not the final one.
        output_error_before / output_error_after: MSE between the student's and the teacher's model outputs.
        epoch_loss: per epoch, the mean over steps of the summed block MSE (averaged over ranks).
        epoch_time: seconds per epoch (this process).
        step_flops: FLOPs of one step on this rank (when `count_flops`), else None.
    """

    blocks: list[str] = field(default_factory=list)
    epochs: int = 0
    epochs_done: int = 0
    steps_per_epoch: int = 0
    batches: int = 0
    images: int = 0
    world_size: int = 1
    trainable_params: int = 0
    cache: str = 'none'
    resumed_from: int = 0
    completed: bool = False
    epoch_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    block_error_before: list[float] = field(default_factory=list)
    block_error_after: list[float] = field(default_factory=list)
    output_error_before: float | None = None
    output_error_after: float | None = None
    memory_estimate: dict[str, int] = field(default_factory=dict)
    step_flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A readable summary: per-epoch loss and per-block error before -> after."""
        lines = [f'calibration: {self.epochs_done}/{self.epochs} epochs x {self.steps_per_epoch} steps, '
                 f'{self.images} images, {self.world_size} process(es), {self.trainable_params:,} trainable params, '
                 f'cache={self.cache}' + (f', resumed after epoch {self.resumed_from}' if self.resumed_from else '')]
        if self.epoch_loss:
            lines.append('epoch loss     ' + ' '.join(f'{v:.4g}' for v in self.epoch_loss))
        if self.epoch_time:
            lines.append(f'time per epoch {sum(self.epoch_time) / len(self.epoch_time):.2f} s')
        if self.block_error_after:
            lines.append(f"{'block':<22} {'MSE before':>12} {'MSE after':>12} {'ratio':>8}")
            for path, b, a in zip(self.blocks, self.block_error_before, self.block_error_after):
                lines.append(f'{path:<22} {b:>12.4g} {a:>12.4g} {a / b if b > 0 else float("nan"):>8.3f}')
        if self.output_error_after is not None:
            lines.append(f'output MSE     {self.output_error_before:.4g} -> {self.output_error_after:.4g}')
        if self.memory_estimate:
            lines.append(f"memory (est.)  {self.memory_estimate['total'] / 2 ** 20:.1f} MiB")
        return '\n'.join(lines)


def calibration_report(model: nn.Module) -> CalibrationReport | None:
    """The report of the last `compress()` of `model`, or None."""
    return model.__dict__.get(REPORT_ATTR)


def estimate_memory(
        config: CalibrationConfig,
        trainable_params: int,
        image_shape: tuple[int, ...],
        batches: int,
        block_shapes: list[tuple[int, int, int, bool]],
) -> dict[str, int]:
    """The memory formula of `timm_reduce.calibration.engine`'s docstring, in bytes.

    Args:
        config: the calibration options (`cache` matters).
        trainable_params: P, the trainable parameters.
        image_shape: one batch's shape (B, C, H, W).
        batches: calibration batches held by this process.
        block_shapes: per block (B * T_i, d_i, h_i, chained_i): rows of the token matrix, width, MLP hidden width,
            and whether the block's input is the previous block's output (then the cache stores it once).
    """
    images = 4 * batches * math.prod(image_shape)
    optimizer = 12 * trainable_params
    size = {'none': 0, 'bf16': 2, 'fp32': 4}[config.cache]
    cache = sum(size * batches * rows * d * (1 if chained else 2) for rows, d, _, chained in block_shapes)
    activations = 4 * max((rows * (4 * h + 8 * d) for rows, d, h, _ in block_shapes), default=0)
    return {'images': images, 'optimizer': optimizer, 'cache': cache, 'activations': activations,
            'total': images + optimizer + cache + activations}


