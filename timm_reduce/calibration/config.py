"""Calibration options (`CalibrationConfig`), the report of a run (`CalibrationReport`) and the memory estimate."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

from ..errors import ReduceError

__all__ = ['CalibrationConfig', 'CalibrationReport', 'RECIPES', 'calibration_report', 'choose_cache', 'estimate_memory',
           'recipe_defaults', 'REPORT_ATTR']

REPORT_ATTR = '_timm_reduce_calibration'


@dataclass
class CalibrationConfig:
    """Options of the calibration loop (all keyword options of `compress`/`calibrate` that are not strategy options).

    Attributes:
        epochs: passes over the calibration batches (>= 1). The paper's FiPS recipe uses 20.
        batches: how many batches of `data` form the calibration set (>= 1); None takes all of `data`.
        lr: peak AdamW learning rate, in (0, 1]. 1e-3 gave the lowest output error of 1e-4 / 3e-4 / 1e-3 / 3e-3 on the
            CIFAR-10 benchmark ViT (bench/results/compress_lr_pilot.json).
        weight_decay: AdamW decoupled weight decay (>= 0), applied to matrices only (not to biases / vectors).
        warmup_steps: linear warmup steps before the per-step cosine decay (>= 0).
        min_lr_ratio: the cosine ends at `lr * min_lr_ratio` (in [0, 1]).
        seed: seeds the batch order and any randomness of the strategy's hooks (the caller's RNG is untouched).
        shuffle: visit the calibration batches in a new seeded order every epoch.
        cache: `'none'` recomputes teacher activations every step (least memory); `'bf16'` / `'fp32'` store every
            block's teacher input and output once (no teacher forward per step; see the memory formula). `'fp32'`
            gives the same weights as `'none'` (bit for bit without `amp`); `'bf16'` rounds the targets. `'auto'`
            (default): `'fp32'` when its estimated size (`estimate_memory`) fits `cache_limit_gb`, else `'bf16'`
            when that fits, else `'none'`; the report says which and why.
        cache_limit_gb: the most memory (GiB, per process, on the model's device) `cache='auto'` may spend on the
            cache (> 0).
        checkpoint_dir: write a checkpoint after every epoch there and resume from it when it exists.
        resume: what to do with the checkpoint in `checkpoint_dir` (see docs/calibration.md). `'auto'` (default):
            resume from it when it exists and passes every check (checksum, fingerprint of the run, ranges, finite
            values), start afresh when there is none, and refuse (ReduceError) one that fails a check: it is never
            silently ignored or overwritten. `'must'`: the same, but a missing checkpoint is an error too (a job
            restart that must continue). `'restart'`: do not read it; start from epoch 0 (the first completed epoch
            replaces it). `'must'` and `'restart'` need `checkpoint_dir`.
        stop_after: end this call once this many epochs (counted from the start of the run) are complete; the
            LR and sparsity schedules still span `epochs`. Resume later with the same `checkpoint_dir`.
        progress: show tqdm progress bars (rank 0 only).
        callback: called as `callback(report)` after every epoch (after its checkpoint is written).
        count_flops: count the FLOPs of one step (torch FlopCounterMode) into `report.step_flops`.
        evaluate: measure the per-block and output errors before and after (two extra passes over
            `eval_batches` batches).
        eval_batches: how many calibration batches (all processes together, rounded up to a multiple of the
            process count) the before/after errors are measured on: the first ones (>= 1); None: all of them.
        amp: mixed precision: `'bf16'` or `'fp16'` runs the teacher and student forwards of the training steps
            under `torch.autocast` on the model's device (the error measurements stay in float32); parameters,
            gradients, optimizer state and the loss stay float32. `'fp16'` scales the loss (a GradScaler):
            gradients are unscaled before the strategy hooks (FiPS masks, RigL's dense gradient), and a batch
            whose scaled gradients overflow is redone at a lower scale instead of skipped (calibration has few
            steps). `'bf16'` needs no scaling and is the safer choice on GPUs that have it.
            None (default): no autocast. Needs float32 parameters.
        distill_epochs: epochs of output-level distillation after the block-wise epochs (>= 0; 0: none; None,
            the default: `epochs // 2`, i.e. 10 after the default 20; by measurement, docs/evidence.md §9: on the
            second benchmark model it cut FiPS's loss at 5% from 5.05 to 2.01 points, 2 seeds). The
            same parameters train (the MLPs, each shared tensor once) on the same images, end to end through the
            frozen rest of the model, to match the teacher's output: `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`
            (batch mean) for a model with a classifier, the MSE of the outputs for one without (num_classes=0).
            A fresh AdamW (`distill_lr`, `weight_decay`) with a per-step cosine to `min_lr_ratio` (no warmup); the
            strategy hooks keep running with the schedule over (FiPS: masks fixed at the final sparsity). The
            distillation epochs are further epochs of the run (`stop_after`, checkpoints, `callback`).
        distill_lr: peak learning rate of the distillation, in (0, 1]; None: `lr`.
        distill_temperature: the softmax temperature T of the distillation loss (> 0).
        distill_ce_weight: weight of a cross-entropy on the data's targets added to the distillation loss (>= 0;
            0: labels are not used). > 0 needs `distill_epochs` >= 1 and (images, targets) batches of class indices.
        inputs: what each block is fed while it is fitted. `'teacher'` (the paper): the teacher block's input, so
            every block is fitted independently. `'student'`: the student's own previous block's output (detached),
            so a block learns to correct the errors of the reduced blocks before it. `'mix'` (default): their mean,
            which was as good as `'teacher'` or better on every method of bench/compress_ablation.py (mean of 2
            seeds: FiPS 5/10% +0.33/+0.23 points, ShallowMLP 5/10% +0.60/+0.04, grouped pairs +0.04), while
            `'student'` lost 0.37 points on grouped pairs. Only where a block's input is the previous
            block's output (in a plain stack of blocks; after a Swin downsample the teacher's input is used). The
            before/after errors always use teacher inputs.
        init_from: how `compress()` initialises the reduced MLPs before calibration. `'activations'` (default): the
            strategies that can (fips: shared basis and factors; shallow: unit importance; grouped: the mean
            weighted by activations) use activation
            statistics measured by one forward pass of the model over the calibration batches (see
            `collect_statistics`); others start from the weights as always. `'weights'` (the paper): from the
            weights alone. Only `compress()` reduces, so `calibrate()` does not take it.
        recipe: a named set of option defaults, applied before validation by `compress()` / `calibrate()`;
            options given explicitly win. `'default'`: the library's defaults (its best measured settings).
            `'paper'`: the FiPS paper's recipe (`RECIPES['paper']`: 20 epochs of 30 batches, AdamW weight
            decay 0.05, no distillation, before/after errors on every batch; FiPS: GMP, delta_t=50, t0=0,
            t_end=0.75, s0=0.25, RigL drop_fraction 0.3, hybrid growth, beta 32, global pruning, no scaling
            vectors; the initialisation from the weights alone and the teacher's block inputs are what the library
            does today).
    """

    epochs: int = 20
    batches: int | None = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    seed: int = 0
    shuffle: bool = True
    cache: Literal['auto', 'none', 'bf16', 'fp32'] = 'auto'
    cache_limit_gb: float = 4.0
    checkpoint_dir: str | os.PathLike | None = None
    resume: Literal['auto', 'must', 'restart'] = 'auto'
    stop_after: int | None = None
    progress: bool = False
    callback: Callable[['CalibrationReport'], Any] | None = None
    count_flops: bool = False
    evaluate: bool = True
    eval_batches: int | None = 4
    amp: Literal['bf16', 'fp16'] | None = None
    distill_epochs: int | None = None
    distill_lr: float | None = None
    distill_temperature: float = 1.0
    distill_ce_weight: float = 0.0
    inputs: Literal['teacher', 'student', 'mix'] = 'mix'
    init_from: Literal['weights', 'activations'] = 'activations'
    recipe: Literal['default', 'paper'] = 'default'

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ReduceError(f'calibration: {what}.')

        need(_is_int(self.epochs) and self.epochs >= 1, f'epochs must be an integer >= 1, got {self.epochs!r}')
        need(self.batches is None or (_is_int(self.batches) and self.batches >= 1),
             f'batches must be an integer >= 1 or None (all of data), got {self.batches!r}')
        need(_is_num(self.lr) and 0 < self.lr <= 1, f'lr must be a number > 0 and at most 1 (AdamW), got {self.lr!r}')
        need(_is_num(self.weight_decay) and self.weight_decay >= 0,
             f'weight_decay must be a number >= 0, got {self.weight_decay!r}')
        need(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f'warmup_steps must be an integer >= 0, got {self.warmup_steps!r}')
        need(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
             f'min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}')
        need(_is_int(self.seed), f'seed must be an integer, got {self.seed!r}')
        need(self.cache in ('auto', 'none', 'bf16', 'fp32'),
             f"cache must be 'none', 'bf16' or 'fp32' (or 'auto': the most exact that fits cache_limit_gb), "
             f'got {self.cache!r}')
        need(_is_num(self.cache_limit_gb) and math.isfinite(self.cache_limit_gb) and self.cache_limit_gb > 0,
             f'cache_limit_gb must be a number of GiB > 0, got {self.cache_limit_gb!r}')
        need(self.eval_batches is None or (_is_int(self.eval_batches) and self.eval_batches >= 1),
             f'eval_batches must be an integer >= 1 or None (all batches), got {self.eval_batches!r}')
        need(self.distill_epochs is None or (_is_int(self.distill_epochs) and self.distill_epochs >= 0),
             f'distill_epochs must be an integer >= 0 (0: no distillation) or None (half of epochs), '
             f'got {self.distill_epochs!r}')
        if self.distill_epochs is None:
            self.distill_epochs = self.epochs // 2
        need(self.distill_lr is None or (_is_num(self.distill_lr) and 0 < self.distill_lr <= 1),
             f'distill_lr must be a number > 0 and at most 1, or None (= lr), got {self.distill_lr!r}')
        need(_is_num(self.distill_temperature) and math.isfinite(self.distill_temperature)
             and self.distill_temperature > 0,
             f'distill_temperature must be a number > 0, got {self.distill_temperature!r}')
        need(_is_num(self.distill_ce_weight) and math.isfinite(self.distill_ce_weight) and self.distill_ce_weight >= 0,
             f'distill_ce_weight must be a number >= 0 (0: no labels), got {self.distill_ce_weight!r}')
        need(self.distill_ce_weight == 0 or self.distill_epochs >= 1,
             f'distill_ce_weight={self.distill_ce_weight!r} needs distill_epochs >= 1 (the cross-entropy is a term '
             f'of the distillation loss)')
        need(self.inputs in ('teacher', 'student', 'mix'),
             f"inputs must be 'teacher', 'student' or 'mix', got {self.inputs!r}")
        need(self.init_from in ('weights', 'activations'),
             f"init_from must be 'weights' (from the weights alone) or 'activations' (from activation statistics "
             f"of the calibration images), got {self.init_from!r}")
        need(self.recipe in RECIPES, f'recipe must be one of {", ".join(map(repr, RECIPES))}, got {self.recipe!r}')
        need(self.stop_after is None or (_is_int(self.stop_after) and self.stop_after >= 1),
             f'stop_after must be an integer >= 1 or None, got {self.stop_after!r}')
        need(self.callback is None or callable(self.callback), 'callback must be callable')
        need(self.resume in ('auto', 'must', 'restart'),
             f"resume must be 'auto', 'must' or 'restart', got {self.resume!r}")
        need(self.resume == 'auto' or self.checkpoint_dir is not None,
             f'resume={self.resume!r} needs checkpoint_dir (the folder of the checkpoint to resume or restart)')
        need(self.amp in (None, 'bf16', 'fp16'), f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint (the engine replaces
        `cache` by the mode it resolved; the distillation options appear only when `distill_epochs` > 0, so a run
        without distillation keeps the fingerprint it had before they existed)."""
        out = {k: getattr(self, k) for k in ('epochs', 'batches', 'lr', 'weight_decay', 'warmup_steps',
                                             'min_lr_ratio', 'seed', 'shuffle', 'cache', 'amp', 'inputs')}
        if self.distill_epochs:
            out.update(distill_epochs=self.distill_epochs, distill_lr=self.distill_peak_lr,
                       distill_temperature=self.distill_temperature, distill_ce_weight=self.distill_ce_weight)
        return out

    @property
    def distill_peak_lr(self) -> float:
        return self.lr if self.distill_lr is None else self.distill_lr

    @property
    def total_epochs(self) -> int:
        """Block-wise plus distillation epochs."""
        return self.epochs + self.distill_epochs


# Named option sets (`recipe=`): calibration options here; the strategy-side part is the strategy config's own
# `RECIPES` class attribute (e.g. `FipsConfig.RECIPES['paper']`), which `compress()` applies to its options. Options
# given explicitly always win. Add an option to 'paper' whenever the library's default moves away from the paper.
RECIPES: dict[str, dict[str, Any]] = {
    'default': {},
    'paper': {'epochs': 20, 'batches': 30, 'weight_decay': 0.05, 'distill_epochs': 0, 'eval_batches': None,
              'inputs': 'teacher', 'init_from': 'weights'},
}


def recipe_defaults(recipe: Any) -> dict[str, Any]:
    """The calibration option defaults of `recipe` (a ReduceError listing the recipes for an unknown one)."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ReduceError(f'calibration: recipe must be one of {", ".join(map(repr, RECIPES))}, got {recipe!r}.')
    return dict(RECIPES[recipe])


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
        output_error_blockwise: the same after the block-wise epochs, before distillation (with distill_epochs).
        eval_batches: how many calibration batches (all processes) the errors were measured on.
        epoch_loss: per block-wise epoch, the mean over steps of the summed block MSE (averaged over ranks).
        distill_loss: per distillation epoch, the mean over steps of the distillation loss (averaged over ranks).
        epoch_time: seconds per epoch, block-wise and distillation epochs in order (this process).
        cache / cache_reason: the cache mode used and why (`cache='auto'` chooses by `cache_limit_gb`).
        init_from: `'activations'` when `compress()` initialised the reduced MLPs from activation statistics (taking
            `statistics_time` seconds, the sensitivity pass included), else `'weights'`.
        allocated: the options the strategy derived from the measured sensitivities (`allocation='sensitivity'`:
            fips `ranks`, shallow `keep`), as recorded in the model's spec; empty otherwise.
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
    cache_reason: str = ''
    amp: str | None = None
    recipe: str = 'default'
    inputs: str = 'teacher'
    init_from: str = 'weights'
    statistics_time: float = 0.0
    allocated: dict[str, Any] = field(default_factory=dict)
    resumed_from: int = 0
    completed: bool = False
    distill_epochs: int = 0
    distill_epochs_done: int = 0
    epoch_loss: list[float] = field(default_factory=list)
    distill_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    eval_batches: int = 0
    block_error_before: list[float] = field(default_factory=list)
    block_error_after: list[float] = field(default_factory=list)
    output_error_before: float | None = None
    output_error_blockwise: float | None = None
    output_error_after: float | None = None
    memory_estimate: dict[str, int] = field(default_factory=dict)
    step_flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A readable summary: per-epoch loss and per-block error before -> after."""
        lines = [f'calibration: {self.epochs_done}/{self.epochs} epochs x {self.steps_per_epoch} steps, '
                 f'{self.images} images, {self.world_size} process(es), {self.trainable_params:,} trainable params, '
                 f'cache={self.cache}' + (f', amp={self.amp}' if self.amp else '')
                 + (f', recipe={self.recipe}' if self.recipe != 'default' else '')
                 + (f', init from activation statistics ({self.statistics_time:.1f} s)'
                    if self.init_from == 'activations' else '')
                 + (f', resumed after epoch {self.resumed_from}' if self.resumed_from else '')]
        if self.cache_reason:
            lines.append(f'cache          {self.cache_reason}')
        if self.allocated:
            lines.append('allocation     by sensitivity (' + ', '.join(f'{k}={v}' for k, v in self.allocated.items())
                         + f'; measured in {self.statistics_time:.1f} s)')
        if self.epoch_loss:
            lines.append('epoch loss     ' + ' '.join(f'{v:.4g}' for v in self.epoch_loss))
        if self.distill_epochs:
            lines.append(f'distillation   {self.distill_epochs_done}/{self.distill_epochs} epochs, loss '
                         + ' '.join(f'{v:.4g}' for v in self.distill_loss))
        if self.epoch_time:
            lines.append(f'time per epoch {sum(self.epoch_time) / len(self.epoch_time):.2f} s')
        if self.block_error_after:
            lines.append(f'errors on {self.eval_batches} calibration batch(es); "before" is the model as reduce() left '
                         f'it (FiPS GMP: at its start sparsity); block errors with the teacher\'s block inputs'
                         + ('' if self.inputs == 'teacher' else
                            f' (fitted on inputs={self.inputs!r}: a block may trade its own error for a lower '
                            'output error)'))
            lines.append(f"{'block':<22} {'MSE before':>12} {'MSE after':>12} {'ratio':>8}")
            for path, b, a in zip(self.blocks, self.block_error_before, self.block_error_after):
                lines.append(f'{path:<22} {b:>12.4g} {a:>12.4g} {a / b if b > 0 else float("nan"):>8.3f}')
        if self.output_error_after is not None:
            middle = (f' -> {self.output_error_blockwise:.4g} (block-wise)'
                      if self.output_error_blockwise is not None else '')
            lines.append(f'output MSE     {self.output_error_before:.4g}{middle} -> {self.output_error_after:.4g}')
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
        cache: str | None = None,
) -> dict[str, int]:
    """The memory formula of `timm_reduce.calibration.engine`'s docstring, in bytes.

    Args:
        config: the calibration options (`cache`, `distill_epochs` matter).
        trainable_params: P, the trainable parameters.
        image_shape: one batch's shape (B, C, H, W).
        batches: calibration batches held by this process.
        block_shapes: per block (B * T_i, d_i, h_i, chained_i): rows of the token matrix, width, MLP hidden width,
            and whether the block's input is the previous block's output (then the cache stores it once).
        cache: the cache mode to estimate; None: `config.cache`, with `'auto'` resolved by `choose_cache`.
    """
    if cache is None:
        cache = config.cache
        if cache == 'auto':
            cache = choose_cache(config, trainable_params, image_shape, batches, block_shapes)[0]
    images = 4 * batches * math.prod(image_shape)
    optimizer = 12 * trainable_params
    size = {'none': 0, 'bf16': 2, 'fp32': 4}[cache]
    cached = sum(size * batches * rows * d * (1 if chained else 2) for rows, d, _, chained in block_shapes)
    activations = 4 * max((rows * (4 * h + 8 * d) for rows, d, h, _ in block_shapes), default=0)
    if config.distill_epochs:  # end to end: every block's graph at once (attention scores not counted)
        activations = max(activations, 4 * sum(rows * (4 * h + 16 * d) for rows, d, h, _ in block_shapes))
    return {'images': images, 'optimizer': optimizer, 'cache': cached, 'activations': activations,
            'total': images + optimizer + cached + activations}


def choose_cache(
        config: CalibrationConfig,
        trainable_params: int,
        image_shape: tuple[int, ...],
        batches: int,
        block_shapes: list[tuple[int, int, int, bool]],
) -> tuple[str, str]:
    """The cache mode a run uses and why: `config.cache` when given, else (`'auto'`) `'fp32'` when the cache term of
    `estimate_memory` fits `cache_limit_gb`, else `'bf16'` when that fits, else `'none'`."""
    if config.cache != 'auto':
        return config.cache, f'cache={config.cache!r} as given'
    limit = config.cache_limit_gb * 2 ** 30
    sizes = {mode: estimate_memory(config, trainable_params, image_shape, batches, block_shapes, mode)['cache']
             for mode in ('fp32', 'bf16')}
    cap = f'cache_limit_gb={config.cache_limit_gb:g} GiB'
    for mode, size in sizes.items():
        if size <= limit:
            fp32 = f" (fp32 would take {sizes['fp32'] / 2 ** 30:.2f} GiB)" if mode == 'bf16' else ''
            return mode, (f'auto: {mode} teacher activations take {size / 2 ** 20:.1f} MiB per process, within '
                          f'{cap}{fp32}')
    return 'none', (f"auto: the cache would take {sizes['bf16'] / 2 ** 30:.2f} GiB per process even in bf16, over "
                    f"{cap}; the teacher is recomputed every step")
