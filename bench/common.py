"""Shared helpers of the bench scripts: machine facts, the exact command, result files, timing and the matmul roof."""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'bench' / 'results'
DATA = Path(os.environ.get('CIFAR10_DIR', ROOT.parent / 'shared' / 'data' / 'cifar10'))
BENCH_MODEL = ROOT / 'bench' / 'models' / 'cifar10_vit'


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no', '--', '.',
                                ':(exclude)bench/results'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ('+dirty' if dirty else '')
    except OSError:
        return 'unknown'


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import timm
    import timm_reduce

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {
        'cpu': cpu, 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'python': platform.python_version(),
        'torch': torch.__version__, 'timm': timm.__version__, 'commit': git_commit(),
        'timm_reduce': str(Path(timm_reduce.__file__).parent),
        'date_utc': datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S'), 'load_average_start': load_average(),
    }


def command() -> str:
    """The exact command that is running, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(['python', script_text, *sys.argv[1:]])


def header(name: str) -> dict[str, Any]:
    """Print and return the machine and command block every result file starts with."""
    info = {'benchmark': name, 'command': command(), 'machine': machine()}
    m = info['machine']
    print(f"# {name}: {info['command']}")
    print(f"# {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), timm {m['timm']}, "
          f"commit {m['commit']}, {m['date_utc']} UTC, load average {m['load_average_start']}", flush=True)
    return info


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def md_preamble(info: dict[str, Any]) -> str:
    m = info['machine']
    load = info.get('load_average_end', m['load_average_start'])
    return (f"Command: `{info['command']}`  \n"
            f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, timm {m['timm']}; commit {m['commit']}; "
            f"{m['date_utc']} UTC; 1-min load average {m['load_average_start'][0]:.2f} at start, "
            f"{load[0]:.2f} at end.\n")


def write_results(name: str, info: dict[str, Any], markdown: str, output_dir: Path | None = None) -> Path:
    """Write bench/results/<name>.json (info) and <name>.md (machine + command + markdown body)."""
    out = output_dir or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    info['load_average_end'] = load_average()
    (out / f'{name}.json').write_text(json.dumps(info, indent=1) + '\n')
    (out / f'{name}.md').write_text(f'### {name}\n\n' + md_preamble(info) + '\n' + markdown.rstrip() + '\n')
    return out / f'{name}.json'


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median plus relative spread (max-min)/median of repeated measurements."""
    med = statistics.median(values)
    return {'median': med, 'min': min(values), 'max': max(values),
            'spread': (max(values) - min(values)) / med if med else float('nan'), 'n': len(values)}


def time_call(fn: Callable[[], Any], min_time: float = 0.5, min_iters: int = 3) -> float:
    """Seconds per call of `fn`, averaged over at least `min_iters` calls and `min_time` seconds."""
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        elapsed = time.perf_counter() - start
        if iters >= min_iters and elapsed >= min_time:
            return elapsed / iters


def matmul_roof(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 n x n matmul throughput in GFLOP/s (median of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = [2 * n ** 3 / time_call(lambda: torch.mm(a, b), min_time=0.3) / 1e9 for _ in range(repeats)]
    return median_spread(rates)


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (e.g. VmRSS, VmHWM)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'/proc/self/status has no {field}')


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later VmHWM is the peak since now; False if not allowed."""
    try:
        Path('/proc/self/clear_refs').write_text('5')
        return True
    except OSError:
        return False


def stored_mlp_params(info: dict[str, Any]) -> int:
    """MLP parameters actually stored: `summary()['mlp_params']` minus the masked-out entries of sparse factors."""
    masked = sum(math.prod(r['shape']) - r['stored_params'] for r in info.get('layers', [])
                 if r.get('kind') == 'fips_factor')
    return info['mlp_params'] - masked
