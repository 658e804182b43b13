"""What a reduced model remembers about itself: its base timm architecture and the recipe applied to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .spec import ReduceSpec

__all__ = ['ReductionRecord', 'get_record', 'base_name']

_ATTR = '_timm_reduce_record'


@dataclass
class ReductionRecord:
    """Kept on the model as a plain attribute, so it follows deepcopy and pickling.

    Attributes:
        base: timm model name the reduced model was built from.
        base_args: the timm kwargs of the base (`num_classes`, `img_size`, ...), as recorded by timm's factory.
        recipe: reductions applied, in order.
        params_before / mlp_params_before: counts of the dense model before the first reduction.
    """

    base: str | None
    base_args: dict[str, Any] = field(default_factory=dict)
    recipe: list[ReduceSpec] = field(default_factory=list)
    params_before: int = 0
    mlp_params_before: int = 0


def get_record(model: nn.Module) -> ReductionRecord | None:
    return getattr(model, _ATTR, None)


def set_record(model: nn.Module, record: ReductionRecord | None) -> None:
    if record is None:
        model.__dict__.pop(_ATTR, None)
    else:
        model.__dict__[_ATTR] = record


def base_name(model: nn.Module) -> str | None:
    """The timm architecture name a model was created as."""
    record = get_record(model)
    if record is not None and record.base:
        return record.base
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture')
