"""train.py on one process: every strategy trains, checkpoints load after the reduction, resume keeps the recipe,
bad inputs give a readable error. Runs train.py in-process (`main(argv)`) on a generated image folder."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import timm
import torch
import yaml

import timm_reduce
from timm_reduce.persistence.entrypoint import build_reduced
from timm_reduce.errors import ReduceError
from timm_reduce.core.sharing import alias_map, count_unique
from timm_reduce.core.spec import ReduceSpec
from timm_reduce.training import checkpoint_state, load_training_checkpoint, recipe_from_flags
from train_utils import MODEL_KWARGS, TINY, load_train_module, make_image_folder

train = load_train_module()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'))


def _run(data_dir: Path, out: Path, name: str, *extra: str) -> int:
    return train.main([str(data_dir), *TINY, '--output', str(out), '--experiment', name, *extra])


STRATEGIES = [None, *timm_reduce.list_strategies()]


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory) -> dict[str | None, Path]:
    """One 1-epoch run per registered strategy (strategy defaults) and one baseline."""
    out = tmp_path_factory.mktemp('runs')
    result = {}
    for strategy in STRATEGIES:
        name = strategy or 'baseline'
        flags = ['--reduction-strategy', strategy] if strategy else []
        assert _run(data_dir, out, name, '--epochs', '1', *flags) == 0, name
        result[strategy] = out / name
    return result


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_one_epoch_writes_timm_outputs_and_a_loadable_reduced_model(runs, strategy):
    run = runs[strategy]
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar', 'args.yaml', 'summary.csv'):
        assert (run / name).is_file(), name
    with open(run / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['epoch'] for r in rows] == ['0'] and 0 <= float(rows[0]['eval_top1']) <= 100
    expected_recipe = [ReduceSpec(strategy).to_dict()] if strategy else []
    assert yaml.safe_load((run / 'args.yaml').read_text())['reduction_recipe'] == expected_recipe

    checkpoint = load_training_checkpoint(run / 'model_best.pth.tar')
    assert checkpoint['args'].reduction_recipe == expected_recipe
    # the exported folder: timm rebuilds the reduced structure and holds the best checkpoint's weights
    loaded = timm.create_model(f'local-dir:{run / "model"}', pretrained=True)
    # the preprocessing of the run, not vit_tiny_patch16_224's 224 px default
    assert timm.data.resolve_data_config(model=loaded)['input_size'] == (3, 32, 32)
    state = checkpoint_state(checkpoint)
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # an independent build of the same recipe has the same size and sharing
    reference = build_reduced('vit_tiny_patch16_224', [ReduceSpec(strategy)] if strategy else [], **MODEL_KWARGS)
    assert count_unique(loaded) == count_unique(reference)
    assert sorted(alias_map(loaded.state_dict())) == sorted(alias_map(reference.state_dict()))


def test_every_strategy_makes_the_model_smaller(runs):
    base = count_unique(timm.create_model(f'local-dir:{runs[None] / "model"}'))
    for strategy in STRATEGIES[1:]:
        assert count_unique(timm.create_model(f'local-dir:{runs[strategy] / "model"}')) < base, strategy


def test_log_reports_params_before_after_unique_and_throughput(data_dir, tmp_path, caplog):
    caplog.set_level('INFO')
    assert _run(data_dir, tmp_path, 'log', '--epochs', '1', '--reduction-strategy', 'grouped') == 0
    text = caplog.text
    dense = timm.create_model('vit_tiny_patch16_224', **MODEL_KWARGS)
    grouped = timm_reduce.reduce(timm.create_model('vit_tiny_patch16_224', **MODEL_KWARGS), 'grouped')
    params = sum(p.numel() for p in dense.parameters())
    assert f'params {params:,} before reduction, {params:,} after, {count_unique(grouped):,} unique' in text
    assert 'img/s' in text


# ------------------------------------------------------------------------------------------- reduction flags

SEED_README = {
    None: '',
    'thin': '--reduction-strategy thin --reduction-mlp-ratio 2.0',
    'shallow': '--reduction-strategy shallow --reduction-mlp-ratio 0.5',
    'grouped': '--reduction-strategy grouped --reduction-mlp-ratio 0.707',
}
SEED_COMMON = ('--batch-size 256 --grad-accum-steps 2 --opt adamw --lr 0.001 --weight-decay 0.05 --sched cosine '
               '--epochs 300 --warmup-epochs 5 --drop-path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 '
               '--aa rand-m9-mstd0.5-inc1 --aug-repeats 3 --amp --channels-last --pin-mem --workers 20 --model-ema '
               '--model-ema-decay 0.9998 --seed 42')


@pytest.mark.parametrize('strategy', list(SEED_README))
def test_seed_readme_commands_are_accepted(strategy):
    """The four commands of the seed README (minus `./distributed_train.sh 2`) parse to the intended recipe."""
    argv = shlex.split(f'/path/to/imagenet --model vit_base_patch16_224 {SEED_README[strategy]} {SEED_COMMON} '
                       f'--experiment x --output ./output/x')
    args, _ = train.parse_args(argv)
    assert (args.data_dir, args.model, args.batch_size, args.aa, args.aug_repeats) == (
        '/path/to/imagenet', 'vit_base_patch16_224', 256, 'rand-m9-mstd0.5-inc1', 3)
    recipe = recipe_from_flags(args.reduction_strategy, args.reduction_mlp_ratio, args.reduction_kwargs,
                               args.reduction_spec)
    expected = {None: [], 'thin': [ReduceSpec('thin', {'mlp_ratio': 2.0})],
                'shallow': [ReduceSpec('shallow', {'keep': 0.5})],
                'grouped': [ReduceSpec('grouped', {'init': 'scale', 'scale': 0.707})]}[strategy]
    assert recipe == expected


def test_mlp_ratio_is_validated_per_strategy():
    with pytest.raises(ReduceError, match=r'keep must be a fraction in \(0, 1\]'):
        recipe_from_flags('shallow', 2.0)  # the seed's silent default, now an error
    with pytest.raises(ReduceError, match='need --reduction-strategy'):
        recipe_from_flags(None, 0.5)
    with pytest.raises(ReduceError, match='repeats what --reduction-mlp-ratio sets'):
        recipe_from_flags('thin', 2.0, {'mlp_ratio': 3.0})
    with pytest.raises(ReduceError, match='not available in this installation; available: grouped, shallow, thin'
                       if 'fips' not in timm_reduce.list_strategies() else 'no meaning for strategy'):
        recipe_from_flags('fips', 0.5)
    with pytest.raises(ReduceError, match="Unknown option.*allowed: group_size"):
        recipe_from_flags('grouped', None, {'size': 2})
    assert recipe_from_flags('grouped', None, {'group_size': 3, 'init': 'first'}) == [
        ReduceSpec('grouped', {'group_size': 3, 'init': 'first'})]


def test_reduction_spec_from_text_json_and_file(tmp_path):
    expected = [ReduceSpec('shallow', {'keep': 0.25, 'importance': 'first'})]
    assert recipe_from_flags(spec='shallow:keep=0.25,importance=first') == expected
    assert recipe_from_flags(spec=expected[0].to_json()) == expected
    path = tmp_path / 'spec.json'
    path.write_text(json.dumps([expected[0].to_dict()]))
    assert recipe_from_flags(spec=str(path)) == expected
    with pytest.raises(ReduceError, match='do not combine it with'):
        recipe_from_flags('grouped', spec=str(path))


# ------------------------------------------------------------------------------------------- checkpoints


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return timm.create_model(f'local-dir:{run / "model"}', pretrained=True).state_dict()


@pytest.mark.parametrize('strategy, source', [('grouped', 'last.pth.tar'), ('shallow', 'model')])
def test_initial_checkpoint_of_a_reduced_model_loads_after_the_reduction(runs, data_dir, tmp_path, strategy, source):
    """With lr 0 the run's exported model must equal the --initial-checkpoint it started from."""
    start = runs[strategy] / source
    code = _run(data_dir, tmp_path, 'init', '--epochs', '1', '--lr', '0', '--min-lr', '0', '--weight-decay', '0',
                '--reduction-strategy', strategy, '--initial-checkpoint', str(start))
    assert code == 0
    expected = _final_state(runs[strategy]) if source == 'model' else checkpoint_state(
        load_training_checkpoint(start))
    got = _final_state(tmp_path / 'init')
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    fresh = build_reduced('vit_tiny_patch16_224', [ReduceSpec(strategy)], **MODEL_KWARGS).state_dict()
    assert any(not torch.equal(got[k], fresh[k]) for k in got)  # the weights did come from the checkpoint


def test_mismatched_initial_checkpoint_names_its_recipe(runs, data_dir, tmp_path, capsys):
    start = runs['shallow'] / 'last.pth.tar'
    code = _run(data_dir, tmp_path, 'bad', '--epochs', '1', '--initial-checkpoint', str(start))
    err = capsys.readouterr().err
    assert code == 2
    assert '--initial-checkpoint does not fit the model' in err
    assert "pass --reduction-spec 'shallow'" in err


def test_resume_continues_with_the_recorded_recipe(runs, data_dir, tmp_path, caplog):
    caplog.set_level('INFO')
    code = _run(data_dir, tmp_path, 'resumed', '--epochs', '2', '--resume', str(runs['grouped'] / 'last.pth.tar'))
    assert code == 0
    assert 'Resumed' in caplog.text and 'at epoch 1' in caplog.text
    with open(tmp_path / 'resumed' / 'summary.csv') as f:
        assert [r['epoch'] for r in csv.DictReader(f)] == ['1']
    checkpoint = load_training_checkpoint(tmp_path / 'resumed' / 'last.pth.tar')
    assert checkpoint['epoch'] == 1
    assert checkpoint['args'].reduction_recipe == [ReduceSpec('grouped').to_dict()]
    assert alias_map(_final_state(tmp_path / 'resumed'))  # still grouped: shared tensors


def test_resume_refuses_a_conflicting_reduction(runs, data_dir, tmp_path, capsys):
    code = _run(data_dir, tmp_path, 'conflict', '--epochs', '2', '--resume', str(runs['grouped'] / 'last.pth.tar'),
                '--reduction-strategy', 'shallow', '--reduction-mlp-ratio', '0.5')
    err = capsys.readouterr().err
    assert code == 2
    assert 'was trained with reduction grouped, but the command line asks for shallow:keep=0.5' in err
    assert 'drop the --reduction-* flags' in err


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize('case, message', [
    ('missing_dir', 'Data directory {missing} does not exist'),
    ('unknown_model', "Unknown model 'vit_tinyy_patch16_224'"),
    ('missing_split', "Split 'nosuch' not found"),
    ('unknown_strategy', "Reduction strategy 'halve' is not available in this installation; available: "),
    ('too_few_classes', 'The training data has 3 classes but the model has 2 outputs; pass --num-classes 3'),
    ('aug_repeats_single', '--aug-repeats 3 needs distributed training'),
])
def test_bad_inputs_exit_with_a_readable_message(data_dir, tmp_path, capsys, case, message):
    missing = tmp_path / 'nowhere'
    argv = {
        'missing_dir': [str(missing), *TINY],
        'unknown_model': [str(data_dir), *TINY, '--model', 'vit_tinyy_patch16_224'],
        'missing_split': [str(data_dir), *TINY, '--train-split', 'nosuch'],
        'unknown_strategy': [str(data_dir), *TINY, '--reduction-strategy', 'halve'],
        'too_few_classes': [str(data_dir), *TINY, '--num-classes', '2'],
        'aug_repeats_single': [str(data_dir), *TINY, '--aug-repeats', '3'],
    }[case]
    assert train.main([*argv, '--output', str(tmp_path), '--epochs', '1']) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith('train.py: error: ')
    assert message.format(missing=missing) in err and 'Traceback' not in err


def test_splits_are_found_under_timm_synonyms(tmp_path):
    for name in ('training', 'val'):
        (tmp_path / name).mkdir()
    assert train._split_root(str(tmp_path), '', 'train') == (str(tmp_path / 'training'), 'train')
    assert train._split_root(str(tmp_path), '', 'validation') == (str(tmp_path / 'val'), 'validation')
    assert train._split_root(str(tmp_path), 'torch/cifar10', 'test') == (str(tmp_path), 'test')


def test_randaugment_posterize_with_zero_bits_gives_black_instead_of_an_error():
    """The seed's --aa rand-m9-mstd0.5-inc1 reaches 0 bits, which Pillow >= 13 refuses."""
    import numpy as np
    from PIL import Image, ImageOps
    from timm.data.auto_augment import AugmentOp

    from timm_reduce.training import patch_timm_posterize

    patch_timm_posterize()
    img = Image.fromarray(np.random.default_rng(0).integers(1, 255, (8, 8, 3), dtype=np.uint8))
    strongest = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)  # keep 4 - 4 = 0 bits
    assert not np.asarray(strongest(img)).any()
    assert np.array_equal(np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=2.5)(img)),
                          np.asarray(ImageOps.posterize(img, 3)))
