"""Shared helpers of the calibration tests: tiny models whose blocks differ, and an independent block-error probe."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import timm_reduce

# tiny models on a shared 2-core machine: one thread avoids oversubscription (10-30x faster here)
torch.set_num_threads(1)


def tiny_vit(seed: int = 0) -> nn.Module:
    """A 4-block ViT whose MLPs differ from block to block (independent perturbations, as trained blocks differ)."""
    torch.manual_seed(seed)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                              num_classes=5)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for p in block.mlp.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model('swin_tiny_patch4_window7_224', img_size=32, patch_size=2, window_size=4, embed_dim=16,
                              depths=(2, 2), num_heads=(2, 4), num_classes=5)
    with torch.no_grad():
        for i, site in enumerate(timm_reduce.find_mlp_sites(model)):
            for p in site.mlp.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def image_batches(n: int = 4, batch: int = 8, seed: int = 1, size: int = 32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n)]


@torch.no_grad()
def block_errors(student: nn.Module, teacher: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """Per block: MSE of the student block fed the teacher block's input against the teacher block's output."""
    student, teacher = student.eval(), teacher.eval()
    s_blocks = [s.block for s in timm_reduce.find_mlp_sites(student)]
    t_blocks = [s.block for s in timm_reduce.find_mlp_sites(teacher)]
    errors = [0.0] * len(t_blocks)
    for images in batches:
        captured = []
        handles = [b.register_forward_hook(lambda m, a, o: captured.append((a[0], o))) for b in t_blocks]
        try:
            teacher(images)
        finally:
            for h in handles:
                h.remove()
        for i, (x, y) in enumerate(captured):
            errors[i] += torch.mean((s_blocks[i](x) - y) ** 2).item() / len(batches)
    return errors


def run_two_ranks(tmp_path: Path, *args: str) -> list[dict]:
    """Run tests/calib_dist_worker.py under `torchrun --nproc_per_node 2` (gloo, CPU); each rank's saved result."""
    here = Path(__file__).parent
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(here.parent), str(here)]), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(here / 'calib_dist_worker.py'), str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
