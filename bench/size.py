"""Table 2: bytes at rest of the saved model (model.safetensors + config.json) per strategy vs the original.

Every variant is reduced from the same model, saved with `timm_reduce.save_pretrained`, reloaded with
`timm.create_model('local-dir:...', pretrained=True)` and checked to give the same outputs as before saving.
No calibration or fine-tuning: sizes depend on the structure only (FiPS uses `sparsifier=static`, i.e. the factors
are pruned to their final 75% sparsity at once, the sparsity a calibrated GMP model ends at).

    python bench/size.py                                   # the CIFAR-10 benchmark ViT if present, else deit_small
    python bench/size.py --model deit_small_patch16_224
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

# the repository root first: this checkout's timm_reduce, not another editable install
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import BENCH_MODEL, ROOT, header, md_table, stored_mlp_params, write_results  # noqa: E402

import timm_reduce  # noqa: E402
from timm_reduce.summary import model_input_size  # noqa: E402

# variant name -> spec text (None = the original)
VARIANTS: dict[str, str | None] = {
    'original': None,
    'shallow keep=0.5': 'shallow:keep=0.5',
    'thin mlp_ratio=2': 'thin:mlp_ratio=2',
    'grouped pairs': 'grouped:group_size=2',
    'FiPS 10%': 'fips:budget=0.1,sparsifier=static',
    'FiPS 25%': 'fips:budget=0.25,sparsifier=static',
    'FiPS 40%': 'fips:budget=0.4,sparsifier=static',
    'FiPS 50%': 'fips:budget=0.5,sparsifier=static',
    'FiPS 50% dense factors': 'fips:budget=0.5,sparsifier=dense',
    'FiPS 25% bf16 values': 'fips:budget=0.25,sparsifier=static,storage_dtype=bfloat16',
    'MorphReuse shape-shared': 'morphreuse:variant=shape',
    'MorphReuse core (dim 128)': 'morphreuse:variant=core',
}


def load_base(model: str) -> tuple[nn.Module, str]:
    if Path(model).is_dir():
        return timm.create_model(f'local-dir:{Path(model).resolve()}', pretrained=True), str(model)
    return timm.create_model(model, pretrained=False), f'{model} (pretrained=False)'


def measure(base: str, spec: str | None, workdir: Path, x: torch.Tensor) -> dict[str, Any]:
    model, _ = load_base(base)
    model.eval()
    if spec is not None:
        timm_reduce.reduce(model, spec)
    info = timm_reduce.summary(model, macs=False)
    with torch.no_grad():
        before = model(x)
    out = timm_reduce.save_pretrained(model, workdir)
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        after = reloaded(x)
    return {
        'spec': spec, 'files': files, 'bytes': files['model.safetensors'] + files['config.json'],
        'summary_bytes': info['bytes'], 'params': info['params'], 'unique_params': info['unique_params'],
        'mlp_params': info['mlp_params'], 'mlp_params_before': info['mlp_params_before'],
        'stored_mlp_params': stored_mlp_params(info),
        'reload_max_abs_diff': float((before - after).abs().max()),
    }


def markdown(info: dict[str, Any]) -> str:
    orig = info['rows']['original']['bytes']
    rows = []
    for name, r in info['rows'].items():
        mlp = f"{r['stored_mlp_params']:,} ({r['stored_mlp_params'] / r['mlp_params_before']:.1%})"
        rows.append([name, f"`{r['spec']}`" if r['spec'] else '', f"{r['unique_params']:,}", mlp,
                     f"{r['files']['model.safetensors']:,}", f"{r['files']['config.json']:,}", f"{r['bytes']:,}",
                     f"{r['bytes'] / orig:.1%}", f"{r['reload_max_abs_diff']:.1e}"])
    text = (f"Model: {info['model']}. Bytes at rest = model.safetensors + config.json written by "
            f"`timm_reduce.save_pretrained`; 'reload diff' = max |output before save − output after "
            f"`timm.create_model('local-dir:...')`|. 'unique params' counts FiPS factors densely (masked entries "
            f"included, as in memory); 'stored MLP params' counts only their non-zeros (and the dense bases and "
            f"biases), as the compact file stores them.\n\n")
    columns = ['variant', 'spec', 'unique params (dense tensors)', 'stored MLP params', 'model.safetensors',
               'config.json', 'total bytes', 'vs original', 'reload diff']
    return text + md_table(columns, rows) + '\n'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    default = str(BENCH_MODEL.relative_to(ROOT)) if (BENCH_MODEL / 'config.json').exists() else \
        'deit_small_patch16_224'
    p.add_argument('--model', default=default, help='a save_pretrained folder or a timm model name')
    p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument('--results-dir', type=Path, default=None, help='default: bench/results')
    p.add_argument('--name', default='size')
    args = p.parse_args()
    torch.manual_seed(0)
    info = header(args.name)
    model, info['model'] = load_base(args.model)
    x = torch.randn(2, *model_input_size(model))
    info['rows'] = {}
    names = ['original', *[v for v in args.variants if v != 'original']]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            r = measure(args.model, VARIANTS[name], Path(tmp) / str(i), x)
            info['rows'][name] = r
            print(f"{name:<28} {r['bytes']:>12,} bytes  {r['unique_params']:>11,} unique params  "
                  f"reload diff {r['reload_max_abs_diff']:.1e}", flush=True)
    write_results(args.name, info, markdown(info), args.results_dir)
    print(markdown(info))


if __name__ == '__main__':
    main()
