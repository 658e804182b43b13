"""Tiny models shared by the FiPS tests."""
from __future__ import annotations

from typing import Iterator

import pytest
import timm
import torch
from torch import nn

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
SWIN = dict(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)
EVA = dict(img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def tiny_vit(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', **{**VIT, **overrides}).eval()


def tiny_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('swin_tiny_patch4_window7_224', **SWIN).eval()


def tiny_eva(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('eva02_tiny_patch14_224', **EVA).eval()


def images(model: nn.Module, n: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mlp_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """`{path: linear}` of every MLP linear (fc1, fc1_g, fc1_x, fc2) of a plain model."""
    return {n: m for n, m in model.named_modules() if '.mlp.' in n and isinstance(m, nn.Linear)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run each test on one intra-op thread (restored afterwards). The tensors are tiny, and on the shared,
    oversubscribed CI machine 2-thread barriers made a 10-step tiny-ViT loop take 9.7 s instead of 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
