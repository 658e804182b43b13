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
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.api import as_spec, reduce
from ..core.discovery import MlpSite, find_mlp_sites
from ..core.hooks import RecipeHooks, recipe_hooks
from ..core.registry import get_strategy
from ..core.sharing import unique_tensors
from ..core.spec import ReduceSpec
from ..errors import ReduceError
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import REPORT_ATTR, CalibrationConfig, CalibrationReport, estimate_memory
from .data import collect_batches
from .distributed import check_identical, rank_and_world, tensor_hash

__all__ = ['calibrate', 'compress']

_logger = logging.getLogger(__name__)


_PREVIOUS = object()  # cache marker: this block's input is the previous block's output


class _StopForward(Exception):
    """Raised from the last block's hook: the rest of the teacher forward is not needed."""


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
    rank, world = rank_and_world()
    batches, total_batches = collect_batches(data, config.batches, rank, world)
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
            check_identical('sparsity masks', tensor_hash(sorted(engine.hooks.masks().items())))
            check_identical('trainable weights', tensor_hash((str(i), p) for i, p in enumerate(engine.params)))
        report.epoch_loss.append(float(loss))
        report.epoch_time.append(time.perf_counter() - tic)
        report.epochs_done = epoch + 1
        epochs_bar.set_postfix(loss=f'{float(loss):.4g}')
        _logger.info(f'calibration epoch {epoch + 1}/{config.epochs}: loss {float(loss):.6g} '
                     f'({report.epoch_time[-1]:.1f} s)')
        if ckpt_path is not None:
            if rank == 0:
                save_checkpoint({'fingerprint': fingerprint, 'epoch': epoch + 1, 'model': model.state_dict(),
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
    state = load_checkpoint(path, fingerprint, engine.device)
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
    model.__dict__[REPORT_ATTR] = report
    return model
