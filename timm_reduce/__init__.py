"""timm_reduce: make timm vision transformers smaller by sharing, pruning and decomposing their MLPs."""
__version__ = '0.1.0'

from .errors import HubError, ReduceError, UnsupportedModelError
from .spec import ReduceSpec
from .registry import Strategy, get_strategy, list_strategies, register_strategy
from .discovery import MlpSite, find_mlp_sites
from .sharing import unique_parameters
from .record import get_record
from .api import materialize, reduce
from .serialization import load_pretrained, save_pretrained
from .hub import push_to_hub
from .summary import format_summary, summary
from .calibrate import CalibrationConfig, CalibrationReport, calibrate, calibration_report, compress
from . import strategies  # noqa: F401  (registers the built-in strategies)
from . import entrypoint  # noqa: F401  (registers the `timm_reduce` timm model)

__all__ = [
    'CalibrationConfig', 'CalibrationReport', 'HubError', 'MlpSite', 'ReduceError', 'ReduceSpec', 'Strategy',
    'UnsupportedModelError', 'calibrate', 'calibration_report', 'compress', 'find_mlp_sites', 'format_summary',
    'get_record', 'get_strategy', 'list_strategies', 'load_pretrained', 'materialize', 'push_to_hub', 'reduce',
    'register_strategy', 'save_pretrained', 'summary', 'unique_parameters',
]
