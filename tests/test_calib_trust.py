"""Bad numbers, bad data and bad checkpoints in calibration (issue 14, items 10, 12 and 13).

Every refusal is a ReduceError that names what is wrong (batch, tensor, epoch/step, checkpoint field) and leaves
the caller's model as it was. Checkpoints are refused when corrupt (checksum), out of range, non-finite or from a
different run (fingerprint: strategy options, calibration options, calibration batches, teacher, world size), and
`resume='restart'` discards one explicitly.
"""
from __future__ import annotations

import copy
import io
import os
import hashlib
import pickle
from pathlib import Path

import pytest
import timm
import torch

import timm_reduce
from timm_reduce import ReduceError
from timm_reduce.calibration import CalibrationConfig, calibrate, calibration_report, compress
from timm_reduce.calibration.checkpoint import CHECKPOINT_NAME, MAGIC, save_checkpoint

from calib_helpers import image_batches, tiny_vit

OPTS = dict(group_size=2, epochs=3, batches=2, lr=2e-3, seed=3, distill_epochs=0)  # block-wise epochs only


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor], mlp_types: list[type]) -> None:
    """Same tensors (keys and values), no reduction record, the original MLP classes, eval mode kept."""
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], v) for k, v in after.items())
    assert timm_reduce.get_record(model) is None
    assert [type(s.mlp) for s in timm_reduce.find_mlp_sites(model)] == mlp_types
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def _refused(strategy: str, data, match: str, model=None, **options):
    model = tiny_vit() if model is None else model
    before, types = _state(model), [type(s.mlp) for s in timm_reduce.find_mlp_sites(model)]
    with pytest.raises(ReduceError, match=match) as info:
        compress(model, strategy, data=data, **options)
    _assert_untouched(model, before, types)
    return info.value


# ------------------------------------------------------------------------------------------ item 10: NaN / Inf
@pytest.mark.parametrize('strategy,options', [('grouped', {'group_size': 2}), ('fips', {'budget': 0.5, 'group_size': 2})])
@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_nonfinite_pixel_is_refused_naming_the_batch(strategy, options, value):
    data = image_batches(n=3)
    data[1][4, 2, 7, 9] = value
    err = _refused(strategy, data, r'batch 1 holds 1 NaN or infinite value.*image\(s\) 4', epochs=1, **options)
    assert 'batch 0' not in str(err)


def test_nonfinite_pixel_in_an_image_target_tuple_and_via_calibrate():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'shallow', keep=0.5)
    before = _state(model)
    data = [(b, torch.zeros(len(b))) for b in image_batches(n=2)]
    data[0][0][0, 0, 0, 0] = float('nan')
    with pytest.raises(ReduceError, match='batch 0 holds 1 NaN'):
        calibrate(model, teacher, data, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('strategy,options', [('grouped', {'group_size': 2}), ('shallow', {'keep': 0.5}),
                                              ('morphreuse', {}), ('fips', {'budget': 0.5, 'group_size': 2})])
@pytest.mark.parametrize('tensor,value', [('fc1.weight', float('nan')), ('fc2.bias', float('inf'))])
def test_reduce_refuses_nonfinite_mlp_weights_naming_the_tensor(strategy, options, tensor, value):
    model = tiny_vit()
    with torch.no_grad():
        model.get_parameter(f'blocks.2.mlp.{tensor}').view(-1)[3] = value
    before, types = _state(model), [type(s.mlp) for s in timm_reduce.find_mlp_sites(model)]
    mlps = [s.mlp for s in timm_reduce.find_mlp_sites(model)]
    with pytest.raises(ReduceError, match=f'{strategy}: blocks.2.mlp.{tensor} contains NaN or infinite'):
        timm_reduce.reduce(model, strategy, **options)
    assert all(torch.equal(before[k], v) if torch.isfinite(v).all() else torch.equal(before[k].isnan(), v.isnan())
               for k, v in model.state_dict().items())
    assert [s.mlp for s in timm_reduce.find_mlp_sites(model)] == mlps and timm_reduce.get_record(model) is None
    assert [type(m) for m in mlps] == types


def test_thin_reads_no_weights_and_still_rebuilds_nonfinite_mlps():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float('nan')
    timm_reduce.reduce(model, 'thin', mlp_ratio=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compress_refuses_nonfinite_weights_outside_the_mlps_naming_the_tensor():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[0, 0] = float('nan')
    types = [type(s.mlp) for s in timm_reduce.find_mlp_sites(model)]
    with pytest.raises(ReduceError, match=r'compress: the model has NaN or infinite values in blocks\.1\.attn\.qkv'):
        compress(model, 'grouped', data=image_batches(n=2), group_size=2, epochs=1)
    assert timm_reduce.get_record(model) is None and [type(s.mlp) for s in timm_reduce.find_mlp_sites(model)] == types


def test_calibrate_refuses_a_nonfinite_teacher():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'grouped', group_size=2)
    with torch.no_grad():
        teacher.norm.weight[0] = float('inf')
    with pytest.raises(ReduceError, match=r'the teacher has NaN or infinite values in norm\.weight'):
        calibrate(model, teacher, image_batches(n=2), epochs=1)


def test_overflowing_batch_stops_with_epoch_step_and_batch_and_restores_the_model():
    """Finite but huge pixels overflow inside the network: the loss is NaN at the step of that batch."""
    data = image_batches(n=3)
    data[2] = data[2] * 1e30
    # init='first' reads no activation statistics: the overflow meets the calibration's own check
    _refused('grouped', data, r'loss of block blocks\.\d is nan at epoch 1, step 3 of 3 \(calibration batch 2\)',
             group_size=2, init='first', epochs=2, batches=3, shuffle=False)


@pytest.mark.parametrize('strategy,options', [('grouped', {'group_size': 2}), ('fips', {'budget': 0.5}),
                                              ('shallow', {'allocation': 'sensitivity'})])
def test_overflowing_batch_stops_the_statistics_naming_the_batch(strategy, options):
    data = image_batches(n=3)
    data[1] = data[1] * 1e30
    _refused(strategy, data, r'activations of block blocks\.\d overflowed on calibration batch 1', shuffle=False,
             **options)


def test_nonfinite_loss_mid_run_restores_the_model_after_reduce_and_training():
    """A weight turned NaN after epoch 1 (here by the callback) stops epoch 2 at its first step; compress puts the
    model back as it was before reduce() although the MLPs were replaced and trained."""
    def poison(report):
        site = timm_reduce.find_mlp_sites(holder[0])[0]
        with torch.no_grad():
            next(site.mlp.parameters()).view(-1)[0] = float('nan')
    holder = [tiny_vit()]
    _refused('fips', image_batches(n=2), r'is nan at epoch 2, step 1 of 2 \(calibration batch \d\)', model=holder[0],
             budget=0.5, group_size=2, epochs=3, callback=poison)


def test_calibrate_puts_the_mlps_back_after_a_nonfinite_loss():
    teacher = tiny_vit()
    model = timm_reduce.reduce(copy.deepcopy(teacher), 'grouped', group_size=2)
    before = _state(model)

    def poison(report):
        with torch.no_grad():
            model.blocks[0].mlp.fc2.bias[0] = float('nan')
    with pytest.raises(ReduceError, match='is nan at epoch 2, step 1'):
        calibrate(model, teacher, image_batches(n=2), epochs=3, lr=1e-2, callback=poison)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ item 13: shapes of data
@pytest.mark.parametrize('batch,match', [
    (torch.randn(4, 3, 64, 64), r'batch 0 has 64x64 images .*the model takes 32x32: \(B, 3, 32, 32\)'),
    (torch.randn(4, 3, 32, 48), r'batch 0 has 32x48 images .*takes 32x32'),
    (torch.randn(4, 1, 32, 32), r'batch 0 has shape \(4, 1, 32, 32\), i\.e\. 1 channel\(s\); the model takes 3'),
    (torch.randn(4, 4, 32, 32), r'4 channel\(s\); the model takes 3'),
    (torch.randn(3, 32, 32), r'batch 0 has shape \(3, 32, 32\) \(3 dimensions\).*\(B, 3, 32, 32\)'),
    (torch.randn(2, 4, 3, 32, 32), r'\(5 dimensions\)'),
])
def test_wrong_image_shape_is_refused_before_any_work(batch, match):
    _refused('fips', [batch], match, budget=0.5, group_size=2, epochs=1)


def test_a_later_batch_of_another_size_is_named():
    data = image_batches(n=3)
    data[2] = torch.randn(8, 3, 40, 40)
    _refused('grouped', data, 'batch 2 has 40x40 images', group_size=2, epochs=1)


def test_shape_check_follows_the_model_not_a_default_config():
    """A model built from its class (timm's config says 224) and a dynamic-size model: no false refusal."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    plain = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    compress(plain, 'grouped', data=image_batches(n=1), group_size=2, epochs=1, evaluate=False)
    dynamic = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2,
                                num_heads=2, num_classes=5, dynamic_img_size=True).eval()
    compress(dynamic, 'grouped', data=image_batches(n=1, size=48), group_size=2, epochs=1, evaluate=False)
    one = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=5, in_chans=1).eval()
    with pytest.raises(ReduceError, match='3 channel.*the model takes 1'):
        compress(one, 'grouped', data=image_batches(n=1), group_size=2, epochs=1)
    from timm_reduce.calibration.data import expected_input

    hybrid = timm.create_model('vit_tiny_r_s16_p8_224', img_size=64, depth=1)  # a CNN stem before the patch conv
    assert expected_input(hybrid) == (3, (64, 64))


# ----------------------------------------------------------------------------------- item 12: checkpoints
@pytest.fixture(scope='module')
def written(tmp_path_factory) -> tuple[bytes, dict]:
    """A checkpoint after epoch 1 of a 3-epoch grouped run: its file bytes and its payload."""
    folder = tmp_path_factory.mktemp('ckpt')
    compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=folder, stop_after=1, **OPTS)
    raw = (folder / CHECKPOINT_NAME).read_bytes()
    assert raw.startswith(MAGIC)
    return raw, _payload(raw)


def _payload(raw: bytes) -> dict:
    end = raw.index(b'\n', len(MAGIC))
    return torch.load(io.BytesIO(raw[end + 1:]), weights_only=True)


def _resume_refused(folder: Path, match: str, data=None, **options) -> ReduceError:
    return _refused('grouped', image_batches(n=2) if data is None else data, match, checkpoint_dir=folder,
                    **{**OPTS, **options})


def _with_file(tmp_path: Path, raw: bytes) -> Path:
    (tmp_path / CHECKPOINT_NAME).write_bytes(raw)
    return tmp_path


def _flip(raw: bytes, at: int, n: int = 64) -> bytes:
    b = bytearray(raw)
    for i in range(at, at + n):
        b[i] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize('damage,match', [
    (lambda raw: _flip(raw, len(raw) // 2), 'is corrupt: the SHA-256'),
    (lambda raw: _flip(raw, len(raw) - 64), 'is corrupt'),
    (lambda raw: _flip(raw, len(MAGIC) + 3, 1), 'is corrupt'),  # the stored checksum itself
    (lambda raw: raw[:-100], 'is corrupt'),  # truncated
    (lambda raw: raw + b'\0' * 10, 'is corrupt'),  # appended
    (lambda raw: b'', r'is empty \(0 bytes'),
    (lambda raw: raw[:len(MAGIC) + 10], 'is corrupt'),
    (lambda raw: os.urandom(4096), 'is not a timm_reduce calibration checkpoint'),
    (lambda raw: b'{"epoch": 1}', 'is not a timm_reduce calibration checkpoint'),
])
def test_corrupt_checkpoint_files_are_refused(tmp_path, written, damage, match):
    err = _resume_refused(_with_file(tmp_path, damage(written[0])), match)
    assert "resume='restart'" in str(err)


def test_checkpoint_without_checksum_is_refused(tmp_path, written):
    buffer = io.BytesIO()
    torch.save(written[1], buffer)  # the format of before: a plain torch.save
    _resume_refused(_with_file(tmp_path, buffer.getvalue()), 'not a timm_reduce calibration checkpoint')


def test_checkpoint_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / CHECKPOINT_NAME).mkdir()
    _resume_refused(tmp_path, 'cannot be read')


def _nan_mlp(s):
    s['model']['blocks.0.mlp.fc1.weight'][1, 2] = float('nan')


def _inf_moment(s):
    first = next(iter(s['optimizer']['state'].values()))
    first['exp_avg'].view(-1)[0] = float('inf')


def _frozen(s):
    s['model']['blocks.1.attn.proj.weight'][0, 0] += 1.0


def _pop_model_key(s):
    s['model'].pop('blocks.3.norm1.bias')


def _dtype(s):
    s['model']['blocks.0.mlp.fc2.weight'] = s['model']['blocks.0.mlp.fc2.weight'].double()


def _shape(s):
    s['model']['blocks.0.mlp.fc2.bias'] = torch.zeros(7)


def _assign(key, value):
    def mutate(s):
        s[key] = value
    return mutate


def _report(key, value):
    def mutate(s):
        s['report'][key] = value
    return mutate


def _scheduler(s):
    s['scheduler']['last_epoch'] = 5


def _lr_nan(s):
    s['optimizer']['param_groups'][0]['lr'] = float('nan')


@pytest.mark.parametrize('mutate,match', [
    (_assign('epoch', 100), 'says epoch 100; a checkpoint of this run is written after epoch 1 to 3'),
    (_assign('epoch', -3), 'says epoch -3'),
    (_assign('epoch', 0), 'says epoch 0'),
    (_assign('epoch', 1.0), r'says epoch 1\.0'),
    (_assign('epoch', True), 'says epoch True'),
    (_assign('epoch', '1'), "says epoch '1'"),
    (_nan_mlp, r'NaN or infinite values in blocks\.0\.mlp\.fc1\.weight'),
    (_inf_moment, r'NaN or infinite values in optimizer\.state\.\d+\.exp_avg'),
    (_frozen, r'blocks\.1\.attn\.proj\.weight that differs from the model'),
    (_pop_model_key, r'other tensors than the model .*missing: blocks\.3\.norm1\.bias'),
    (_dtype, r'blocks\.0\.mlp\.fc2\.weight as torch\.float64'),
    (_shape, r'blocks\.0\.mlp\.fc2\.bias as torch\.float32 \(7,\)'),
    (_assign('model', [1, 2]), 'holds no model state dict'),
    (_assign('rng', torch.zeros(3, dtype=torch.uint8)), 'RNG state of torch.uint8 \\(3,\\); torch uses'),
    (_assign('rng', 'seed'), 'RNG state of str'),
    (_assign('optimizer', {'state': {}}), 'holds no optimizer state'),
    (_assign('optimizer', {'state': {}, 'param_groups': []}), 'optimizer, schedule or strategy-hook state'),
    (_assign('hooks', {'a': 1}), 'no list of strategy hook states'),
    (_assign('hooks', [{'format': 1}]), 'optimizer, schedule or strategy-hook state'),
    (_scheduler, 'LR schedule at step 5; after epoch 1 it is at 2'),
    (_lr_nan, r'optimizer setting lr=nan \(parameter group 0\)'),
    (_assign('scaler', {'scale': float('inf')}), 'loss-scaler state'),
    (_report('epoch_loss', [float('nan')]), 'lists epoch_loss'),
    (_report('epoch_loss', [0.1, 0.2]), 'lists epoch_loss'),
    (_report('output_error_before', float('inf')), 'output_error_before'),
    (_assign('report', None), 'holds no report'),
    (_assign('fingerprint', 'x'), 'has no valid fingerprint'),
    (_assign('fingerprint', {}), 'is from a different run'),
])
def test_checkpoint_values_are_validated_even_with_a_valid_checksum(tmp_path, written, mutate, match):
    state = copy.deepcopy(written[1])
    mutate(state)
    save_checkpoint(state, tmp_path / CHECKPOINT_NAME)  # a correct checksum: the values themselves are checked
    _resume_refused(tmp_path, match)


@pytest.mark.parametrize('payload,match', [
    ([1, 2, 3], 'holds a list, not the dict'),
    ('text', 'holds a str'),
    ({'epoch': 1}, 'lacks fingerprint, model, optimizer'),
])
def test_checkpoint_of_another_structure_is_refused(tmp_path, payload, match):
    save_checkpoint(payload, tmp_path / CHECKPOINT_NAME)
    _resume_refused(tmp_path, match)


def test_missing_keys_are_named(tmp_path, written):
    for key in ('optimizer', 'rng', 'report'):
        state = {k: v for k, v in written[1].items() if k != key}
        save_checkpoint(state, tmp_path / CHECKPOINT_NAME)
        _resume_refused(tmp_path, f'lacks {key}')


class _Boom:
    def __reduce__(self):
        return os.system, ('touch ' + str(Path(os.environ.get('TMPDIR', '/tmp')) / 'timm_reduce_pwned'),)


def test_a_checkpoint_with_code_runs_nothing(tmp_path):
    """A pickle that would run a command, with a valid checksum: weights_only refuses it, our message, no advice
    to pass weights_only=False."""
    marker = Path(os.environ.get('TMPDIR', '/tmp')) / 'timm_reduce_pwned'
    marker.unlink(missing_ok=True)
    payload = pickle.dumps({'epoch': _Boom()}, protocol=2)
    (tmp_path / CHECKPOINT_NAME).write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b'\n' + payload)
    err = _resume_refused(tmp_path, 'cannot be loaded as plain tensors and numbers')
    assert 'weights_only' not in str(err) and not marker.exists()


@pytest.mark.parametrize('change,match', [
    (dict(init='first'), r'recipe step 1 \(grouped\) init'),
    (dict(group_size=4), r'recipe step 1 \(grouped\) group_size'),
    (dict(cache='bf16'), "cache: checkpoint 'none' vs now 'bf16'"),
    (dict(lr=1e-3), 'lr: checkpoint 0.002 vs now 0.001'),
    (dict(epochs=4), 'epochs'),
])
def test_checkpoint_of_other_options_is_refused(tmp_path, written, change, match):
    _resume_refused(_with_file(tmp_path, written[0]), f'different run .*{match}', **change)


def test_checkpoint_of_other_data_or_teacher_is_refused(tmp_path, written):
    folder = _with_file(tmp_path, written[0])
    _resume_refused(folder, r'different run .*calibration batches \(SHA-256\)', data=image_batches(n=2, seed=9))
    one_pixel = image_batches(n=2)
    one_pixel[1][0, 0, 0, 0] += 1e-3
    _resume_refused(folder, r'calibration batches', data=one_pixel)
    _resume_refused(folder, r'different run .*teacher weights', model=tiny_vit(seed=5))


def test_checkpoint_of_other_fips_schedule_is_refused(tmp_path):
    opts = dict(budget=0.5, group_size=2, epochs=2, batches=2, delta_t=1)
    compress(tiny_vit(), 'fips', data=image_batches(n=2), checkpoint_dir=tmp_path, stop_after=1, **opts)
    for change, name in [({'sparsifier': 'rigl'}, 'sparsifier'), ({'pruning': 'local'}, 'pruning'),
                         ({'t_end': 0.5}, 't_end')]:
        _refused('fips', image_batches(n=2), rf"recipe step 1 \(fips\) {name}: checkpoint", checkpoint_dir=tmp_path,
                 **{**opts, **change})
    _refused('grouped', image_batches(n=2), r"recipe: checkpoint \['fips'\] vs now \['grouped'\]",
             checkpoint_dir=tmp_path, group_size=2, epochs=2, batches=2)
    # the default spelled out is the same run
    resumed = compress(tiny_vit(), 'fips', data=image_batches(n=2), checkpoint_dir=tmp_path, sparsifier='gmp', **opts)
    assert calibration_report(resumed).resumed_from == 1 and calibration_report(resumed).completed


def test_restart_discards_a_bad_checkpoint_and_equals_a_fresh_run(tmp_path, written):
    folder = _with_file(tmp_path, _flip(written[0], len(written[0]) // 2))
    fresh = compress(tiny_vit(), 'grouped', data=image_batches(n=2), **OPTS)
    restarted = compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=folder, resume='restart',
                         **OPTS)
    report = calibration_report(restarted)
    assert report.resumed_from == 0 and report.completed
    ref = fresh.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in restarted.state_dict().items())
    # the bad file was replaced by a good one: resuming it now finds the run complete
    again = compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=folder, resume='must', **OPTS)
    assert calibration_report(again).resumed_from == 3 and calibration_report(again).completed


def test_resume_must_needs_a_checkpoint_and_resumes_a_good_one(tmp_path, written):
    _resume_refused(tmp_path, "resume='must' but .*calibration.pt does not exist", resume='must')
    _with_file(tmp_path, written[0])
    resumed = compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=tmp_path, resume='must', **OPTS)
    assert calibration_report(resumed).resumed_from == 1 and calibration_report(resumed).completed
    full = compress(tiny_vit(), 'grouped', data=image_batches(n=2), **OPTS)
    ref = full.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in resumed.state_dict().items())


@pytest.mark.parametrize('options,match', [
    (dict(resume='restart'), "resume='restart' needs checkpoint_dir"),
    (dict(resume='must'), "resume='must' needs checkpoint_dir"),
    (dict(resume='yes', checkpoint_dir='x'), "resume must be 'auto', 'must' or 'restart'"),
    (dict(resume=True, checkpoint_dir='x'), "resume must be"),
])
def test_resume_option_is_validated(options, match):
    with pytest.raises(ReduceError, match=match):
        CalibrationConfig(**options)


def test_a_completed_checkpoint_resumes_to_a_complete_report(tmp_path):
    """epoch == epochs is in range: the run is complete and says so (it used to say 'completed False' for 100)."""
    folder = tmp_path / 'done'
    compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=folder, **OPTS)
    resumed = compress(tiny_vit(), 'grouped', data=image_batches(n=2), checkpoint_dir=folder, **OPTS)
    report = calibration_report(resumed)
    assert report.resumed_from == 3 and report.completed and len(report.epoch_loss) == 3


_WORKER = '''
import sys
import torch.distributed as dist
import timm_reduce
from calib_helpers import image_batches, tiny_vit

dist.init_process_group('gloo')
data = image_batches(n=4)
data[3] = data[3] * 1e30  # finite, overflows in the network: rank 1's second batch
try:
    timm_reduce.compress(tiny_vit(), 'grouped', data=data, group_size=2, init=sys.argv[2], epochs=2, batches=4,
                         shuffle=False)
    message = 'no error'
except timm_reduce.ReduceError as e:
    message = str(e)
open(f'{sys.argv[1]}/rank{dist.get_rank()}.txt', 'w').write(message)
dist.destroy_process_group()
'''


@pytest.mark.parametrize('init', ['first', 'mean'])
def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path, init):
    """Rank 1 alone sees the overflow; the flag rides on the gradient all-reduce, so both ranks stop at the same
    step (no hang) and rank 1 names the batch. With init='mean' the activation statistics overflow first: both
    ranks stop there."""
    import subprocess
    import sys

    here = Path(__file__).parent
    (tmp_path / 'worker.py').write_text(_WORKER)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(here.parent), str(here)]), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(tmp_path / 'worker.py'), str(tmp_path), init]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = ((tmp_path / f'rank{r}.txt').read_text() for r in range(2))
    if init == 'first':
        assert 'another process hit a NaN or infinite loss at epoch 1, step 2 of 2' in r0
        assert 'at epoch 1, step 2 of 2 (calibration batch 3)' in r1
    else:
        assert 'activations overflowed on another process' in r0
        assert 'overflowed on calibration batch 3' in r1


def test_cli_resume_flag(tmp_path, capsys):
    """`timm-reduce compress --resume`: a corrupt checkpoint is refused (exit 2, one line naming it), `restart`
    runs afresh and replaces it, `must` without --checkpoint-dir is refused."""
    import numpy as np
    from PIL import Image

    from timm_reduce.cli import main

    images = tmp_path / 'images' / 'cls'
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(images / f'{i}.png')
    model = tmp_path / 'model'
    timm_reduce.save_pretrained(tiny_vit(), model)
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    (ckpt / CHECKPOINT_NAME).write_bytes(MAGIC + b'0' * 64 + b'\nnot a payload')
    base = ['compress', '--checkpoint', str(model), '--strategy', 'grouped', '--group-size', '2', '--calib-data',
            str(tmp_path / 'images'), '--calib-batches', '1', '--batch-size', '4', '--epochs', '1', '--workers', '0',
            '--no-progress', '--output', str(tmp_path / 'out'), '--checkpoint-dir', str(ckpt)]
    assert main(base) == 2
    assert 'is corrupt' in capsys.readouterr().err
    assert main([*base, '--resume', 'restart']) == 0
    assert (ckpt / CHECKPOINT_NAME).read_bytes().startswith(MAGIC)
    assert main([*base, '--resume', 'must']) == 0  # the new checkpoint: a complete run
    assert main([*base[:-2], '--resume', 'must']) == 2
    assert "resume='must' needs checkpoint_dir" in capsys.readouterr().err


def test_checkpoint_file_gets_the_mode_open_gives(tmp_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint({'epoch': 1}, tmp_path / CHECKPOINT_NAME)  # before: mkstemp's 0600, unreadable to others
    finally:
        os.umask(previous)
    assert oct(os.stat(tmp_path / CHECKPOINT_NAME).st_mode & 0o777) == '0o644'
