"""The calibration loop: `calibrate()` runs the block-wise epochs (then any distillation epochs) of an `Engine`,
with per-step hooks, mixed precision, non-finite checks, checkpoints and resume (see `engine` for the algorithm)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.discovery import find_mlp_sites
from ..core.finite import non_finite
from ..core.hooks import RecipeHooks, recipe_hooks
from ..core.record import get_record
from ..errors import ReduceError
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, validate_state
from .config import CalibrationConfig, CalibrationReport, choose_cache, estimate_memory, recipe_defaults
from .data import Collected, collect_batches
from .distributed import check_identical, rank_and_world, tensor_hash

from .engine import Engine, lr_lambda, make_optimizer

__all__ = ['calibrate', 'calibrate_collected', 'check_finite_weights']

_logger = logging.getLogger(__name__)


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
        config: a CalibrationConfig; or give its fields as keyword `options` (a `recipe` fills in the options
            not given; a CalibrationConfig is taken as it is).
        hooks: per-step hooks (`setup`, `after_backward`, `after_step`, `state_dict`, `load_state_dict`, `masks`);
            `'auto'` builds them from the model's reduction recipe (e.g. FiPS sparsity), None disables them.

    Returns:
        A CalibrationReport (loss per epoch, per-block error before/after, timing, memory estimate).

    Raises:
        ReduceError: no or malformed data (wrong rank, channels or image size for the model, NaN or infinite
            values: the batch is named), NaN or infinite weights (the tensor is named), an invalid option, a
            checkpoint that is corrupt, out of range or from a different run, or a non-finite loss (the epoch, step
            and batch are named). On any error the model's MLP weights and buffers are put back as they were.
    """
    if 'init_from' in options:
        raise ReduceError("calibrate() gets a model already reduced; init_from= (how the reduced MLPs start) is an "
                          "option of compress(), which reduces and calibrates in one call.")
    if config is None:
        unknown = sorted(set(options) - set(CalibrationConfig.option_names()))
        if unknown:
            raise ReduceError(f'Unknown calibration option(s) {", ".join(unknown)}; allowed: '
                              f'{", ".join(CalibrationConfig.option_names())}.')
        config = CalibrationConfig(**{**recipe_defaults(options.get('recipe', 'default')), **options})
    elif options:
        raise ReduceError('Pass calibration options either as a CalibrationConfig or as keywords, not both.')
    rank, world = rank_and_world()
    collected = collect_batches(data, config.batches, rank, world, model, digest=config.checkpoint_dir is not None,
                                targets=config.distill_ce_weight > 0)
    check_finite_weights(model, 'calibration: the model')
    check_finite_weights(teacher, 'calibration: the teacher')
    prefixes = tuple(f'{s.path}.mlp.' for s in find_mlp_sites(model))
    saved = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items() if k.startswith(prefixes)}
    try:
        return calibrate_collected(model, teacher, collected, config, hooks)
    except BaseException:
        model.load_state_dict(saved, strict=False)  # the MLPs as they were (values copied in place)
        raise


def check_finite_weights(model: nn.Module, who: str) -> None:
    """Raise naming the first parameter or floating buffer of `model` with a NaN or infinite value."""
    for name, bad, size in non_finite((*model.named_parameters(), *model.named_buffers())):
        raise ReduceError(f'{who} has NaN or infinite values in {name} ({bad} of {size}); calibration would '
                          'spread them to every weight. Repair or reload it.')


def calibrate_collected(model: nn.Module, teacher: nn.Module, collected: Collected, config: CalibrationConfig,
               hooks: Any) -> CalibrationReport:
    """`calibrate` on batches already read and checked by `collect_batches`."""
    batches, total_batches, digest, targets = collected
    rank, world = rank_and_world()
    if hooks == 'auto':
        hooks = recipe_hooks(model)
    elif hooks is None:
        hooks = RecipeHooks([])
    elif not isinstance(hooks, RecipeHooks):
        hooks = RecipeHooks([hooks])

    engine = Engine(model, teacher, batches, config, hooks, rank, world)
    engine.data_digest = digest
    engine.targets = targets
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in engine.params:
        p.requires_grad_(True)
    # torch.manual_seed also seeds every CUDA device: fork (and so restore) those already in use as well
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed)
            return _run(engine, total_batches)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)


def _run(engine: Engine, total_batches: int) -> CalibrationReport:
    config, model, rank, world = engine.config, engine.model, engine.rank, engine.world
    if world > 1:
        for p in engine.params:  # identical starting point on every rank
            torch.distributed.broadcast(p.data, src=0)
    engine.set_modes()
    steps = len(engine.batches)
    total_steps = config.epochs * steps
    optimizer = make_optimizer(engine.params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    engine.hooks.setup(model, optimizer, total_steps)
    engine.record_shapes()
    distill: tuple[torch.optim.Optimizer, Any] | None = None
    if config.distill_epochs:
        engine.compute_teacher_outputs()
        _check_distillation(engine)
        distill_optimizer = make_optimizer(engine.params, config, config.distill_peak_lr)
        distill = (distill_optimizer, torch.optim.lr_scheduler.LambdaLR(
            distill_optimizer, lr_lambda(config, config.distill_epochs * steps, warmup=0)))

    trainable, shape = sum(p.numel() for p in engine.params), tuple(engine.batches[0].shape)
    engine.cache_mode, cache_reason = choose_cache(config, trainable, shape, steps, engine.block_shapes)
    if config.eval_batches is not None:
        engine.eval_count = min(steps, -(-config.eval_batches // world))
    report = CalibrationReport(
        blocks=[s.path for s in engine.sites], epochs=config.epochs, steps_per_epoch=steps, batches=total_batches,
        images=sum(b.shape[0] for b in engine.batches) * world, world_size=world, trainable_params=trainable,
        cache=engine.cache_mode, cache_reason=cache_reason, amp=config.amp, recipe=config.recipe,
        inputs=config.inputs,
        distill_epochs=config.distill_epochs, eval_batches=engine.eval_count * world if config.evaluate else 0,
        memory_estimate=estimate_memory(config, trainable, shape, steps, engine.block_shapes, engine.cache_mode))
    # without amp an fp32 cache gives the weights of recomputation, bit for bit: one run as far as resuming goes
    cache_key = 'none' if engine.cache_mode == 'fp32' and config.amp is None else engine.cache_mode
    fingerprint = {**config.fingerprint(), 'cache': cache_key, 'world_size': world, 'steps_per_epoch': steps,
                   'params': [tuple(p.shape) for p in engine.params], 'blocks': report.blocks}
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir is not None else None
    if ckpt_path is not None:
        fingerprint.update(_identity(engine))
    start = 0
    if ckpt_path is not None and config.resume == 'restart':
        if ckpt_path.exists():
            _logger.warning(f"calibration: resume='restart': not reading {ckpt_path}; starting from epoch 0 (the "
                            f'first completed epoch replaces it).')
    elif ckpt_path is not None and (ckpt_path.exists() or ckpt_path.is_symlink()):
        start = _resume(ckpt_path, fingerprint, engine, (optimizer, scheduler), distill, report)
    elif ckpt_path is not None and config.resume == 'must':
        raise ReduceError(f"calibration: resume='must' but {ckpt_path} does not exist; nothing to resume. Check "
                          f"checkpoint_dir, or pass resume='auto' to start afresh when there is no checkpoint.")
    if engine.cache_mode != 'none':
        engine.build_cache()
    if start == 0 and config.evaluate:
        report.block_error_before, report.output_error_before = engine.evaluate()

    from tqdm.auto import tqdm

    show = config.progress and rank == 0
    total_epochs = config.total_epochs
    epochs_bar = tqdm(range(start, total_epochs), desc='calibrate', unit='epoch', disable=not show,
                      initial=start, total=total_epochs)
    switched = False  # the hooks have the distillation optimizer
    for epoch in epochs_bar:
        if config.stop_after is not None and epoch >= config.stop_after:
            break
        distilling = epoch >= config.epochs
        if distilling and not switched:
            engine.hooks.use_optimizer(distill[0])
            optimizer.state.clear()  # the block-wise moments are not needed any more
            switched = True
        opt, sched = distill if distilling else (optimizer, scheduler)
        loss_fn = engine.distill_loss if distilling else engine.step_loss
        tic = time.perf_counter()
        order = list(range(steps))
        if config.shuffle:
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            order = torch.randperm(steps, generator=gen).tolist()
        loss_sum = 0.0
        for k, index in enumerate(tqdm(order, desc=f'{"distil" if distilling else "epoch"} {epoch + 1}',
                                       unit='batch', leave=False, disable=not show)):
            step = epoch * steps + k  # distillation steps go on past the hooks' total_steps: schedule over
            loss_sum += _train_step(engine, opt, sched, report, step, index, epoch, k, loss_fn)
            engine.hooks.after_step(step)
        loss = torch.tensor([loss_sum / steps], dtype=torch.float64)
        if world > 1:
            loss = loss.to(engine.comm_device)
            torch.distributed.all_reduce(loss)
            loss /= world
            check_identical('sparsity masks', tensor_hash(sorted(engine.hooks.masks().items())), engine.comm_device)
            check_identical('trainable weights', tensor_hash((str(i), p) for i, p in enumerate(engine.params)),
                            engine.comm_device)
        if distilling:
            report.distill_loss.append(float(loss))
            report.distill_epochs_done = epoch + 1 - config.epochs
        else:
            report.epoch_loss.append(float(loss))
            report.epochs_done = epoch + 1
        report.epoch_time.append(time.perf_counter() - tic)
        epochs_bar.set_postfix(loss=f'{float(loss):.4g}')
        _logger.info(f'calibration {"distillation " if distilling else ""}epoch {epoch + 1}/{total_epochs}: loss '
                     f'{float(loss):.6g} ({report.epoch_time[-1]:.1f} s)')
        if epoch + 1 == config.epochs and config.distill_epochs and config.evaluate:
            report.output_error_blockwise = engine.evaluate()[1]
        if ckpt_path is not None:
            if rank == 0:
                state = {'fingerprint': fingerprint, 'epoch': epoch + 1, 'model': model.state_dict(),
                         'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
                         'hooks': engine.hooks.state_dict(), 'rng': torch.get_rng_state(), 'report': report.to_dict()}
                if engine.scaler is not None:
                    state['scaler'] = engine.scaler.state_dict()
                save_checkpoint(state, ckpt_path)
            if world > 1:
                torch.distributed.barrier()
        if config.callback is not None:
            config.callback(report)
    epochs_bar.close()
    report.completed = (report.epochs_done == config.epochs
                        and report.distill_epochs_done == config.distill_epochs)
    if config.evaluate:
        report.block_error_after, report.output_error_after = engine.evaluate()
    return report


def _check_distillation(engine: Engine) -> None:
    """Before any training: the cross-entropy of `distill_ce_weight` needs logits and targets among its classes."""
    if engine.config.distill_ce_weight == 0:
        return
    classes = engine.teacher_out[0].shape[-1]
    if not engine.logits:
        raise ReduceError(f'calibration: distill_ce_weight={engine.config.distill_ce_weight:g} needs a model with a '
                          f'classifier (its output is {tuple(engine.teacher_out[0].shape)}, num_classes='
                          f"{getattr(engine.model, 'num_classes', None)}); pass distill_ce_weight=0.")
    for i, targets in enumerate(engine.targets or []):
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < classes):
            batch = i * engine.world + engine.rank
            raise ReduceError(f'calibration data: batch {batch} has targets {int(targets.min())}..'
                              f'{int(targets.max())}; the model has {classes} classes (0..{classes - 1}).')


_FP16_RETRIES = 24  # halvings of the loss scale one batch may need (GradScaler starts at 2^16)


def _train_step(engine: Engine, optimizer: torch.optim.Optimizer, scheduler: Any, report: CalibrationReport,
                step: int, index: int, epoch: int, k: int, loss_fn: Callable[[int], float] | None = None) -> float:
    """Forward, backward (+ all-reduce), hooks and optimizer step of local batch `index`; returns its loss.

    `loss_fn(index)` runs forward and backward (default: the block-wise `engine.step_loss`).

    With fp16 loss scaling a batch whose scaled gradients overflow is redone at the halved scale until its step is
    taken (the GradScaler would skip it): calibration has few steps and its sparsity schedule counts them, so none
    is lost. The hooks' `after_backward` then runs once per attempt, always on unscaled gradients.
    """
    config, scaler = engine.config, engine.scaler
    loss_fn = engine.step_loss if loss_fn is None else loss_fn
    for _ in range(_FP16_RETRIES + 1):
        optimizer.zero_grad(set_to_none=True)
        if config.count_flops and report.step_flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                loss = loss_fn(index)
            report.step_flops = int(counter.get_total_flops())
        else:
            loss = loss_fn(index)
        if engine.world > 1:  # before unscaling: an overflow on one rank reaches all, and all of them redo the batch
            engine.all_reduce_grads()
        if engine.nonfinite is not None or engine.nonfinite_elsewhere:
            raise _nonfinite_loss(engine, epoch, k, index)
        if scaler is None:
            engine.hooks.after_backward(step)
            optimizer.step()
            scheduler.step()
            return loss
        scaler.unscale_(optimizer)
        engine.hooks.after_backward(step)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # not taken when a gradient is inf/NaN ...
        scaler.update()  # ... and then the scale is halved
        if scaler.get_scale() >= scale:
            scheduler.step()
            return loss
    raise ReduceError(f"calibration: with amp='fp16' the gradients of batch {index} (epoch {epoch + 1}, step {k + 1}) "
                      f'overflow float16 even at loss scale {scaler.get_scale():g}. Use amp=\'bf16\' (float32 range, '
                      'same speed on recent GPUs) or amp=None.')


def _nonfinite_loss(engine: Engine, epoch: int, k: int, index: int) -> ReduceError:
    steps, lr = len(engine.batches), engine.config.lr
    where = f'epoch {epoch + 1}, step {k + 1} of {steps}'
    if engine.nonfinite is None:
        return ReduceError(f'calibration: another process hit a NaN or infinite loss at {where}; stopped before the '
                           f'optimizer step (see its error). The model is put back as it was.')
    what, value = engine.nonfinite
    batch = index * engine.world + engine.rank  # position in the calibration data
    return ReduceError(f'calibration: the loss of {what} is {value} at {where} (calibration batch {batch}); '
                       f'stopped before the optimizer step, the model is put back as it was. The inputs and weights '
                       f'were finite, so the values overflowed: try a lower lr (now {lr:g}), amp=None, or check '
                       f'that batch.')


def _plain(value: Any) -> Any:
    """A value torch.load(weights_only=True) reads back and compares: JSON-like types, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def _identity(engine: Engine) -> dict[str, Any]:
    """What else determines the result, for checkpoints: every reduction step with its resolved options (defaults
    included, so `fips` and `fips:sparsifier=gmp` agree and `gmp` vs `rigl` do not), the calibration batches and
    the teacher's weights."""
    record = get_record(engine.model)
    recipe = record.recipe if record is not None else []
    out: dict[str, Any] = {'recipe': [spec.strategy for spec in recipe]}
    for i, spec in enumerate(recipe, 1):
        try:
            options = dataclasses.asdict(spec.config)
        except Exception:  # a third-party config that is not a plain dataclass: its options as given
            options = dict(spec.options)
        for key, value in options.items():
            out[f'recipe step {i} ({spec.strategy}) {key}'] = _plain(value)
    out['calibration batches (SHA-256)'] = engine.data_digest
    out['teacher weights (hash)'] = tensor_hash(sorted(engine.teacher.state_dict().items()))
    return out


def _resume(path: Path, fingerprint: dict, engine: Engine, blockwise: tuple[torch.optim.Optimizer, Any],
            distill: tuple[torch.optim.Optimizer, Any] | None, report: CalibrationReport) -> int:
    """Load the last per-epoch checkpoint; returns the number of completed epochs (block-wise + distillation).

    A checkpoint written after a distillation epoch holds the distillation optimizer and schedule.
    """
    config = engine.config
    state = load_checkpoint(path, fingerprint, engine.device)
    model_state = engine.model.state_dict()
    prefixes = tuple(f'{s.path}.mlp.' for s in engine.sites)
    validate_state(state, path, epochs=config.epochs, steps=len(engine.batches), model_state=model_state,
                   trainable={k for k in model_state if k.startswith(prefixes)}, rng_size=torch.get_rng_state().numel(),
                   distill_epochs=config.distill_epochs)
    epoch = int(state['epoch'])
    optimizer, scheduler = distill if epoch > config.epochs and distill is not None else blockwise
    try:  # the run's own objects first; the model only once they all took their state
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        engine.hooks.load_state_dict(state['hooks'])
        if engine.scaler is not None and 'scaler' in state:
            engine.scaler.load_state_dict(state['scaler'])
    except Exception as e:
        raise ReduceError(f'calibration: checkpoint {path} holds an optimizer, schedule or strategy-hook state this '
                          f"run cannot take ({type(e).__name__}: {e}). Pass resume='restart' (CLI: --resume "
                          f'restart) to discard it and start afresh, or use another checkpoint_dir.') from None
    engine.model.load_state_dict(state['model'])
    torch.set_rng_state(state['rng'].cpu())  # loaded with map_location=<model device>; the CPU RNG takes CPU bytes
    old = state['report']
    for key in ('epoch_loss', 'distill_loss', 'epoch_time', 'block_error_before', 'output_error_before',
                'output_error_blockwise'):
        if key in old:
            setattr(report, key, copy.deepcopy(old[key]))
    report.resumed_from = epoch
    report.epochs_done = min(epoch, config.epochs)
    report.distill_epochs_done = epoch - report.epochs_done
    _logger.info(f'calibration: resumed from {path} after epoch {report.resumed_from}')
    return report.resumed_from
