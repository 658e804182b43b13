"""Option values as JSON and command lines give them: parsed with bounds (nesting depth, finite numbers), so that
a hostile or mistyped value is a ReduceError before any work."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

from ..errors import ReduceError

__all__ = ['MAX_NESTING', 'loads_json', 'check_value']

MAX_NESTING = 8  # deepest legitimate value: a recipe list -> spec -> options -> `groups` list of lists (5 levels)


def loads_json(text: str, what: str) -> Any:
    """`json.loads` whose every failure is a ReduceError naming `what`; values nested deeper than `MAX_NESTING`
    levels and non-finite numbers (`NaN`, `Infinity`, `1e400`) are refused too."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ReduceError(f'{what} is nested too deeply (at most {MAX_NESTING} levels are allowed).') from None
    except json.JSONDecodeError as e:
        raise ReduceError(f'{what} is not valid JSON: {e}') from e
    check_value(value, what)
    return value


def check_value(value: Any, what: str) -> None:
    """Refuse an option value nested deeper than `MAX_NESTING` levels or holding a non-finite number."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ReduceError(f'{what} must be a finite number, got {item!r}.')
        children = list(item.values()) if isinstance(item, Mapping) else item if isinstance(item, (list, tuple)) else ()
        if children and depth >= MAX_NESTING:
            raise ReduceError(f'{what} is nested too deeply (at most {MAX_NESTING} levels are allowed).')
        stack.extend((c, depth + 1) for c in children)
