"""The decision rule: each verdict at and around its thresholds, and reasons that say how sure the drop is."""
from __future__ import annotations

import math

import pytest

from edgeq.decide import DecisionRule, decide, samples_to_settle
from edgeq.errors import ConfigError


@pytest.mark.parametrize(("drop", "verdict"), [(-0.5, "ship"), (0.0, "ship"), (0.99, "ship"), (1.0, "try-qat"),
                                               (2.0, "try-qat"), (3.0, "try-qat"), (3.01, "stay-fp16"), (12.0, "stay-fp16")])
def test_each_verdict_by_the_drop(drop, verdict):
    assert decide(drop, (drop - 0.001, drop + 0.001), DecisionRule()).verdict == verdict


def test_custom_thresholds():
    rule = DecisionRule(ship_below=0.5, qat_up_to=0.5)
    assert decide(0.4, (0.39, 0.41), rule).verdict == "ship"
    assert decide(0.5, (0.49, 0.51), rule).verdict == "try-qat"
    assert decide(0.6, (0.59, 0.61), rule).verdict == "stay-fp16"
    assert decide(0.0, (0.0, 0.0), DecisionRule(ship_below=0, qat_up_to=0)).verdict == "ship"


@pytest.mark.parametrize(("ship_below", "qat_up_to"), [(-1, 3), (4, 3), (math.nan, 3), (1, math.inf)])
def test_invalid_rules_are_config_errors(ship_below, qat_up_to):
    with pytest.raises(ConfigError, match="ship_below"):
        DecisionRule(ship_below=ship_below, qat_up_to=qat_up_to)


def test_reasons_carry_the_numbers():
    verdict = decide(2.25, (2.1, 2.4), DecisionRule())
    assert verdict.reasons == ["the drop of 2.25 points is between 1 and 3 points: try quantization-aware training, then measure again"]


def test_negative_drop_says_the_candidate_is_better():
    verdict = decide(-1.5, (-2.0, -1.0), DecisionRule())
    assert verdict.verdict == "ship" and "1.50 points better" in verdict.reasons[0]


def test_within_noise_is_said():
    verdict = decide(0.3, (-0.2, 0.8), DecisionRule())
    assert verdict.verdict == "ship"
    assert any("contains 0" in r and "noise" in r for r in verdict.reasons)


def test_straddling_a_threshold_says_how_much_data_would_settle_it():
    verdict = decide(1.5, (0.5, 2.5), DecisionRule(), samples=200)
    straddle = [r for r in verdict.reasons if "straddles the 1-points threshold" in r]
    assert straddle and "about 800 samples (now 200)" in straddle[0]
    assert not any("3-points" in r for r in verdict.reasons)


def test_an_interval_over_both_thresholds_names_both():
    reasons = decide(2.0, (0.2, 3.8), DecisionRule(), samples=1000).reasons
    assert sum("straddles" in r for r in reasons) == 2


def test_samples_to_settle():
    assert samples_to_settle(1.5, (0.5, 2.5), 1.0, 200) == 800
    assert samples_to_settle(1.0, (0.5, 1.5), 1.0, 200) is None     # on the threshold: no amount of data decides
    assert samples_to_settle(1.5, (0.5, 2.5), 1.0, None) is None
    assert samples_to_settle(1.1, (0.1, 2.1), 1.0, 1000) == 100_000  # 2 significant digits, rounded up


def test_unmeasurable_drop_stays_fp16():
    assert decide(math.nan, (math.nan, math.nan)).verdict == "stay-fp16"


def test_verdict_to_dict():
    assert decide(0.1, (0.0, 0.2)).to_dict()["verdict"] == "ship"


def test_no_difference_at_all_is_said_plainly():
    reasons = decide(0.0, (0.0, 0.0)).reasons
    assert reasons == ["the candidate scores the same as the base (no loss): ship it",
                       "the 95% interval of the drop is [0, 0]: no measurable difference on this validation set"]
