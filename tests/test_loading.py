"""One loader for saved models: `load_pretrained` and the CLI's `--model` / `--checkpoint` rules built on it."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch

import timm_reduce
from timm_reduce.cli import main
from timm_reduce.cli._common import load_model
from timm_reduce.errors import ReduceError
from timm_reduce.persistence.serialization import load_pretrained

from calib_helpers import tiny_vit

TINY_KWARGS = {'img_size': 32, 'patch_size': 8, 'embed_dim': 32, 'depth': 4, 'num_heads': 2, 'num_classes': 5}


@pytest.fixture()
def saved(tmp_path):
    model = timm_reduce.reduce(tiny_vit(), 'grouped', group_size=2)
    folder = tmp_path / 'saved'
    timm_reduce.save_pretrained(model, folder)
    return model.eval(), folder


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_load_pretrained_equals_timm_local_dir_for_every_spelling(saved):
    model, folder = saved
    reference = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert timm_reduce.load_pretrained is load_pretrained
    for source in (folder, str(folder), f'local-dir:{folder}'):
        loaded = load_pretrained(source)
        _same_outputs(loaded, reference)
        _same_outputs(loaded, model)
        # sharing survives: one tensor per pair of grouped MLPs
        assert loaded.blocks[0].mlp.fc1.weight is loaded.blocks[1].mlp.fc1.weight


@pytest.mark.parametrize('damage,message', [
    ('no_folder', 'is not a saved model folder: it does not exist'),
    ('no_weights', 'model.safetensors missing'),
    ('no_config', 'config.json missing'),
    ('bad_json', 'is not valid JSON'),
    ('wrong_weights', 'does not load as a timm model|do not match'),
])
def test_load_pretrained_says_what_is_wrong(saved, tmp_path, damage, message):
    _, folder = saved
    if damage == 'no_folder':
        folder = tmp_path / 'missing'
    elif damage == 'no_weights':
        (folder / 'model.safetensors').unlink()
    elif damage == 'no_config':
        (folder / 'config.json').unlink()
    elif damage == 'bad_json':
        (folder / 'config.json').write_text('{"architecture": ')
    else:  # weights of another architecture under a valid config
        safetensors.torch.save_file({'x': torch.zeros(3)}, str(folder / 'model.safetensors'))
    with pytest.raises(ReduceError, match=message):
        load_pretrained(folder)


def test_cli_loader_weights_file_needs_a_model_name(tmp_path):
    weights = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(tiny_vit().state_dict(), str(weights))
    with pytest.raises(ReduceError, match='give --model NAME'):
        load_model(None, checkpoint=str(weights))
    with pytest.raises(ReduceError, match='neither a weights file nor a folder'):
        load_model(None, checkpoint=str(tmp_path / 'nothing'))
    with pytest.raises(ReduceError, match='not both'):
        load_model('vit_tiny_patch16_224', pretrained=True, checkpoint=str(weights))
    loaded = load_model('vit_tiny_patch16_224', checkpoint=str(weights), model_kwargs=TINY_KWARGS)
    _same_outputs(loaded, tiny_vit())


def test_cli_loader_folder_as_model_or_as_checkpoint(saved):
    model, folder = saved
    _same_outputs(load_model(str(folder)), model)
    _same_outputs(load_model(None, checkpoint=str(folder)), model)
    # a saved folder's weights into a model built from a name: the folder must hold that architecture's weights
    with pytest.raises(ReduceError, match='do not match'):
        load_model('vit_tiny_patch16_224', checkpoint=str(folder), model_kwargs=TINY_KWARGS)


def test_compress_cli_reports_a_weights_file_without_model(tmp_path, capsys):
    weights = tmp_path / 'w.safetensors'
    safetensors.torch.save_file(tiny_vit().state_dict(), str(weights))
    code = main(['compress', '--checkpoint', str(weights), '--strategy', 'grouped', '--calib-data', str(tmp_path),
                 '--output', str(tmp_path / 'out')])
    assert code == 2
    assert 'give --model NAME' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_export_and_info_share_the_loader_errors(saved, capsys):
    _, folder = saved
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'model.safetensors').unlink()
    assert main(['info', str(folder)]) == 2
    assert 'model.safetensors missing' in capsys.readouterr().err
    assert main(['export', str(folder), '--format', 'torchscript', '--output', str(folder / 'm.pt')]) == 2
    assert 'model.safetensors missing' in capsys.readouterr().err
    assert config['architecture']  # the folder's config itself was fine
