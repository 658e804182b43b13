"""train.py under torchrun with 2 CPU processes (gloo): training, checkpoint, resume, replicas in sync,
and a killed rank that makes the survivor exit instead of hanging."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from timm.utils import random_seed

from timm_reduce.persistence.entrypoint import build_reduced
from timm_reduce.core.spec import ReduceSpec
from timm_reduce.training import load_training_checkpoint
from train_utils import MODEL_KWARGS, REPO, TINY, make_image_folder, subprocess_env

HANG_GUARD_S = 300  # only to fail instead of hanging forever; not a speed requirement


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('images'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_ranks_train_in_sync_checkpoint_and_resume(data_dir, tmp_path):
    out = tmp_path / 'out'
    # the seed README's training flags too (mixup, cutmix, RandAugment, repeated augmentation, AMP, ...)
    seed_flags = ['--grad-accum-steps', '2', '--drop-path', '0.1', '--mixup', '0.8', '--cutmix', '1.0', '--reprob',
                  '0.25', '--aa', 'rand-m9-mstd0.5-inc1', '--aug-repeats', '3', '--amp', '--channels-last']
    flags = [*TINY, '--output', str(out), '--experiment', 'ddp', '--reduction-strategy', 'grouped', '--model-ema',
             '--grad-checkpointing', '--reentrant-ckpt', '--dist-timeout', '60', *seed_flags]
    # one epoch = one update per rank on different images (24 train images, batch 8 per rank, drop_last)
    cmd = ['torchrun', '--standalone', '--nproc_per_node', '2', str(REPO / 'tests' / 'ddp_worker.py'), str(tmp_path),
           str(data_dir), *flags, '--epochs', '1']
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'DDP over 2 processes (gloo), static_graph=True' in proc.stderr
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    assert ranks[0]['aliases'] and ranks[0]['aliases'] == ranks[1]['aliases']  # still grouped on both ranks
    for key, value in ranks[0]['state'].items():
        torch.testing.assert_close(ranks[1]['state'][key], value, rtol=0, atol=0, msg=key)
    random_seed(0, 0)  # train.py seeds the model build like this
    initial = build_reduced('vit_tiny_patch16_224', [ReduceSpec('grouped')], **MODEL_KWARGS).state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], ranks[0]['state'][k])]
    assert 'blocks.0.mlp.fc1.weight' in changed  # a step was taken on the shared MLP

    run = out / 'ddp'
    assert load_training_checkpoint(run / 'last.pth.tar')['epoch'] == 0
    resume = [str(REPO / 'distributed_train.sh'), '2', str(data_dir), *flags, '--epochs', '2',
              '--resume', str(run / 'last.pth.tar')]
    proc = subprocess.run(resume, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'Resumed {run / "last.pth.tar"} at epoch 1' in proc.stderr
    checkpoint = load_training_checkpoint(run / 'last.pth.tar')
    assert checkpoint['epoch'] == 1 and checkpoint['args'].reduction_recipe == [ReduceSpec('grouped').to_dict()]
    assert (run / 'checkpoint-1.pth.tar').is_file()
    loaded = timm.create_model(f'local-dir:{run / "model"}', pretrained=True)
    assert loaded.blocks[0].mlp is loaded.blocks[1].mlp


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGSTOP], ids=['killed', 'hung'])
def test_survivor_exits_with_a_message_when_a_rank_dies_or_hangs(data_dir, tmp_path, sig):
    """A killed peer breaks the connection at once; a hung (stopped) one is caught by --dist-timeout."""
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**subprocess_env(), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2',
               'RANK': str(rank), 'LOCAL_RANK': str(rank)}
        log = open(tmp_path / f'rank{rank}.log', 'w+')
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / 'train.py'), str(data_dir), *TINY, '--output', str(tmp_path),
             '--experiment', 'killed', '--epochs', '1000', '--val-split', '', '--dist-timeout', '20'],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
    try:
        survivor_log = tmp_path / 'rank0.log'
        deadline = time.monotonic() + HANG_GUARD_S
        while 'Train: 2 ' not in survivor_log.read_text():  # training is under way on both ranks
            assert procs[0].poll() is None and procs[1].poll() is None, survivor_log.read_text()[-3000:]
            assert time.monotonic() < deadline, 'training did not start'
            time.sleep(0.5)
        procs[1].send_signal(sig)
        code = procs[0].wait(timeout=HANG_GUARD_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    text = survivor_log.read_text()
    assert code == 1, text[-3000:]
    assert 'train.py: rank 0: a collective operation with the other ranks failed' in text
