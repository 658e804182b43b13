"""Block-wise calibration: refit the reduced MLPs so that every block reproduces its teacher block.

`compress(model, strategy, data=...)` = snapshot the model as the teacher, `reduce()` it, then `calibrate()`:
for every block that owns an MLP, the student block is fed the *teacher* block's input and trained to give the
teacher block's output (local error minimisation). The loss of one step is the sum over blocks of the MSE.
Blocks that share parameters (a grouped MLP, a FiPS basis) are optimised jointly: one AdamW over all trainable
parameters, one step per batch after the gradients of every block have been accumulated.

Trainable: the parameters of the blocks' MLP modules (`block.mlp`: weights, biases, FiPS bases and factors,
hidden-sized norms), each shared tensor once. Everything else (attention, norms outside the MLP, embeddings,
head) is frozen and equals the teacher's.

Memory (bytes, fp32 model; `N` calibration batches held by this rank, batch `B`, block `i` with `T_i` tokens,
width `d_i` and MLP hidden width `h_i`, `P` trainable parameters, `s` = 2 for `cache='bf16'`, 4 for `'fp32'`)::

    images      4 * N * B * C * H * W                      (the calibration batches, held once)
    optimizer   12 * P                                     (gradients + AdamW's two moments)
    cache       sum_i c_i * s * N * B * T_i * d_i          (only with cache='bf16' | 'fp32'; c_i = 1 when block i's
                                                             input is block i-1's output, else 2 (input + output))
    activations 4 * B * max_i T_i * (4 * h_i + 8 * d_i)    (one block at a time: teacher inputs are consumed
                                                             as the teacher forward produces them, and each
                                                             student block's graph is freed by its backward)

plus the attention's transient score matrices of one block, and, in `compress()`, a teacher copy of the model
(4 bytes per parameter). With `cache='none'` (default) the teacher forward is recomputed every step: memory is
independent of the number of blocks and batches, at the price of one extra teacher forward per step (~1/3 of a
step's compute). `estimate_memory()` evaluates the formula; the report carries it.

Distributed: when `torch.distributed` is initialised, rank `r` of `W` takes batches `r, r + W, ...` (the first
`W * (N // W)` batches), gradients are averaged with one all-reduce per step, and after every epoch the masks of
the calibration hooks and the trainable weights are compared across ranks (a hash, all-gathered): a difference
raises. Only rank 0 writes checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .api import as_spec, reduce
from .discovery import MlpSite, find_mlp_sites
from .errors import ReduceError
from .hooks import RecipeHooks, recipe_hooks
from .registry import get_strategy
from .sharing import unique_tensors
from .spec import ReduceSpec

__all__ = ['CalibrationConfig', 'CalibrationReport', 'calibrate', 'compress', 'calibration_report', 'estimate_memory']

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = 'calibration.pt'
_REPORT_ATTR = '_timm_reduce_calibration'


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
    return model.__dict__.get(_REPORT_ATTR)


def estimate_memory(
        config: CalibrationConfig,
        trainable_params: int,
        image_shape: tuple[int, ...],
        batches: int,
        block_shapes: list[tuple[int, int, int, bool]],
) -> dict[str, int]:
    """The module docstring's memory formula, in bytes.

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


_PREVIOUS = object()  # cache marker: this block's input is the previous block's output


class _StopForward(Exception):
    """Raised from the last block's hook: the rest of the teacher forward is not needed."""


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


def _collect_batches(data: Iterable, limit: int | None, rank: int, world: int) -> tuple[list[torch.Tensor], int]:
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


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _tensor_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], 'little', signed=True)


def _check_identical(what: str, value: int) -> None:
    """Raise when the ranks disagree on `value` (a hash)."""
    world = torch.distributed.get_world_size()
    mine = torch.tensor([value], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(everyone, mine)
    values = [int(t) for t in everyone]
    if len(set(values)) != 1:
        raise ReduceError(f'distributed calibration: the {what} differ between ranks (hashes {values}); every rank '
                          f'must apply the same updates. Check that all ranks build the same model and options.')


class _Engine:
    """The state of one calibration run: student/teacher blocks, held batches, optimizer, schedule, hooks."""

    def __init__(self, model: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], config: CalibrationConfig,
                 hooks: RecipeHooks, rank: int, world: int) -> None:
        self.model, self.teacher, self.batches, self.config = model, teacher, batches, config
        self.hooks, self.rank, self.world = hooks, rank, world
        sites = find_mlp_sites(model)
        teacher_sites = find_mlp_sites(teacher)
        if [s.path for s in sites] != [s.path for s in teacher_sites]:
            raise ReduceError('calibration: the teacher does not have the same blocks as the model '
                              f'({len(teacher_sites)} vs {len(sites)} MLP blocks); pass the model as it was '
                              'before reduce().')
        self.sites: list[MlpSite] = sites
        self.teacher_blocks = [s.block for s in teacher_sites]
        self.params = unique_tensors(p for s in sites for p in s.mlp.parameters())
        if not self.params:
            raise ReduceError('calibration: the model\'s MLPs have no parameters to train.')
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.cache: list[list[tuple]] | None = None
        self.block_shapes: list[tuple[int, int, int, bool]] = []

    # ----------------------------------------------------------------------------------------------- modes
    def set_modes(self) -> None:
        """Student: eval everywhere (frozen parts), MLPs in train mode but without dropout / drop path."""
        self.model.eval()
        self.teacher.eval()
        for site in self.sites:
            site.mlp.train()
            for m in site.mlp.modules():
                if isinstance(m, nn.Dropout) or type(m).__name__ == 'DropPath':
                    m.eval()

    # ------------------------------------------------------------------------------------ teacher activations
    def teacher_blocks_io(self, images: torch.Tensor, visit: Callable[[int, tuple, dict, torch.Tensor], None]) -> None:
        """Run the teacher on `images`, calling `visit(i, args, kwargs, output)` as each block finishes."""
        last = len(self.teacher_blocks) - 1

        def make(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                visit(i, args, kwargs, output)
                if i == last:
                    raise _StopForward
            return hook

        handles = [b.register_forward_hook(make(i), with_kwargs=True) for i, b in enumerate(self.teacher_blocks)]
        try:
            with torch.no_grad():
                self.teacher(images.to(self.device, self.dtype))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    def build_cache(self) -> None:
        """Store every block's teacher input and output for every local batch in the cache dtype.

        A block whose input is the previous block's output (a plain sequence of blocks) stores no input of its own.
        """
        dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[self.config.cache]
        self.cache = []
        for images in self.batches:
            entries: list[tuple] = []
            previous: list[Any] = [None]

            def visit(i: int, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
                first = args[0]
                if previous[0] is not None and first is previous[0]:
                    first = _PREVIOUS
                elif isinstance(first, torch.Tensor) and first.is_floating_point():
                    first = first.to(dtype, copy=True)
                entries.append(((first, *args[1:]), kwargs, out.to(dtype, copy=True)))
                previous[0] = out

            self.teacher_blocks_io(images, visit)
            self.cache.append(entries)

    def for_each_block(self, index: int, fn: Callable[[int, tuple, dict, torch.Tensor], None]) -> None:
        """Call `fn(block, args, kwargs, teacher_output)` for every block of local batch `index`."""
        if self.cache is None:
            self.teacher_blocks_io(self.batches[index], fn)
            return
        entries = self.cache[index]
        for i, (args, kwargs, out) in enumerate(entries):
            first = entries[i - 1][2] if args[0] is _PREVIOUS else args[0]
            if isinstance(first, torch.Tensor):
                first = first.to(self.dtype)
            fn(i, (first, *args[1:]), kwargs, out.to(self.dtype))

    def record_shapes(self) -> None:
        """Per block (rows, width, hidden width, input is the previous block's output), from one teacher forward."""
        shapes: list[tuple[int, int, int, bool]] = []
        previous: list[Any] = [None]

        def visit(i: int, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
            mlp = self.sites[i].mlp
            chained = previous[0] is not None and args[0] is previous[0]
            shapes.append((out.numel() // out.shape[-1], out.shape[-1], mlp.fc2.in_features, chained))
            previous[0] = out

        self.teacher_blocks_io(self.batches[0], visit)
        self.block_shapes = shapes

    # ----------------------------------------------------------------------------------------------- steps
    def step_loss(self, index: int) -> float:
        """Forward + backward of every block for local batch `index`; gradients accumulate. Returns the loss."""
        total = 0.0

        def visit(i: int, args: tuple, kwargs: dict, target: torch.Tensor) -> None:
            nonlocal total
            with torch.enable_grad():
                out = self.sites[i].block(*args, **kwargs)
                loss = F.mse_loss(out.float(), target.float())
                loss.backward()
            total += loss.item()

        self.for_each_block(index, visit)
        return total

    def all_reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    @torch.no_grad()
    def evaluate(self) -> tuple[list[float], float]:
        """Per-block MSE (student block on teacher input) and model-output MSE, averaged over all batches/ranks."""
        sums = torch.zeros(len(self.sites) + 1, dtype=torch.float64)

        def visit(i: int, args: tuple, kwargs: dict, target: torch.Tensor) -> None:
            out = self.sites[i].block(*args, **kwargs)
            sums[i] += F.mse_loss(out.float(), target.float()).item()

        for index, images in enumerate(self.batches):
            self.for_each_block(index, visit)
            images = images.to(self.device, self.dtype)
            sums[-1] += F.mse_loss(self.model(images).float(), self.teacher(images).float()).item()
        sums /= len(self.batches)
        if self.world > 1:
            torch.distributed.all_reduce(sums)
            sums /= self.world
        values = sums.tolist()
        return values[:-1], values[-1]


def _lr_lambda(config: CalibrationConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        span = max(1, total_steps - config.warmup_steps)
        t = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def _make_optimizer(params: list[torch.Tensor], config: CalibrationConfig) -> torch.optim.AdamW:
    if config.weight_decay > 0:
        groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': config.weight_decay},
                  {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
        groups = [g for g in groups if g['params']]
    else:
        groups = [{'params': params, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, foreach=False)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def calibrate(
        model: nn.Module,
        teacher: nn.Module,
        data: Iterable,
        config: CalibrationConfig | None = None,
        *,
        hooks: Any = 'auto',
        **options: Any,
) -> CalibrationReport:
    """Refit the MLPs of a reduced `model` block by block against `teacher` (the model before reduction).

    Args:
        model: the reduced model, changed in place; its training/eval mode is restored at the end.
        teacher: the model as it was before `reduce()` (same blocks); only read.
        data: an iterable of image batches or (images, targets) tuples, e.g. a DataLoader; the first
            `batches` batches are read once and held in memory.
        config: a CalibrationConfig; or give its fields as keyword `options`.
        hooks: per-step hooks (`setup`, `after_backward`, `after_step`, `state_dict`, `load_state_dict`, `masks`);
            `'auto'` builds them from the model's reduction recipe (e.g. FiPS sparsity), None disables them.

    Returns:
        A CalibrationReport (loss per epoch, per-block error before/after, timing, memory estimate).

    Raises:
        ReduceError: no or malformed data, an invalid option, or a checkpoint from a different run.
    """
    if config is None:
        unknown = sorted(set(options) - set(CalibrationConfig.option_names()))
        if unknown:
            raise ReduceError(f'Unknown calibration option(s) {", ".join(unknown)}; allowed: '
                              f'{", ".join(CalibrationConfig.option_names())}.')
        config = CalibrationConfig(**options)
    elif options:
        raise ReduceError('Pass calibration options either as a CalibrationConfig or as keywords, not both.')
    rank, world = _dist()
    batches, total_batches = _collect_batches(data, config.batches, rank, world)
    if hooks == 'auto':
        hooks = recipe_hooks(model)
    elif hooks is None:
        hooks = RecipeHooks([])
    elif not isinstance(hooks, RecipeHooks):
        hooks = RecipeHooks([hooks])

    engine = _Engine(model, teacher, batches, config, hooks, rank, world)
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in engine.params:
        p.requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _run(engine, total_batches)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)


def _run(engine: _Engine, total_batches: int) -> CalibrationReport:
    config, model, rank, world = engine.config, engine.model, engine.rank, engine.world
    if world > 1:
        for p in engine.params:  # identical starting point on every rank
            torch.distributed.broadcast(p.data, src=0)
    engine.set_modes()
    steps = len(engine.batches)
    total_steps = config.epochs * steps
    optimizer = _make_optimizer(engine.params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
    engine.hooks.setup(model, optimizer, total_steps)
    engine.record_shapes()

    report = CalibrationReport(
        blocks=[s.path for s in engine.sites], epochs=config.epochs, steps_per_epoch=steps, batches=total_batches,
        images=sum(b.shape[0] for b in engine.batches) * world, world_size=world,
        trainable_params=sum(p.numel() for p in engine.params), cache=config.cache,
        memory_estimate=estimate_memory(config, sum(p.numel() for p in engine.params),
                                        tuple(engine.batches[0].shape), steps, engine.block_shapes))
    fingerprint = {**config.fingerprint(), 'world_size': world, 'steps_per_epoch': steps,
                   'params': [tuple(p.shape) for p in engine.params], 'blocks': report.blocks}
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir is not None else None
    start = 0
    if ckpt_path is not None and ckpt_path.is_file():
        start = _resume(ckpt_path, fingerprint, engine, optimizer, scheduler, report)
    if config.cache != 'none':
        engine.build_cache()
    if start == 0 and config.evaluate:
        report.block_error_before, report.output_error_before = engine.evaluate()

    from tqdm.auto import tqdm

    show = config.progress and rank == 0
    epochs_bar = tqdm(range(start, config.epochs), desc='calibrate', unit='epoch', disable=not show,
                      initial=start, total=config.epochs)
    for epoch in epochs_bar:
        if config.stop_after is not None and epoch >= config.stop_after:
            break
        tic = time.perf_counter()
        order = list(range(steps))
        if config.shuffle:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(steps, generator=gen).tolist()
        loss_sum = 0.0
        for k, index in enumerate(tqdm(order, desc=f'epoch {epoch + 1}', unit='batch', leave=False,
                                       disable=not show)):
            step = epoch * steps + k
            optimizer.zero_grad(set_to_none=True)
            if config.count_flops and report.step_flops is None:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    loss_sum += engine.step_loss(index)
                report.step_flops = int(counter.get_total_flops())
            else:
                loss_sum += engine.step_loss(index)
            if world > 1:
                engine.all_reduce_grads()
            engine.hooks.after_backward(step)
            optimizer.step()
            scheduler.step()
            engine.hooks.after_step(step)
        loss = torch.tensor([loss_sum / steps], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
            _check_identical('sparsity masks', _tensor_hash(sorted(engine.hooks.masks().items())))
            _check_identical('trainable weights', _tensor_hash((str(i), p) for i, p in enumerate(engine.params)))
        report.epoch_loss.append(float(loss))
        report.epoch_time.append(time.perf_counter() - tic)
        report.epochs_done = epoch + 1
        epochs_bar.set_postfix(loss=f'{float(loss):.4g}')
        _logger.info(f'calibration epoch {epoch + 1}/{config.epochs}: loss {float(loss):.6g} '
                     f'({report.epoch_time[-1]:.1f} s)')
        if ckpt_path is not None:
            if rank == 0:
                _atomic_save({'fingerprint': fingerprint, 'epoch': epoch + 1, 'model': model.state_dict(),
                              'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                              'hooks': engine.hooks.state_dict(), 'rng': torch.get_rng_state(),
                              'report': report.to_dict()}, ckpt_path)
            if world > 1:
                torch.distributed.barrier()
        if config.callback is not None:
            config.callback(report)
    epochs_bar.close()
    report.completed = report.epochs_done == config.epochs
    if config.evaluate:
        report.block_error_after, report.output_error_after = engine.evaluate()
    return report


def _resume(path: Path, fingerprint: dict, engine: _Engine, optimizer: torch.optim.Optimizer,
            scheduler: Any, report: CalibrationReport) -> int:
    """Load the last per-epoch checkpoint; returns the number of completed epochs."""
    try:
        state = torch.load(path, map_location=engine.device, weights_only=True)
    except Exception as e:
        raise ReduceError(f'calibration: cannot read checkpoint {path}: {e}') from e
    saved = state.get('fingerprint', {})
    diff = {k: (saved.get(k), v) for k, v in _normalise(fingerprint).items() if _normalise(saved).get(k) != v}
    if diff:
        details = ', '.join(f'{k}: checkpoint {a!r} vs now {b!r}' for k, (a, b) in diff.items())
        raise ReduceError(f'calibration: checkpoint {path} is from a different run ({details}). Use the same options '
                          f'to resume, or another checkpoint_dir to start afresh.')
    engine.model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    scheduler.load_state_dict(state['scheduler'])
    engine.hooks.load_state_dict(state['hooks'])
    torch.set_rng_state(state['rng'])
    old = state['report']
    for key in ('epoch_loss', 'epoch_time', 'block_error_before', 'output_error_before'):
        setattr(report, key, copy.deepcopy(old[key]))
    report.resumed_from = report.epochs_done = int(state['epoch'])
    _logger.info(f'calibration: resumed from {path} after epoch {report.resumed_from}')
    return report.resumed_from


def _normalise(value: Any) -> Any:
    """Tuples -> lists, recursively, so a fingerprint compares equal after a save/load round trip."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def compress(model: nn.Module, strategy: Any, data: Iterable | None = None, **options: Any) -> nn.Module:
    """Reduce `model` in place with `strategy`, then calibrate it block-wise against its former self.

    Example:
        >>> timm_reduce.compress(model, 'fips', data=loader, budget=0.25, sparsity=0.75, group_size=4, epochs=20)

    Args:
        model: a timm transformer with its pretrained weights.
        strategy: a strategy name, spec text or ReduceSpec (see `reduce`).
        data: calibration images: a DataLoader or any iterable of image batches or (images, targets) tuples.
        **options: the strategy's options plus the calibration options of `CalibrationConfig` (`epochs`, `batches`,
            `lr`, `weight_decay`, `warmup_steps`, `min_lr_ratio`, `seed`, `shuffle`, `cache`, `checkpoint_dir`,
            `stop_after`, `progress`, `callback`, `count_flops`, `evaluate`). An option both take (e.g. fips's
            `seed`) goes to both.

    Returns:
        The model (the same object). `calibration_report(model)` gives the CalibrationReport.

    Raises:
        ReduceError: no data, an unknown or invalid option (strategy or calibration), malformed batches.
    """
    calib_names = set(CalibrationConfig.option_names())
    if data is None:
        raise ReduceError('compress() needs calibration data: pass data=<a DataLoader or an iterable of image batches '
                          'or (images, targets) tuples>. For a reduction without data use timm_reduce.reduce().')
    name = strategy.strategy if isinstance(strategy, ReduceSpec) else str(strategy).partition(':')[0].strip()
    shared = calib_names & set(get_strategy(name).option_names)  # e.g. `seed`: given to both
    calib = {k: v for k, v in options.items() if k in calib_names}
    strategy_options = {k: v for k, v in options.items() if k not in calib_names or k in shared}
    config = CalibrationConfig(**calib)  # validate before any work
    spec = as_spec(strategy, strategy_options)
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    reduce(model, spec)
    report = calibrate(model, teacher, data, config)
    del teacher
    model.__dict__[_REPORT_ATTR] = report
    return model
