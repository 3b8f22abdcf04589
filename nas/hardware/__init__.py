"""Hardware-aware scoring: targets, machine fingerprints, latency measurement, FLOPs and params,
the latency predictor and the shared result cache."""

from nas.hardware.cache import ResultCache
from nas.hardware.fingerprint import Fingerprint, fingerprint
from nas.hardware.flops import flops, params
from nas.hardware.measure import Latency, MeasureResult, measure, measure_safely
from nas.hardware.target import Target

__all__ = [
    "Fingerprint",
    "Latency",
    "MeasureResult",
    "ResultCache",
    "Target",
    "fingerprint",
    "flops",
    "measure",
    "measure_safely",
    "params",
]
