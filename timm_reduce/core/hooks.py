"""Per-step hooks of a reduction recipe (e.g. FiPS sparsity), driven by calibration and by train.py alike."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ReduceError
from .record import get_record
from .registry import get_strategy
from .spec import ReduceSpec

__all__ = ['RecipeHooks', 'recipe_hooks']


class RecipeHooks:
    """Calls every strategy hook object of a recipe in turn (usually exactly one)."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        for h in self.hooks:
            h.setup(model, optimizer, total_steps)

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """A later stage (distillation) trains the same parameters with a new optimizer; hooks that keep optimizer
        state consistent (FiPS masks its moments) take it by an optional `use_optimizer(optimizer)`. Its steps are
        numbered on from the first stage's `total_steps`: the schedule is over, masks stay as they are."""
        for h in self.hooks:
            use = getattr(h, 'use_optimizer', None)
            if use is not None:
                use(optimizer)

    def after_backward(self, step: int) -> None:
        for h in self.hooks:
            h.after_backward(step)

    def after_step(self, step: int) -> None:
        for h in self.hooks:
            h.after_step(step)

    def state_dict(self) -> list[dict]:
        return [h.state_dict() for h in self.hooks]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.hooks):
            raise ReduceError('calibration checkpoint: it holds state for a different number of strategy hooks.')
        for h, s in zip(self.hooks, states):
            h.load_state_dict(s)

    def masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, h in enumerate(self.hooks):
            out.update({f'{i}.{k}': v for k, v in h.masks().items()})
        return out


def recipe_hooks(model: nn.Module, recipe: list[ReduceSpec] | None = None) -> RecipeHooks:
    """Hook objects of the model's reduction recipe (strategies registered with `calibration_hooks`).

    Per optimizer step: `after_backward(step)` before `optimizer.step()`, `after_step(step)` after it; `setup` once.
    Steps at or past `setup`'s `total_steps` belong to a later stage (distillation): the schedule is over.
    """
    if recipe is None:
        record = get_record(model)
        recipe = record.recipe if record else []
    hooks = []
    for spec in recipe:
        make = get_strategy(spec.strategy).calibration_hooks
        if make is not None:
            hooks.append(make(model, spec.config))
    return RecipeHooks(hooks)
