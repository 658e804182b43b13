"""The package's import graph has no cycle, and generic code never reaches into a strategy's modules."""
from __future__ import annotations

import ast
from pathlib import Path

import timm_reduce

PACKAGE = Path(timm_reduce.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split('.') if is_package else module.split('.')[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return '.'.join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any depth of the file (function-level imports included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == '__init__.py'
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module) if node.level else node.module or ''
                # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
                targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside a module -> that module
                    target = target.rpartition('.')[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_detects_a_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_import_graph_is_built_from_relative_and_nested_imports() -> None:
    graph = import_graph()
    assert 'timm_reduce.core.registry' in graph['timm_reduce.core.api']
    assert 'timm_reduce.persistence.encoding' in graph['timm_reduce.summary']
    assert 'timm_reduce.strategies.fips.layers' in graph['timm_reduce.strategies.fips.sparsity']


def test_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, f'import cycle: {" -> ".join(cycle)}'


def test_generic_code_does_not_import_strategy_modules() -> None:
    """Only the strategies package itself, the package root (which registers them) and nothing else may import
    `timm_reduce.strategies.*`: generic code talks to strategy layers through `core.protocol`."""
    offenders = {m: sorted(t for t in targets if t.startswith('timm_reduce.strategies'))
                 for m, targets in import_graph().items()
                 if not m.startswith('timm_reduce.strategies') and m != 'timm_reduce'}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_core_knows_no_strategy_and_no_face() -> None:
    graph = import_graph()
    allowed = ('timm_reduce.core', 'timm_reduce.errors', 'timm_reduce.version')
    for module, targets in graph.items():
        if module.startswith('timm_reduce.core'):
            assert all(t.startswith(allowed) for t in targets), (module, sorted(targets))
