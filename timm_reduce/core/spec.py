"""ReduceSpec: a strategy name plus its options, with a JSON round trip and a compact text form."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ReduceError
from .values import loads_json

__all__ = ['ReduceSpec', 'SPEC_FORMAT', 'parse_value', 'parse_recipe']

SPEC_FORMAT = 1
def parse_value(text: str) -> Any:
    """Parse an option value typed on a command line: JSON where it is JSON (`2`, `0.5`, `[1,2]`, `true`), else the
    text. A value that starts like a JSON list or object must be valid JSON."""
    stripped = text.strip()
    stripped = {'True': 'true', 'False': 'false', 'None': 'null'}.get(stripped, stripped)
    if stripped[:1] in ('[', '{'):
        return loads_json(stripped, f'value {stripped[:40]!r}')
    try:
        json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        return text
    return loads_json(stripped, f'value {stripped[:40]!r}')


def _split_options(text: str) -> list[str]:
    """Split `a=1,b=[1,2],c=x` on the commas that are not inside brackets; an empty item (`a=1,`, `a=1,,b=2`) is an
    error rather than silently dropped."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in '[{(':
            depth += 1
        elif ch in ']})':
            depth -= 1
        elif ch == ',' and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    parts = [p.strip() for p in parts]
    if not text.strip():
        return []
    if not all(parts):
        raise ReduceError(f'Empty option in {text!r}: options are key=value separated by single commas, with no '
                          f'trailing comma.')
    return parts


@dataclass(frozen=True)
class ReduceSpec:
    """One reduction step: `strategy` and its `options`, validated against the strategy's config class.

    Example: `ReduceSpec.parse("grouped:group_size=2")` == `ReduceSpec('grouped', {'group_size': 2})`.
    """

    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .registry import get_strategy  # the registry validates; the spec knows no strategy itself

        object.__setattr__(self, 'options', dict(self.options))
        get_strategy(self.strategy).make_config(self.options)

    @property
    def config(self) -> Any:
        """The strategy's validated config dataclass for these options."""
        from .registry import get_strategy

        return get_strategy(self.strategy).make_config(self.options)

    @classmethod
    def parse(cls, text: str) -> 'ReduceSpec':
        """Parse `strategy[:key=value,key=value]`, or a JSON object as written by `to_json`."""
        text = text.strip()
        if text.startswith('{'):
            return cls.from_json(text)
        name, _, rest = text.partition(':')
        options = {}
        for item in _split_options(rest):
            key, sep, value = item.partition('=')
            if not sep or not key.strip():
                raise ReduceError(f'Cannot parse option {item!r} in spec {text!r}: expected key=value.')
            options[key.strip()] = parse_value(value)
        return cls(name.strip(), options)

    def to_dict(self) -> dict[str, Any]:
        return {'format': SPEC_FORMAT, 'strategy': self.strategy, 'options': dict(self.options)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'ReduceSpec':
        if not isinstance(data, Mapping) or 'strategy' not in data:
            raise ReduceError(f'A reduce spec must be an object with "strategy" and "options", got {data!r}.')
        fmt = data.get('format', SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise ReduceError(f'Reduce spec format {fmt!r} is not supported (this timm_reduce reads format {SPEC_FORMAT}).')
        unknown = set(data) - {'format', 'strategy', 'options'}
        if unknown:
            raise ReduceError(f'Unknown keys {sorted(unknown)} in reduce spec; allowed: format, strategy, options.')
        options = data.get('options', {})
        if not isinstance(options, Mapping):
            raise ReduceError(f'Reduce spec options must be an object, got {options!r}.')
        if not isinstance(data['strategy'], str):
            raise ReduceError(f'Reduce spec "strategy" must be a name, got {data["strategy"]!r}.')
        return cls(data['strategy'], dict(options))

    @classmethod
    def from_json(cls, text: str) -> 'ReduceSpec':
        return cls.from_dict(loads_json(text, 'Reduce spec'))

    def __str__(self) -> str:
        opts = ','.join(f'{k}={json.dumps(v)}' for k, v in self.options.items())
        return f'{self.strategy}:{opts}' if opts else self.strategy


def parse_recipe(value: Any) -> list[ReduceSpec]:
    """Normalise a spec, its text/JSON/dict form, or a list of those, to a list of ReduceSpec."""
    return _parse_recipe(value, top=True)


def _parse_recipe(value: Any, top: bool) -> list[ReduceSpec]:
    if value is None and top:
        return []
    if isinstance(value, ReduceSpec):
        return [value]
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith('['):
            return _parse_recipe(loads_json(stripped, 'Reduce recipe'), top)
        return [ReduceSpec.parse(stripped)]
    if isinstance(value, Mapping):
        return [ReduceSpec.from_dict(value)]
    if isinstance(value, (list, tuple)) and top:  # one level: a list of specs, never a list of lists
        return [s for item in value for s in _parse_recipe(item, top=False)]
    raise ReduceError(f'Cannot read a reduce spec from {type(value).__name__}: {str(value)[:80]!r}; expected a spec '
                      f'text, a spec object or one list of those.')
