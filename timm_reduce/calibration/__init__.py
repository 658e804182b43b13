"""Block-wise calibration, generic over strategies, in reading order: options and report (`config`), calibration
data (`data`), the per-block machinery and the algorithm's description (`engine`), the loop (`run`: `calibrate`),
the verb (`compress`: reduce + calibrate, model put back on error), checkpoints (`checkpoint`) and the distributed
helpers (`distributed`)."""
from .config import CalibrationConfig, CalibrationReport, calibration_report, estimate_memory
from .compress import compress
from .run import calibrate

__all__ = ['CalibrationConfig', 'CalibrationReport', 'calibrate', 'calibration_report', 'compress', 'estimate_memory']
