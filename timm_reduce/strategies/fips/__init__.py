"""FiPS (Fine-grained Parameter Sharing), in pipeline order: decompose -> layers -> sparsity.

The strategy's options and its `apply` live in `timm_reduce.strategies.fips`; `reduce(model, 'fips', ...)` uses them.
"""
from .decompose import GroupFactors, decompose_group, rank_for_budget
from .layers import FipsBasis, FipsLinear, pack_bits, unpack_bits
from .sparsity import FipsSparsifier, fips_layers, gmp_sparsity, make_hooks, prune, rigl_drop_fraction, select_top

__all__ = [
    'FipsBasis', 'FipsLinear', 'FipsSparsifier', 'GroupFactors', 'decompose_group', 'fips_layers', 'gmp_sparsity',
    'make_hooks', 'pack_bits', 'prune', 'rank_for_budget', 'rigl_drop_fraction', 'select_top', 'unpack_bits',
]
