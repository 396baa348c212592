"""Signal-to-quantization-noise ratio: the one formula every module reports, its cap for identical outputs, and the
threshold under which one layer counts as breaking INT8.

>>> sqnr_db(100.0, 1.0)
20.0
>>> sqnr_db(1.0, 0.0) == SQNR_CAP_DB
True
"""
from __future__ import annotations

import math

# Identical outputs (no noise at all) and anything closer than this report the cap: a finite number JSON can hold.
# float32 round-off alone measures about 140 dB, so the cap never clips a real measurement.
SQNR_CAP_DB = 200.0
# A layer that, quantized alone, drags the output SQNR under this breaks INT8: the first guess for float (auto), the
# analysis's finding and the red bars of the report's sensitivity chart.
BROKEN_SQNR_DB = 20.0


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """10·log10(Σ signal² / Σ noise²) in dB, at most `SQNR_CAP_DB`; a zero signal counts as the smallest positive
    float (any noise then gives a very negative figure)."""
    if noise_energy <= 0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(max(float(signal_energy), 1e-300) / float(noise_energy)))
