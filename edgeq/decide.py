"""The decision rule: how much accuracy a quantized model may lose, and the verdict with its reasons.

The rule is the practitioners' one: a drop under 1 point ships INT8; 1 to 3 points is worth quantization-aware
training and a new measurement; more than 3 points stays at FP16. The verdict follows the measured drop; the
reasons say how sure that measurement is, so a verdict near a threshold is read as the coin toss it is.

>>> decide(0.4, (-0.1, 0.9), DecisionRule()).verdict
'ship'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edgeq.errors import ConfigError

SHIP = "ship"
TRY_QAT = "try-qat"
STAY_FP16 = "stay-fp16"


@dataclass(frozen=True)
class DecisionRule:
    """Thresholds in points of the metric (positive drop = worse).

    >>> DecisionRule(ship_below=0.5, qat_up_to=2.0).qat_up_to
    2.0
    >>> DecisionRule(ship_below=3, qat_up_to=1)             # doctest: +SKIP
    ConfigError: ship_below (3) is above qat_up_to (1) — give 0 <= ship_below <= qat_up_to
    """

    ship_below: float = 1.0
    qat_up_to: float = 3.0

    def __post_init__(self) -> None:
        fix = "give 0 <= ship_below <= qat_up_to, e.g. --ship-below 1 --qat-up-to 3"
        if not (math.isfinite(self.ship_below) and math.isfinite(self.qat_up_to)):
            raise ConfigError(f"decision thresholds must be finite numbers (got {self.ship_below}, {self.qat_up_to})", fix)
        if self.ship_below < 0:
            raise ConfigError(f"ship_below ({self.ship_below:g}) is negative", fix)
        if self.ship_below > self.qat_up_to:
            raise ConfigError(f"ship_below ({self.ship_below:g}) is above qat_up_to ({self.qat_up_to:g})", fix)


@dataclass
class Verdict:
    """`ship`, `try-qat` or `stay-fp16`, and the sentences that explain it."""

    verdict: str
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(drop: float, drop_ci95: tuple[float, float], rule: DecisionRule | None = None, *,
           samples: int | None = None, unit: str = "points") -> Verdict:
    """The verdict for a measured `drop` (positive = worse) and its 95% interval.

    `samples` (the validation set size) lets the reasons estimate how much data would settle a verdict whose
    interval straddles a threshold; `unit` names the drop's unit in the sentences.

    >>> v = decide(2.0, (1.2, 2.8), DecisionRule(), samples=1000)
    >>> v.verdict, v.reasons[0]
    ('try-qat', 'the drop of 2.00 points is between 1 and 3 points: try quantization-aware training, then measure again')
    >>> decide(-0.5, (-0.9, -0.1)).verdict
    'ship'
    """
    rule = rule or DecisionRule()
    if not math.isfinite(drop):
        return Verdict(STAY_FP16, [f"the drop could not be measured ({drop}); keep FP16 until the candidate gives finite results"])
    verdict, first = _by_threshold(drop, rule, unit)
    reasons = [first, *_certainty(drop, drop_ci95, rule, samples, unit)]
    return Verdict(verdict, reasons)


def _by_threshold(drop: float, rule: DecisionRule, unit: str) -> tuple[str, str]:
    # A candidate at least as good as the base ships whatever the thresholds (even ship_below=0).
    if drop == 0:
        return SHIP, "the candidate scores the same as the base (no loss): ship it"
    if drop < 0:
        return SHIP, f"the candidate is {-drop:.2f} {unit} better than the base (no loss): ship it"
    if drop < rule.ship_below:
        return SHIP, f"the drop of {drop:.2f} {unit} is below {rule.ship_below:g} {unit}: ship it"
    if drop <= rule.qat_up_to:
        return TRY_QAT, (f"the drop of {drop:.2f} {unit} is between {rule.ship_below:g} and {rule.qat_up_to:g} {unit}: "
                         "try quantization-aware training, then measure again")
    return STAY_FP16, f"the drop of {drop:.2f} {unit} is above {rule.qat_up_to:g} {unit}: stay at FP16 (or use bigger hardware)"


def _certainty(drop: float, ci: tuple[float, float], rule: DecisionRule, samples: int | None, unit: str) -> list[str]:
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ["the drop has no confidence interval; measure on more samples before trusting the verdict"]
    reasons = []
    if lo == hi == 0:
        reasons.append("the 95% interval of the drop is [0, 0]: no measurable difference on this validation set")
    elif lo <= 0 <= hi:
        reasons.append(f"the 95% interval of the drop [{lo:.2f}, {hi:.2f}] contains 0: the difference is within the noise "
                       "of this validation set")
    for threshold in sorted({rule.ship_below, rule.qat_up_to}):
        if lo < threshold < hi:
            reasons.append(_straddle(drop, (lo, hi), threshold, samples, unit))
    return reasons


def _straddle(drop: float, ci: tuple[float, float], threshold: float, samples: int | None, unit: str) -> str:
    lo, hi = ci
    text = (f"the 95% interval [{lo:.2f}, {hi:.2f}] straddles the {threshold:g}-{unit} threshold: "
            "the verdict could change with more validation data")
    needed = samples_to_settle(drop, ci, threshold, samples)
    if needed is not None:
        text += f"; about {needed:,} samples (now {samples:,}) would settle it"
    return text


def samples_to_settle(drop: float, ci: tuple[float, float], threshold: float, samples: int | None) -> int | None:
    """How many samples would shrink the interval to clear `threshold`, if the spread stays as measured.

    The half-width of an interval on a mean shrinks as 1/sqrt(n); None when the drop sits on the threshold.

    >>> samples_to_settle(1.5, (0.5, 2.5), 1.0, 200)
    800
    """
    half = (ci[1] - ci[0]) / 2
    gap = abs(drop - threshold)
    if not samples or gap == 0 or half <= 0:
        return None
    needed = samples * (half / gap) ** 2
    return _round_up(needed)


def _round_up(n: float) -> int:
    """Two significant digits, rounded up: an estimate should not look more precise than it is."""
    if n <= 100:
        return math.ceil(n)
    step = 10 ** (int(math.log10(n)) - 1)
    return int(math.ceil(n / step) * step)
