"""Bad input at every face is a clear error before any work: spec texts and option values (issue 14 item 4), the
CLI and train.py (item 14)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import timm_reduce
from timm_reduce import ReduceError, ReduceSpec
from timm_reduce.cli import main
from timm_reduce.core.spec import parse_recipe, parse_value
from timm_reduce.evaluate import find_split

from conftest import tiny
from train_utils import REPO, TINY, load_train_module, make_image_folder, subprocess_env

DEEP = '[' * 5000 + ']' * 5000

BAD_SPECS = [
    ('shallow:keep=0.5,', 'trailing comma'),
    ('shallow:keep=0.5,,importance=first', 'trailing comma'),
    (f'grouped:group_size={DEEP}', 'nested too deeply'),
    ('{"strategy": "thin", "options": {"mlp_ratio": ' + DEEP + '}}', 'nested too deeply'),
    ('thin:mlp_ratio=Infinity', 'finite'),
    ('thin:mlp_ratio=1e400', 'finite'),
    ('thin:mlp_ratio=NaN', 'finite'),
    ('grouped:group_size=1e400', 'finite'),
    ('shallow:keep=[0.5', 'not valid JSON'),
    ('{"strategy": 3}', 'must be a name'),
    ('thin:mlp_ratio=1e300', 'at most 64'),
]


@pytest.mark.parametrize('text, fragment', BAD_SPECS, ids=[t[:30] for t, _ in BAD_SPECS])
def test_bad_spec_text_is_a_reduce_error(text: str, fragment: str) -> None:
    with pytest.raises(ReduceError, match=fragment):
        ReduceSpec.parse(text)


@pytest.mark.parametrize('options, fragment', [
    ({'mlp_ratio': float('inf')}, 'finite'),
    ({'mlp_ratio': float('nan')}, 'finite'),
], ids=['inf', 'nan'])
def test_non_finite_float_options_are_refused(options: dict, fragment: str) -> None:
    with pytest.raises(ReduceError, match=fragment):
        ReduceSpec('thin', options)


@pytest.mark.parametrize('value', [float('inf'), float('-inf'), float('nan')], ids=['inf', '-inf', 'nan'])
def test_integer_options_refuse_non_finite_numbers(value: float) -> None:
    with pytest.raises(ReduceError, match='finite'):  # before: OverflowError / ValueError from int()
        timm_reduce.reduce(tiny('vit'), 'grouped', group_size=value)


def test_recipes_are_one_list_deep_and_refuse_deep_json() -> None:
    with pytest.raises(ReduceError, match='one list'):
        parse_recipe([[['shallow:keep=0.5']]])
    with pytest.raises(ReduceError, match='nested too deeply'):
        parse_recipe(DEEP)
    # the legitimate deep value: a recipe list -> spec -> options -> groups (a list of lists)
    spec = parse_recipe('[{"strategy": "grouped", "options": {"groups": [[0, 1], [2, 3]]}}]')
    assert spec[0].options == {'groups': [[0, 1], [2, 3]]}


def test_valid_values_still_parse() -> None:
    assert parse_value('2') == 2 and parse_value('0.5') == 0.5 and parse_value('[1, 2]') == [1, 2]
    assert parse_value('True') is True and parse_value('mean') == 'mean'
    assert ReduceSpec.parse('shallow:') == ReduceSpec('shallow', {})


def test_huge_calibration_lr_is_refused_before_any_work() -> None:
    with pytest.raises(ReduceError, match='lr'):
        timm_reduce.compress(tiny('vit'), 'shallow', data=[torch.randn(2, 3, 32, 32)], lr=1e300)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_of_a_missing_folder_says_it_does_not_exist(tmp_path: Path, capsys) -> None:
    assert main(['eval', 'nonexist/', '--data', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'nonexist/ does not exist' in err and 'Unknown timm model' not in err


REDUCE_TINY = ['reduce', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8',
               'embed_dim=32', 'depth=2', 'num_heads=2', '--strategy', 'shallow']


def test_cli_output_path_under_a_file_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / 'out').write_text('a file')
    code = main([*REDUCE_TINY, '--output', str(tmp_path / 'out' / 'sub')])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith('timm-reduce reduce: error:') and str(tmp_path / 'out') in err  # the path that is a file


@pytest.mark.parametrize('code, text', [(errno.ENOSPC, 'No space left on device'), (errno.EROFS, 'Read-only file system'),
                                        (errno.EACCES, 'Permission denied')], ids=['disk-full', 'read-only', 'denied'])
def test_cli_os_errors_while_saving_are_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch, code: int,
                                                            text: str) -> None:
    import timm_reduce.persistence.serialization as serialization

    def failing_save(model, folder, **kwargs):
        raise OSError(code, text, str(folder))

    monkeypatch.setattr(serialization, 'save_pretrained', failing_save)
    assert main([*REDUCE_TINY, '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err == f"timm-reduce reduce: error: {text}: {tmp_path / 'out'}\n"


def test_cli_reduce_that_fails_leaves_no_empty_output_folder(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(safetensors.torch, 'save_file', disk_full)
    out = tmp_path / 'never'
    assert main([*REDUCE_TINY, '--output', str(out)]) == 2
    assert not out.exists() and os.listdir(tmp_path) == []


def _tar_splits(root: Path) -> Path:
    """root/data/{train,val}.tar made from a generated image folder, like ../shared/data/cifar10."""
    images = make_image_folder(root / 'images', train_per_class=2, val_per_class=2)
    data = root / 'data'
    data.mkdir()
    for split, folder in (('train', 'train'), ('val', 'validation')):
        with tarfile.open(data / f'{split}.tar', 'w') as tar:
            for path in sorted((images / folder).rglob('*.png')):
                tar.add(path, arcname=str(path.relative_to(images / folder)))
    return data


def test_find_split_takes_synonyms_and_tars(tmp_path: Path) -> None:
    data = _tar_splits(tmp_path)
    assert find_split(str(data), 'validation') == str(data / 'val.tar')
    assert find_split(str(data), 'train') == str(data / 'train.tar')
    assert find_split(str(data), 'test') is None


def test_cli_eval_reads_the_validation_split_of_a_folder_of_tars(tmp_path: Path, capsys) -> None:
    data = _tar_splits(tmp_path)
    saved = tmp_path / 'model'
    timm_reduce.save_pretrained(tiny('vit', num_classes=3), saved)
    assert main(['eval', str(saved), '--data', str(data), '--workers', '0', '--json']) == 0
    assert '"images": 6' in capsys.readouterr().out  # 3 classes x 2 validation images, not the tars as classes
    assert main(['eval', str(saved), '--data', str(data), '--split', 'test', '--workers', '0']) == 2
    assert "Split 'test' not found" in capsys.readouterr().err
    (data / 'val.tar').rename(data / 'holdout.tar')
    assert main(['eval', str(saved), '--data', str(data), '--workers', '0']) == 2
    assert 'pass one of them' in capsys.readouterr().err


def test_cli_eval_of_a_bare_architecture_warns_about_random_weights(tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path, train_per_class=1, val_per_class=1)
    code = main(['eval', 'vit_tiny_patch16_224', '--data', str(images / 'validation'), '--workers', '0',
                 '--limit', '2', '--batch-size', '2'])
    assert code == 0 and 'random weights' in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- train.py


def test_train_reduction_kwargs_without_equals_is_a_usage_error(tmp_path: Path, capsys) -> None:
    train = load_train_module()
    with pytest.raises(SystemExit) as e:
        train.main([str(tmp_path), *TINY, '--reduction-strategy', 'grouped', '--reduction-kwargs', 'group_size'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "got 'group_size'" in err and 'Traceback' not in err


def test_train_kwargs_keep_timm_literal_parsing() -> None:
    train = load_train_module()
    args, _ = train.parse_args(['data', '--model-kwargs', 'img_size=32', 'global_pool=avg', 'depths=(2, 2)'])
    assert args.model_kwargs == {'img_size': 32, 'global_pool': 'avg', 'depths': (2, 2)}


def test_train_data_path_that_is_a_tar_says_to_pass_its_folder(tmp_path: Path, capsys) -> None:
    data = _tar_splits(tmp_path)
    train = load_train_module()
    assert train.main([str(data / 'train.tar'), *TINY, '--output', str(tmp_path / 'o'), '--epochs', '1']) == 2
    err = capsys.readouterr().err
    assert f'pass {data}' in err and '--train-split train' in err


def test_train_finds_tar_splits_by_their_plain_name(tmp_path: Path) -> None:
    data = _tar_splits(tmp_path)
    train = load_train_module()
    assert train._split_root(str(data), '', 'train') == (str(data / 'train.tar'), 'train')
    assert train._split_root(str(data), '', 'validation') == (str(data / 'val.tar'), 'validation')


def test_train_ctrl_c_prints_one_line_without_traceback(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / 'data', train_per_class=64, val_per_class=2)
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), str(data), *TINY, '--epochs', '1000',
                             '--output', str(tmp_path / 'out')], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training has started
            if 'Train:' in line or 'Scheduled epochs' in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert 'interrupted' in err and 'Traceback' not in err


def test_train_refuses_an_unsaveable_model_before_training(tmp_path: Path, capsys) -> None:
    data = make_image_folder(tmp_path / 'data', train_per_class=2, val_per_class=1)
    argv = [str(data), *TINY, '--output', str(tmp_path / 'out'), '--epochs', '1']
    i = argv.index('--model-kwargs')
    argv.insert(i + 1, 'qk_norm={1}')  # a Python set: timm accepts it (truthy), config.json cannot hold it
    train = load_train_module()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert 'qk_norm={1}' in err and 'config.json cannot hold' in err
    assert not list((tmp_path / 'out').rglob('*.pth.tar'))  # refused before the first epoch
