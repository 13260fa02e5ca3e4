"""NEWS2 scoring against RCP 2017 chart 1 and the clinical response table.

Every edge of every chart row is checked from both sides; the expected scores
are read off the chart, not computed.
"""

import numpy as np
import pytest

from transforms.news2 import PARAMETERS, News2Result, news2_band, score_news2

ABSENT = dict(respiratory_rate=None, spo2=None, systolic_bp=None, heart_rate=None, temperature_c=None,
              consciousness=None, supplemental_oxygen=None)
NORMAL = dict(respiratory_rate=16, spo2=97, systolic_bp=122, heart_rate=72, temperature_c=36.8,
              consciousness="alert", supplemental_oxygen=False)


def _only(**given) -> News2Result:
    return score_news2(**{**ABSENT, **given})


def _patient(**changes) -> News2Result:
    return score_news2(**{**NORMAL, **changes})


# (value, chart score): both sides of every edge, and the ends of the plausible range.
RESPIRATION = [(3, 3), (8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3), (60, 3)]
SPO2_SCALE_1 = [(50, 3), (91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (100, 0)]
SYSTOLIC = [(40, 3), (90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0), (220, 3), (260, 3)]
PULSE = [(20, 3), (40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1), (111, 2), (130, 2), (131, 3),
         (250, 3)]
TEMPERATURE = [(30.0, 3), (35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1), (39.0, 1), (39.1, 2),
               (43.0, 2)]


@pytest.mark.parametrize("rate,expected", RESPIRATION)
def test_respiration_rate_bands(rate, expected):
    assert _only(respiratory_rate=rate).parameter_scores == {"respiratory_rate": expected}


@pytest.mark.parametrize("saturation,expected", SPO2_SCALE_1)
@pytest.mark.parametrize("oxygen", [None, False, True])
def test_spo2_scale_1_bands_do_not_depend_on_oxygen(saturation, expected, oxygen):
    assert _only(spo2=saturation, supplemental_oxygen=oxygen).parameter_scores["spo2"] == expected


# Scale 2 up to 92% scores the same on air or oxygen.
SPO2_SCALE_2_LOW = [(50, 3), (83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0)]
# From 93% the score depends on oxygen: 0 on air; 93-94 | 95-96 | >=97 score 1 | 2 | 3 on oxygen.
SPO2_SCALE_2_HIGH = [(92, False, 0), (92, True, 0), (93, False, 0), (93, True, 1), (94, True, 1), (95, True, 2),
                     (96, True, 2), (97, True, 3), (100, True, 3), (97, False, 0), (100, False, 0)]


@pytest.mark.parametrize("saturation,expected", SPO2_SCALE_2_LOW)
@pytest.mark.parametrize("oxygen", [None, False, True])
def test_spo2_scale_2_bands_up_to_92(saturation, expected, oxygen):
    result = _only(spo2=saturation, supplemental_oxygen=oxygen, spo2_scale=2)
    assert result.parameter_scores["spo2"] == expected


@pytest.mark.parametrize("saturation,oxygen,expected", SPO2_SCALE_2_HIGH)
def test_spo2_scale_2_bands_from_93_depend_on_oxygen(saturation, oxygen, expected):
    result = _only(spo2=saturation, supplemental_oxygen=oxygen, spo2_scale=2)
    assert result.parameter_scores["spo2"] == expected


@pytest.mark.parametrize("saturation", [93, 97])
def test_spo2_scale_2_from_93_with_oxygen_unknown_is_missing_not_assumed_air(saturation):
    result = _only(spo2=saturation, spo2_scale=2)
    assert "spo2" not in result.parameter_scores
    assert result.missing == PARAMETERS


@pytest.mark.parametrize("oxygen,expected", [(True, 2), (False, 0)])
def test_air_or_oxygen(oxygen, expected):
    assert _only(supplemental_oxygen=oxygen).parameter_scores == {"supplemental_oxygen": expected}


@pytest.mark.parametrize("pressure,expected", SYSTOLIC)
def test_systolic_bp_bands(pressure, expected):
    assert _only(systolic_bp=pressure).parameter_scores == {"systolic_bp": expected}


@pytest.mark.parametrize("pulse,expected", PULSE)
def test_pulse_bands(pulse, expected):
    assert _only(heart_rate=pulse).parameter_scores == {"heart_rate": expected}


@pytest.mark.parametrize("level,expected", [("alert", 0), ("new_confusion", 3), ("voice", 3), ("pain", 3),
                                            ("unresponsive", 3)])
def test_consciousness(level, expected):
    assert _only(consciousness=level).parameter_scores == {"consciousness": expected}


@pytest.mark.parametrize("temperature,expected", TEMPERATURE)
def test_temperature_bands(temperature, expected):
    assert _only(temperature_c=temperature).parameter_scores == {"temperature_c": expected}


# Window means round half up to the chart's precision before scoring.
ROUNDING = [
    ("respiratory_rate", 20.4, 0), ("respiratory_rate", 20.49, 0), ("respiratory_rate", 20.5, 2),
    ("respiratory_rate", 8.49, 3), ("respiratory_rate", 8.5, 1), ("respiratory_rate", 24.5, 3),
    ("spo2", 95.49, 1), ("spo2", 95.5, 0), ("spo2", 91.5, 2),
    ("systolic_bp", 90.49, 3), ("systolic_bp", 90.5, 2), ("systolic_bp", 219.5, 3),
    ("heart_rate", 90.49, 0), ("heart_rate", 90.5, 1), ("heart_rate", 40.5, 1),
    ("temperature_c", 35.04, 3), ("temperature_c", 35.05, 1), ("temperature_c", 38.04, 0),
    ("temperature_c", 38.05, 1),   # the binary float is 38.04999...; the printed decimal rounds up
    ("temperature_c", 39.049, 1), ("temperature_c", 39.05, 2),
]


@pytest.mark.parametrize("name,value,expected", ROUNDING)
def test_window_means_round_half_up_to_chart_precision(name, value, expected):
    assert _only(**{name: value}).parameter_scores[name] == expected
    assert _only(**{name: np.float64(value)}).parameter_scores[name] == expected


@pytest.mark.parametrize("score,red,band", [
    (0, False, "low"), (4, False, "low"),
    (3, True, "low-medium"), (4, True, "low-medium"),
    (5, False, "medium"), (5, True, "medium"), (6, True, "medium"),
    (7, False, "high"), (7, True, "high"), (20, True, "high"),
])
def test_band_edges(score, red, band):
    assert news2_band(score, red) == band


@pytest.mark.parametrize("changes,score,band,red", [
    # RR 21 (2) + pulse 91 (1) + temp 38.1 (1) = 4, no red score -> low
    (dict(respiratory_rate=21, heart_rate=91, temperature_c=38.1), 4, "low", False),
    # RR 21 (2) + pulse 111 (2) + temp 38.1 (1) = 5 -> medium
    (dict(respiratory_rate=21, heart_rate=111, temperature_c=38.1), 5, "medium", False),
    # RR 21 (2) + pulse 111 (2) + temp 39.1 (2) = 6 -> medium
    (dict(respiratory_rate=21, heart_rate=111, temperature_c=39.1), 6, "medium", False),
    # RR 21 (2) + pulse 111 (2) + temp 39.1 (2) + SBP 110 (1) = 7 -> high
    (dict(respiratory_rate=21, heart_rate=111, temperature_c=39.1, systolic_bp=110), 7, "high", False),
    # RR 25 (3) alone = 3, a red score -> low-medium
    (dict(respiratory_rate=25), 3, "low-medium", True),
    # SBP 90 (3) + pulse 91 (1) = 4 with a red score -> low-medium
    (dict(systolic_bp=90, heart_rate=91), 4, "low-medium", True),
    # voice (3) + RR 21 (2) = 5: medium outranks the red-score rule
    (dict(consciousness="voice", respiratory_rate=21), 5, "medium", True),
])
def test_whole_patient_band_edges(changes, score, band, red):
    result = _patient(**changes)
    assert (result.score, result.band, result.any_single_three) == (score, band, red)
    assert result.score == sum(result.parameter_scores.values())
    assert result.missing == ()


def test_healthy_adult_scores_zero():
    # RR 16 (0), SpO2 97 (0), air (0), SBP 122 (0), pulse 72 (0), alert (0), 36.8 °C (0) = 0 -> low
    result = _patient()
    assert result == News2Result(score=0, band="low", parameter_scores={name: 0 for name in PARAMETERS},
                                 missing=(), any_single_three=False)
    assert tuple(result.parameter_scores) == PARAMETERS


def test_septic_patient_scores_high():
    # RR 24 (2), SpO2 93 scale 1 (2), oxygen (2), SBP 98 (2), pulse 118 (2), new confusion (3),
    # 38.9 °C (1) = 14 -> high
    result = score_news2(respiratory_rate=24, spo2=93, supplemental_oxygen=True, systolic_bp=98, heart_rate=118,
                         consciousness="new_confusion", temperature_c=38.9)
    assert result.parameter_scores == {"respiratory_rate": 2, "spo2": 2, "supplemental_oxygen": 2, "systolic_bp": 2,
                                       "heart_rate": 2, "consciousness": 3, "temperature_c": 1}
    assert (result.score, result.band, result.any_single_three) == (14, "high", True)


def test_copd_patient_on_scale_2():
    # RR 22 (2), SpO2 90 on scale 2 (0: 88-92 is the target range), oxygen (2), SBP 135 (0), pulse 95 (1),
    # alert (0), 37.2 °C (0) = 5 -> medium. The same SpO2 on scale 1 scores 3, giving 8 -> high.
    vitals = dict(respiratory_rate=22, spo2=90, supplemental_oxygen=True, systolic_bp=135, heart_rate=95,
                  consciousness="alert", temperature_c=37.2)
    scale_2 = score_news2(**vitals, spo2_scale=2)
    assert (scale_2.score, scale_2.band, scale_2.parameter_scores["spo2"]) == (5, "medium", 0)
    scale_1 = score_news2(**vitals)
    assert (scale_1.score, scale_1.band, scale_1.parameter_scores["spo2"]) == (8, "high", 3)


def test_wearable_window_means():
    # RR 20.6 -> 21 (2), SpO2 95.4 -> 95 (1), SBP 110.5 -> 111 (0), pulse 50.5 -> 51 (0),
    # 38.04 °C -> 38.0 (0), alert (0), air (0) = 3, no red score -> low
    result = _patient(respiratory_rate=20.6, spo2=95.4, systolic_bp=110.5, heart_rate=50.5, temperature_c=38.04)
    assert result.parameter_scores == {"respiratory_rate": 2, "spo2": 1, "supplemental_oxygen": 0, "systolic_bp": 0,
                                       "heart_rate": 0, "consciousness": 0, "temperature_c": 0}
    assert (result.score, result.band) == (3, "low")


def test_nothing_observed_scores_nothing_and_lists_everything_missing():
    result = score_news2(**ABSENT)
    assert result == News2Result(score=0, band="low", parameter_scores={}, missing=PARAMETERS,
                                 any_single_three=False)


def test_missing_parameters_are_listed_in_chart_order_and_not_scored():
    # A wearable window: no nurse observation yet, so consciousness and oxygen are missing.
    # RR 26 (3) + pulse 135 (3) + the rest normal = 6 over the five present -> medium (a lower bound).
    result = _patient(respiratory_rate=26, heart_rate=135, consciousness=None, supplemental_oxygen=None)
    assert result.missing == ("supplemental_oxygen", "consciousness")
    assert set(result.parameter_scores) == set(PARAMETERS) - set(result.missing)
    assert (result.score, result.band) == (6, "medium")
    # The same patient found responsive only to voice is high: the partial score under-stated the risk.
    assert _patient(respiratory_rate=26, heart_rate=135, consciousness="voice").band == "high"


def test_missing_is_never_assumed_normal_or_abnormal():
    partial = _only(heart_rate=135)
    assert partial.score == 3
    assert partial.missing == tuple(name for name in PARAMETERS if name != "heart_rate")


@pytest.mark.parametrize("level", ["Alert", "confused", "A", ""])
def test_unknown_consciousness_is_rejected(level):
    with pytest.raises(ValueError, match="consciousness"):
        _only(consciousness=level)


@pytest.mark.parametrize("scale", [0, 3])
def test_unknown_spo2_scale_is_rejected(scale):
    with pytest.raises(ValueError, match="spo2_scale"):
        _only(spo2=95, spo2_scale=scale)


@pytest.mark.parametrize("name", ["respiratory_rate", "spo2", "systolic_bp", "heart_rate", "temperature_c"])
def test_non_finite_values_are_rejected_naming_the_parameter(name):
    with pytest.raises(ValueError, match=name):
        _only(**{name: float("nan")})
