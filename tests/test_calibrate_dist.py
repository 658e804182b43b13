"""Two-process calibration under torchrun (gloo, CPU): ranks split the batches and end with identical weights."""
from __future__ import annotations


import pytest
import torch

import timm_reduce
from timm_reduce.core.spec import parse_value

from calib_helpers import run_two_ranks, tiny_vit



@pytest.mark.parametrize('strategy,options', [
    ('fips', ['budget=0.5', 'sparsity=0.5', 'group_size=2', 'sparsifier=rigl', 'delta_t=2']),  # masks move (RigL)
])
def test_two_ranks_split_batches_and_stay_identical(tmp_path, strategy, options):
    r0, r1 = run_two_ranks(tmp_path, strategy, *options)
    for k, v in r0['state'].items():
        assert torch.equal(v, r1['state'][k]), k
    assert r0['masks'].keys() == r1['masks'].keys()
    for k, v in r0['masks'].items():
        assert torch.equal(v, r1['masks'][k]), k
    for rep in (r0['report'], r1['report']):
        assert rep['world_size'] == 2 and rep['steps_per_epoch'] == 2 and rep['batches'] == 4
        assert rep['images'] == 32
        assert all(a < b for a, b in zip(rep['block_error_after'], rep['block_error_before']))
    assert r0['report']['epoch_loss'] == r1['report']['epoch_loss']  # averaged over ranks
    # the calibration did change the weights
    start = timm_reduce.reduce(tiny_vit(), strategy, **{k: parse_value(v) for k, v in (o.split('=') for o in options)})
    assert any(not torch.equal(v, r0['state'][k]) for k, v in start.state_dict().items())
    start_masks = {k: v for k, v in start.state_dict().items() if v.dtype == torch.bool}
    assert start_masks and any(not torch.equal(v, r0['masks'][k]) for k, v in start_masks.items())  # RigL exchanged


def test_rank_disagreement_raises(monkeypatch):
    from timm_reduce import ReduceError
    from timm_reduce.calibration.distributed import check_identical

    def fake_all_gather(out, mine):  # rank 1 reports another hash
        out[0].copy_(mine)
        out[1].copy_(mine + 1)

    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'all_gather', fake_all_gather)
    with pytest.raises(ReduceError, match='sparsity masks differ between ranks'):
        check_identical('sparsity masks', 1234)
