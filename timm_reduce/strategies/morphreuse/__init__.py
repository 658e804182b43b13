"""MorphReuse: weights shared by layer shape with per-layer learnable scales, or a shared core MLP with per-block
projections. `strategy` holds the options and `apply` (registered as `'morphreuse'`), `layers` the modules."""
from .layers import MorphCoreMlp, MorphLinear, SharedCore, SharedLinear
from .strategy import MorphReuseConfig, apply_morphreuse

__all__ = ['MorphCoreMlp', 'MorphLinear', 'MorphReuseConfig', 'SharedCore', 'SharedLinear', 'apply_morphreuse']
