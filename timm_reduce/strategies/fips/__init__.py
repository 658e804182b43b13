"""FiPS (Fine-grained Parameter Sharing), in pipeline order: `strategy` (options and `apply`, registered as
`'fips'`) -> `decompose` (shared SVD basis per group) -> `layers` (basis and sparse-factor modules) -> `sparsity`
(GMP / RigL / static masks during calibration)."""
from .decompose import GroupFactors, decompose_group, rank_for_budget
from .layers import FipsBasis, FipsLinear, pack_bits, unpack_bits
from .sparsity import FipsSparsifier, fips_layers, gmp_sparsity, make_hooks, prune, rigl_drop_fraction, select_top
from .strategy import FipsConfig, apply_fips

__all__ = [
    'FipsBasis', 'FipsConfig', 'FipsLinear', 'FipsSparsifier', 'GroupFactors', 'apply_fips', 'decompose_group',
    'fips_layers', 'gmp_sparsity', 'make_hooks', 'pack_bits', 'prune', 'rank_for_budget', 'rigl_drop_fraction',
    'select_top', 'unpack_bits',
]
