"""Strategy registry: name -> config dataclass + apply function. Third parties register their own."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import ReduceError
from .values import check_value

__all__ = ['Strategy', 'register_strategy', 'get_strategy', 'list_strategies']

ApplyFn = Callable[..., 'Mapping[str, Any] | None']


@dataclass(frozen=True)
class Strategy:
    """A registered strategy.

    Attributes:
        name: registry key, e.g. `'grouped'`.
        config_cls: dataclass of the options; `__post_init__` validates values.
        apply: `apply(model, sites, config)` transforms `model` in place (sites from `discovery.find_mlp_sites`).
            It may return a dict of options it derived from data (e.g. fips's `ranks`): they are added to the
            recorded spec, so that replaying it on a fresh model builds the same shapes without the data.
        description: one line for `list_strategies` and the CLI.
        creation_kwargs: optional `fn(config) -> dict` of timm kwargs that build the reduced shape directly
            (e.g. `thin` -> `{'mlp_ratio': r}`), used when the strategy is the first step at creation time.
        calibration_hooks: optional `fn(model, config) -> hooks` giving the calibration engine per-step hooks
            (e.g. FiPS sparsity masks); None means plain block-wise calibration.
        reads_weights: whether `apply` derives the reduced MLPs from the current weights (then `reduce()` refuses
            NaN/Inf MLP weights first); False for a from-scratch strategy that re-initialises them (`thin`).
        uses_statistics: whether `apply` takes activation statistics: it is then called as
            `apply(model, sites, config, statistics=...)` with `{block path: MlpStatistics}` or None (see
            `core.statistics`; `compress(init_from='activations')` measures them on the calibration images).
            Its config may say when it reads them: a `reads_statistics` property (e.g. grouped: only for
            `init='mean'`; default: always) and a `needs_sensitivity` property (allocation by measured
            sensitivity; default: never), so `compress()` measures only what will be read.
    """

    name: str
    config_cls: type
    apply: ApplyFn
    description: str = ''
    creation_kwargs: Callable[[Any], dict] | None = None
    calibration_hooks: Callable[[nn.Module, Any], Any] | None = None
    reads_weights: bool = True
    uses_statistics: bool = False

    def reads_statistics(self, config: Any) -> bool:
        """Whether `apply` with `config` reads activation moments (worth measuring them)."""
        return self.uses_statistics and bool(getattr(config, 'reads_statistics', True))

    def needs_sensitivity(self, config: Any) -> bool:
        """Whether `apply` with `config` reads the MLPs' measured sensitivities."""
        return self.uses_statistics and bool(getattr(config, 'needs_sensitivity', False))

    @property
    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def make_config(self, options: Mapping[str, Any] | None = None) -> Any:
        """Build the config from `options`, with a clear error for unknown names and wrong types."""
        options = dict(options or {})
        allowed = self.option_names
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ReduceError(
                f'Unknown option(s) {", ".join(unknown)} for strategy {self.name!r}; allowed: {", ".join(allowed)}.')
        for k, v in options.items():
            check_value(v, f'{self.name}: {k}')
        hints = typing.get_type_hints(self.config_cls)
        coerced = {k: _coerce(self.name, k, v, hints.get(k)) for k, v in options.items()}
        return self.config_cls(**coerced)


def _coerce(strategy: str, key: str, value: Any, hint: Any) -> Any:
    """Accept what JSON or a command line gives for a typed field (2.0 for an int, 1 for a float)."""
    if hint is None:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for arg in options:
            if arg is type(None):
                continue
            try:
                return _coerce(strategy, key, value, arg)
            except ReduceError:
                continue
        raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} has the wrong type; expected {_name(hint)}.')
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be one of {", ".join(map(repr, choices))}.')
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be a list.')
        args = typing.get_args(hint)
        inner = args[0] if args else None
        return [_coerce(strategy, key, v, inner) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be true or false.')
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value:
            raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be an integer.')
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be a number.')
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ReduceError(f'Option {key}={value!r} of strategy {strategy!r} must be a string.')
        return value
    return value


def _name(hint: Any) -> str:
    return getattr(hint, '__name__', None) or str(hint).replace('typing.', '')


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(
        name: str,
        config_cls: type,
        *,
        description: str = '',
        creation_kwargs: Callable[[Any], dict] | None = None,
        calibration_hooks: Callable[[nn.Module, Any], Any] | None = None,
        reads_weights: bool = True,
        uses_statistics: bool = False,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering `apply(model, sites, config)` as strategy `name` with options `config_cls`.

    Example:
        >>> @dataclass
        ... class HalfConfig:
        ...     pass
        >>> @register_strategy('half', HalfConfig, description='...')
        ... def apply_half(model, sites, config): ...
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f'config_cls for strategy {name!r} must be a dataclass, got {config_cls!r}.')

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _STRATEGIES and _STRATEGIES[name].apply is not fn:
            raise ReduceError(f'Strategy {name!r} is already registered.')
        _STRATEGIES[name] = Strategy(name, config_cls, fn, description, creation_kwargs, calibration_hooks,
                                     reads_weights, uses_statistics)
        return fn

    return decorator


def get_strategy(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise ReduceError(f'Unknown strategy {name!r}; available: {", ".join(list_strategies())}.')
    return _STRATEGIES[name]


def list_strategies() -> list[str]:
    """Names of the registered strategies, sorted."""
    return sorted(_STRATEGIES)
