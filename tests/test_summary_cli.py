import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import timm_reduce
from timm_reduce.cli import main

from conftest import tiny


def test_macs_drop_by_the_closed_form_of_the_removed_units():
    model = tiny('vit')  # 32x32 image, patch 8 -> 16 patches + cls token, dim 32, hidden 128, 4 blocks
    before = timm_reduce.summary(model)['macs']
    after = timm_reduce.summary(timm_reduce.reduce(model, 'shallow', keep=0.5))['macs']
    tokens, dim, removed, depth = 17, 32, 64, 4
    assert before - after == depth * tokens * 2 * dim * removed


def test_summary_bytes_match_the_file(tmp_path):
    model = timm_reduce.reduce(tiny('swin'), 'grouped', group_size=2)
    info = timm_reduce.summary(model, macs=False)
    timm_reduce.save_pretrained(model, tmp_path)
    size = os.path.getsize(tmp_path / 'model.safetensors')
    assert info['bytes'] < size < info['bytes'] + 16_384  # the rest is the JSON header
    assert [b['shared_with'] for b in info['blocks']] == [None, 0, None, 2, None]
    text = timm_reduce.format_summary(info)
    assert f"{info['unique_params']:,}" in text and 'layers.1.blocks.1' in text and 'block 2' in text


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class image folder whose classes are solid colours: trivially learnable, made here, no download."""
    root = tmp_path / 'images'
    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (root / f'class{c}').mkdir(parents=True)
        for i in range(4):
            Image.new('RGB', (32, 32), colour).save(root / f'class{c}' / f'{i}.png')
    return root


def test_cli_reduce_info_eval(tmp_path, image_folder, capsys):
    out = tmp_path / 'out'
    rc = main(['reduce', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8',
               'embed_dim=32', 'depth=4', 'num_heads=2', 'num_classes=3', '--strategy', 'grouped',
               '--set', 'group_size=2', '--output', str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    loaded = timm_reduce.summary(timm_reduce.persistence.entrypoint.build_reduced(
        'vit_tiny_patch16_224', [timm_reduce.ReduceSpec('grouped', {'group_size': 2})], img_size=32, patch_size=8,
        embed_dim=32, depth=4, num_heads=2, num_classes=3), macs=False)
    assert f"{loaded['unique_params']:,}" in printed and (out / 'model.safetensors').exists()

    assert main(['info', str(out), '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['unique_params'] == loaded['unique_params'] and info['recipe'] == ['grouped:group_size=2']

    assert main(['eval', str(out), '--data', str(image_folder), '--workers', '0', '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    assert result['images'] == 12 and 0 <= result['top1'] <= 100 and result['top5'] == 100.0  # 3 classes


def test_cli_checkpoint_then_reduce(tmp_path, capsys):
    model = tiny('vit', num_classes=3)
    torch.save({'state_dict': model.state_dict(), 'epoch': 1}, tmp_path / 'ckpt.pth')
    args = ['reduce', '--model', 'vit_tiny_patch16_224', '--checkpoint', str(tmp_path / 'ckpt.pth'),
            '--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=32', 'depth=4', 'num_heads=2',
            'num_classes=3', '--strategy', 'shallow', '--set', 'keep=1.0', '--output', str(tmp_path / 'o')]
    assert main(args) == 0
    import timm
    loaded = timm.create_model(f'local-dir:{tmp_path / "o"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))  # keep=1.0 changes nothing: the checkpoint was really loaded


@pytest.mark.parametrize('argv, fragment', [
    (['reduce', '--model', 'resnet18', '--strategy', 'grouped', '--output', 'o'], 'ResNet'),
    (['reduce', '--model', 'vit_tiny_patch16_224', '--strategy', 'nope', '--output', 'o'], 'available: '),
    (['reduce', '--model', 'no_such_model', '--strategy', 'grouped', '--output', 'o'], 'Unknown timm model'),
    (['reduce', '--model', 'vit_tiny_patch16_224', '--strategy', 'shallow', '--set', 'keep=2', '--output', 'o'],
     '(0, 1]'),
    (['info', '/nonexistent/dir/x'], '/nonexistent/dir/x does not exist'),  # a path, not a model name (issue 14)
    (['eval', 'vit_tiny_patch16_224', '--data', '/nonexistent'], 'does not exist'),
])
def test_cli_errors_are_readable(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and 'Traceback' not in err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, '-m', 'timm_reduce', '--help'], capture_output=True, text=True)
    assert done.returncode == 0 and 'reduce' in done.stdout and 'demo' in done.stdout


def test_demo_runs_end_to_end():
    from timm_reduce.demo import PLAN, run_demo

    lines = []
    rows = run_demo(epochs=1, print_fn=lines.append)
    assert [r.name for r in rows] == ['original'] + [p[0] for p in PLAN]
    original = rows[0]
    for r in rows[1:]:
        assert r.stored_params < 0.95 * original.stored_params
        assert r.file_bytes < 0.95 * original.file_bytes
    assert 'top-1' in lines[-1] and 'grouped pairs' in lines[-1]


def test_stored_params_count_sparse_factors_by_non_zeros():
    from timm_reduce.strategies.fips.layers import FipsLinear

    model = timm_reduce.reduce(tiny('vit'), 'fips', budget=0.25, group_size=2, sparsifier='static')
    info = timm_reduce.summary(model, macs=False)
    masked_out = sum(int((~m.mask).sum()) for m in model.modules() if isinstance(m, FipsLinear))
    assert masked_out > 0
    assert info['stored_params'] == info['unique_params'] - masked_out
    grouped = timm_reduce.summary(timm_reduce.reduce(tiny('vit'), 'grouped'), macs=False)
    assert grouped['stored_params'] == grouped['unique_params']


def test_fips_macs_equal_the_materialised_model():
    model = timm_reduce.reduce(tiny('vit'), 'fips', budget=0.5, group_size=2, sparsifier='static')
    assert timm_reduce.summary(model)['macs'] == timm_reduce.summary(timm_reduce.materialize(model))['macs']
