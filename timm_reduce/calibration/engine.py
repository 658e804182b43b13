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
(4 bytes per parameter). With `cache='none'` the teacher forward is recomputed every step: memory is independent
of the number of blocks and batches, at the price of one extra teacher forward per step (~1/3 of a step's compute).
`cache='auto'` (default) takes the fp32 cache when its term fits `cache_limit_gb`, else bf16, else none (the fp32
cache gives the same weights as recomputation). With `distill_epochs` the activations term becomes that of the
whole model, `4 * B * sum_i T_i * (4 * h_i + 16 * d_i)` (every block's graph at once, attention scores not
counted). `estimate_memory()` evaluates the formula; the report carries it.

Distillation (`distill_epochs` > 0): after the block-wise epochs, the same parameters are trained end to end on
the same batches to match the teacher's output (logits: temperature-scaled KL, optional cross-entropy on the
targets; a model without a classifier: output MSE), with a fresh AdamW and cosine schedule. The teacher's outputs
are computed once. The strategy hooks keep running with their steps numbered on past the block-wise
`total_steps` (FiPS masks stay at the final sparsity) and are given the new optimizer (`use_optimizer`).

Mixed precision (`amp='bf16' | 'fp16'`): the teacher and student forwards of the training steps run under
`torch.autocast` on the model's device (the error measurements do not), the backward outside it (PyTorch's AMP
recipe); weights, gradients, AdamW state and the loss stay float32. fp16 scales the loss with a GradScaler; its
gradients are unscaled before the strategy hooks run, so FiPS masks and RigL's dense gradient see true values, and
a batch whose scaled gradients overflow is redone at the halved scale (no step is lost to the scaler). The
activation terms of the memory formula then halve.

Distributed: when `torch.distributed` is initialised, rank `r` of `W` takes batches `r, r + W, ...` (the first
`W * (N // W)` batches), gradients are averaged with one all-reduce per step, and after every epoch the masks of
the calibration hooks and the trainable weights are compared across ranks (a hash, all-gathered): a difference
raises. Only rank 0 writes checkpoints. Under NCCL the bookkeeping tensors of these collectives live on the GPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.discovery import MlpSite, find_mlp_sites
from ..core.hooks import RecipeHooks
from ..core.sharing import unique_tensors
from ..errors import ReduceError
from .config import CalibrationConfig
from .distributed import collective_device

__all__ = ['Engine', 'lr_lambda', 'make_optimizer', 'AMP_DTYPES']

_logger = logging.getLogger(__name__)


_PREVIOUS = object()  # cache marker: this block's input is the previous block's output


class _StopForward(Exception):
    """Raised from the last block's hook: the rest of the teacher forward is not needed."""


AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def _grad_scaler(device: torch.device) -> Any:
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):  # torch < 2.3: only the CUDA one
        return torch.cuda.amp.GradScaler()


class Engine:
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
        self.amp_dtype = AMP_DTYPES.get(config.amp) if config.amp else None
        if self.amp_dtype is not None and self.dtype != torch.float32:
            raise ReduceError(f'calibration: amp={config.amp!r} needs float32 parameters (autocast computes in '
                              f'{config.amp} from float32 weights); the MLPs hold {self.dtype}. Pass amp=None.')
        self.scaler = _grad_scaler(self.device) if config.amp == 'fp16' else None
        self.full_precision = False  # set while `evaluate` measures: no autocast then
        self.comm_device = collective_device(self.device) if world > 1 else torch.device('cpu')
        self.cache: list[list[tuple]] | None = None
        self.cache_mode = 'none' if config.cache == 'auto' else config.cache  # resolved by `_run`
        self.targets: list[torch.Tensor | None] | None = None  # class indices per batch (distill_ce_weight > 0)
        self.teacher_out: list[torch.Tensor] | None = None  # the teacher's outputs per batch (distillation)
        self.logits = True  # the model outputs logits (it has a classifier): distillation by KL, else by MSE
        self.eval_count = len(batches)  # local batches the before/after errors are measured on
        self.nonfinite: tuple[str, float] | None = None  # (what, loss) of the last step, when not finite
        self.nonfinite_elsewhere = False  # another rank's last step had a non-finite loss
        self.data_digest: str | None = None  # SHA-256 of the calibration batches (for checkpoints)
        self.block_shapes: list[tuple[int, int, int, bool]] = []

    def autocast(self) -> Any:
        """The forward's precision context: autocast to `amp` on the model's device, or nothing."""
        if self.amp_dtype is None or self.full_precision:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def no_autocast(self) -> Any:
        """Backward runs outside autocast (the AMP recipe: backward ops take the forward's dtypes anyway)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

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
            with torch.no_grad(), self.autocast():
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
        dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32}[self.cache_mode]
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
        self.nonfinite = None
        previous: list[torch.Tensor | None] = [None]  # the student's output of the block before (detached)

        def visit(i: int, args: tuple, kwargs: dict, target: torch.Tensor) -> None:
            nonlocal total
            args = self._block_input(i, args, previous[0])
            with torch.enable_grad():
                with self.autocast():
                    out = self.sites[i].block(*args, **kwargs)
                    loss = F.mse_loss(out.float(), target.float())
                with self.no_autocast():
                    (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            previous[0] = out.detach()
            value = loss.item()
            total += value
            if self.nonfinite is None and not math.isfinite(value):
                self.nonfinite = (f'block {self.sites[i].path}', value)  # stopped before the optimizer runs

        self.for_each_block(index, visit)
        return total

    def _block_input(self, i: int, args: tuple, student: torch.Tensor | None) -> tuple:
        """Block `i`'s positional inputs for its fitting step: the teacher's, or (`inputs='student' | 'mix'`, where
        the block's input is the previous block's output) the student's previous output or the mean of the two."""
        if self.config.inputs == 'teacher' or student is None or not self.block_shapes[i][3]:
            return args
        teacher, student = args[0], student.to(args[0].dtype)
        return (student if self.config.inputs == 'student' else (teacher + student) / 2, *args[1:])

    @torch.no_grad()
    def compute_teacher_outputs(self) -> None:
        """The teacher's model outputs for every local batch, once (float32, on the model's device)."""
        outputs = []
        for images in self.batches:
            with self.autocast():
                outputs.append(self.teacher(images.to(self.device, self.dtype)).float())
        self.teacher_out = outputs
        self.logits = outputs[0].ndim == 2 and getattr(self.model, 'num_classes', 1) != 0

    def distill_loss(self, index: int) -> float:
        """Forward + backward of the whole student for local batch `index` against the teacher's output."""
        config = self.config
        self.nonfinite = None
        images = self.batches[index].to(self.device, self.dtype)
        with torch.enable_grad():
            with self.autocast():
                out = self.model(images)
            with self.no_autocast():
                out, target = out.float(), self.teacher_out[index]
                if self.logits:
                    t = config.distill_temperature
                    loss = F.kl_div(F.log_softmax(out / t, -1), F.log_softmax(target / t, -1), reduction='batchmean',
                                    log_target=True) * (t * t)
                else:
                    loss = F.mse_loss(out, target)
                if config.distill_ce_weight > 0:
                    loss = loss + config.distill_ce_weight * F.cross_entropy(out, self.targets[index].to(self.device))
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        value = loss.item()
        if not math.isfinite(value):
            self.nonfinite = ('the distillation (model output)', value)
        return value

    def all_reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flag = torch.ones(1, dtype=grads[0].dtype, device=grads[0].device) * (self.nonfinite is not None)
        flat = torch.cat([g.reshape(-1) for g in grads] + [flag])  # + whether this rank saw a non-finite loss
        torch.distributed.all_reduce(flat)
        self.nonfinite_elsewhere = bool(flat[-1] > 0)
        flat = flat[:-1] / self.world
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    @torch.no_grad()
    def evaluate(self) -> tuple[list[float], float]:
        """Per-block MSE (student block on teacher input) and model-output MSE, averaged over the first
        `eval_count` local batches and over ranks.

        Measured in the parameters' precision also with `amp` (teacher included, unless a cache holds its
        activations): the errors describe the weights, not the rounding noise of a half-precision forward.
        """
        sums = torch.zeros(len(self.sites) + 1, dtype=torch.float64)

        def visit(i: int, args: tuple, kwargs: dict, target: torch.Tensor) -> None:
            out = self.sites[i].block(*args, **kwargs)
            sums[i] += F.mse_loss(out.float(), target.float()).item()

        self.full_precision = True
        try:
            for index, images in enumerate(self.batches[:self.eval_count]):
                self.for_each_block(index, visit)
                images = images.to(self.device, self.dtype)
                sums[-1] += F.mse_loss(self.model(images).float(), self.teacher(images).float()).item()
        finally:
            self.full_precision = False
        sums /= self.eval_count
        if self.world > 1:
            sums = sums.to(self.comm_device)
            torch.distributed.all_reduce(sums)
            sums /= self.world
        values = sums.tolist()
        return values[:-1], values[-1]


def lr_lambda(config: CalibrationConfig, total_steps: int, warmup: int | None = None) -> Callable[[int], float]:
    warmup = config.warmup_steps if warmup is None else warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def make_optimizer(params: list[torch.Tensor], config: CalibrationConfig, lr: float | None = None
                    ) -> torch.optim.AdamW:
    if config.weight_decay > 0:
        groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': config.weight_decay},
                  {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
        groups = [g for g in groups if g['params']]
    else:
        groups = [{'params': params, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr if lr is None else lr, foreach=False)
