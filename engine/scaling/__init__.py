"""leanlm.engine.scaling: scaling-law records (``scaling.jsonl``, ColPret CSV) and the fitter.

records  the rows a run writes, loading and exporting them
fitter   L(N, D) = E + A/N^α + B/D^β (Chinchilla's Huber/L-BFGS fit, or ColPret's curve_fit)
"""

from leanlm.engine.scaling.fitter import FitResult, absolute_relative_error, fit
from leanlm.engine.scaling.records import (
    COLPRET_COLUMNS,
    ScalingRecorder,
    export_colpret_csv,
    holdout_are,
    load_records,
    plot_fit,
    recorder_for,
    trajectory_points,
)

__all__ = [
    "COLPRET_COLUMNS",
    "FitResult",
    "ScalingRecorder",
    "absolute_relative_error",
    "export_colpret_csv",
    "fit",
    "holdout_are",
    "load_records",
    "plot_fit",
    "recorder_for",
    "trajectory_points",
]
