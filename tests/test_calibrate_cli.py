"""`timm-reduce compress` end to end on a generated image folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import timm_reduce
from timm_reduce.cli import main
from timm_reduce.summary import model_input_size

from calib_helpers import block_errors, tiny_vit

ARGS = ['--calib-batches', '2', '--batch-size', '4', '--epochs', '3', '--workers', '0', '--no-progress',
        '--set', 'lr=2e-3']


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for cls in ('cat', 'dog'):
        (root / cls).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp('model')
    timm_reduce.save_pretrained(tiny_vit(), folder)
    return folder


def _images(folder, model):
    dataset = timm.data.create_dataset('', root=str(folder))
    config = {**timm.data.resolve_data_config(model=model), 'input_size': model_input_size(model)}
    dataset.transform = timm.data.create_transform(**config, is_training=False)
    return [torch.stack([dataset[i][0] for i in range(len(dataset))])]


def test_compress_folder_checkpoint_end_to_end(tmp_path, image_folder, saved_model, capsys):
    out = tmp_path / 'out'
    code = main(['compress', '--checkpoint', str(saved_model), '--strategy', 'shallow', '--set', 'keep=0.5',
                 '--calib-data', str(image_folder), '--output', str(out), *ARGS])
    assert code == 0
    text = capsys.readouterr().out
    assert 'epoch loss' in text and 'MLP params' in text and 'bytes at rest' in text
    reduced = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    original = timm.create_model(f'local-dir:{saved_model}', pretrained=True).eval()
    # compress() spreads the kept units by measured sensitivity: half of them in all, per block as recorded
    widths = [s.mlp.fc2.in_features for s in timm_reduce.find_mlp_sites(reduced)]
    assert sum(widths) == 4 * 64 and all(32 <= w <= 128 for w in widths) and 'allocation     by sensitivity' in text
    config = json.loads((out / 'config.json').read_text())
    assert config['timm_reduce']['calibration']['epochs'] == 3
    report = json.loads((out / 'calibration_report.json').read_text())
    assert report['images'] == 8 and len(report['epoch_loss']) == 3
    # independent check on the whole folder: the saved model beats the uncalibrated reduction on every block
    images = _images(image_folder, original)
    uncalibrated = timm_reduce.reduce(tiny_vit(), 'shallow', keep=0.5)
    before, after = block_errors(uncalibrated, original, images), block_errors(reduced, original, images)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_compress_weights_file_with_model_kwargs(tmp_path, image_folder):
    weights = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(tiny_vit().state_dict(), str(weights))
    out = tmp_path / 'out'
    code = main(['compress', '--model', 'vit_tiny_patch16_224', '--checkpoint', str(weights), '--model-kwargs',
                 'img_size=32', 'patch_size=8', 'embed_dim=32', 'depth=4', 'num_heads=2', 'num_classes=5',
                 '--strategy', 'grouped', '--group-size', '2', '--calib-data', str(image_folder),
                 '--output', str(out), *ARGS])
    assert code == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert timm_reduce.summary(model, macs=False)['mlp_params'] * 2 == timm_reduce.summary(tiny_vit(), macs=False)[
        'mlp_params']


@pytest.mark.parametrize('extra,message', [
    (['--strategy', 'grouped', '--budget', '0.25'], "--budget does not apply to strategy 'grouped'"),
    (['--strategy', 'shallow', '--group-size', '2'], "--group-size does not apply to strategy 'shallow'"),
    (['--strategy', 'grouped', '--set', 'foo=1'], "--set foo=...: not an option of strategy 'grouped'"),
    (['--strategy', 'nope'], "Unknown strategy 'nope'"),
])
def test_compress_flag_errors(tmp_path, image_folder, saved_model, capsys, extra, message):
    code = main(['compress', '--checkpoint', str(saved_model), '--calib-data', str(image_folder),
                 '--output', str(tmp_path / 'o'), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_compress_missing_data_folder(tmp_path, saved_model, capsys):
    code = main(['compress', '--checkpoint', str(saved_model), '--strategy', 'grouped', '--calib-data',
                 str(tmp_path / 'missing'), '--output', str(tmp_path / 'o')])
    assert code == 2 and '--calib-data' in capsys.readouterr().err
