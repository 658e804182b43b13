"""Shared helpers of the train.py tests: a generated image folder, the tiny model's flags, running train.py."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('ant', 'bee', 'cat')

# a 4-block ViT with 16 tokens: every strategy has something to do and one epoch takes about a second
TINY = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8', 'embed_dim=32', 'depth=4',
        'num_heads=2', '--num-classes', str(len(CLASSES)), '-b', '8', '--workers', '0', '--device', 'cpu',
        '--opt', 'adamw', '--lr', '1e-3', '--warmup-epochs', '0', '--log-interval', '1', '--seed', '0']
MODEL_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=len(CLASSES))


def make_image_folder(root: Path, train_per_class: int = 8, val_per_class: int = 3) -> Path:
    """`root/train/<class>/*.png` and `root/validation/<class>/*.png`, 32x32, class-dependent colour + noise."""
    rng = np.random.default_rng(0)
    for split, n in (('train', train_per_class), ('validation', val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((32, 32, 3), dtype=np.float64)
                base[..., c] = 160
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{i}.png')
    return root


def load_train_module() -> ModuleType:
    """train.py as a module (it is a script at the repo root, not part of the package)."""
    if 'timm_reduce_train_script' in sys.modules:
        return sys.modules['timm_reduce_train_script']
    spec = importlib.util.spec_from_file_location('timm_reduce_train_script', REPO / 'train.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict[str, str]:
    """Environment for train.py subprocesses: this checkout first on the path, one thread per process."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env['OMP_NUM_THREADS'] = '1'
    return env
