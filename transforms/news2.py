"""National Early Warning Score 2 (NEWS2) of one set of observations.

Implements Royal College of Physicians, *National Early Warning Score (NEWS) 2*,
2017: chart 1 (the NEWS2 scoring system) and the clinical response table
(aggregate score -> clinical risk band).

In:  the seven chart parameters, each a number in the chart's unit or None when
     it was not observed (window means from a wearable are real numbers, not the
     whole numbers a nurse charts: see "Rounding" below).
Out: `News2Result`: aggregate score, band ("low" | "low-medium" | "medium" |
     "high"), per-parameter scores, the parameters that were missing, and
     whether any single parameter scored 3.

Rounding. The chart's bands are written at the precision a nurse records:
whole numbers for respiration rate (breaths/min), SpO2 (%), systolic blood
pressure (mmHg) and pulse (beats/min), one decimal for temperature (°C). A
window mean is first rounded to that precision, half up (20.5 -> 21,
38.05 -> 38.1, 95.49 -> 95), and then scored. The rounding works on the decimal
value as printed (``repr``), so 38.05 rounds to 38.1 even though the nearest
binary float is a little below 38.05.

Missing parameters are never assumed normal: they score nothing, are listed in
``missing`` (chart order), and the aggregate covers only the parameters
present. A partial score can therefore under-state risk: a band computed
without, say, consciousness or oxygen is a lower bound, and callers must show
``missing`` next to it.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math

# Chart 1 row order; also the order of `News2Result.parameter_scores` and `.missing`.
PARAMETERS = (
    "respiratory_rate", "spo2", "supplemental_oxygen", "systolic_bp", "heart_rate", "consciousness",
    "temperature_c",
)
BANDS = ("low", "low-medium", "medium", "high")
CONSCIOUSNESS_SCORES = {"alert": 0, "new_confusion": 3, "voice": 3, "pain": 3, "unresponsive": 3}

_WHOLE = decimal.Decimal("1")
_TENTH = decimal.Decimal("0.1")


@dataclasses.dataclass(frozen=True)
class News2Result:
    """One NEWS2 assessment.

    Attributes:
      score: aggregate of `parameter_scores` (0..20), over the parameters present only.
      band: clinical risk band from the RCP clinical response table.
      parameter_scores: parameter name -> its chart score (0..3), for each parameter scored, chart order.
      missing: parameters that could not be scored (absent), chart order.
      any_single_three: some parameter scored 3 (a "red score").
    """

    score: int
    band: str
    parameter_scores: dict[str, int]
    missing: tuple[str, ...]
    any_single_three: bool


def score_news2(*, respiratory_rate: float | None, spo2: float | None, systolic_bp: float | None,
                heart_rate: float | None, temperature_c: float | None, consciousness: str | None,
                supplemental_oxygen: bool | None, spo2_scale: int = 1) -> News2Result:
    """Scores one set of observations on NEWS2 chart 1 and bands the aggregate.

    Args:
      respiratory_rate: breaths per minute, or None.
      spo2: peripheral oxygen saturation, percent, or None.
      systolic_bp: systolic blood pressure, mmHg, or None.
      heart_rate: pulse, beats per minute, or None.
      temperature_c: body temperature, °C, or None.
      consciousness: ACVPU level, one of `CONSCIOUSNESS_SCORES` ("alert", "new_confusion", "voice",
        "pain", "unresponsive"), or None.
      supplemental_oxygen: True on oxygen, False on air, None when unknown.
      spo2_scale: 1 (default) or 2. Chart 1 reserves scale 2 for patients with confirmed hypercapnic
        respiratory failure, prescribed by a clinician; on scale 2 an SpO2 of 93% or more scores by
        whether the patient is on oxygen, so with oxygen unknown such a reading cannot be scored and
        "spo2" is listed as missing.

    Returns:
      `News2Result`; numbers are rounded to the chart's precision first (module docstring).

    Raises:
      ValueError: an unknown consciousness level or SpO2 scale, or a number that is NaN or infinite.
    """
    if spo2_scale not in (1, 2):
        raise ValueError(f"spo2_scale must be 1 or 2, got {spo2_scale!r}")
    if consciousness is not None and consciousness not in CONSCIOUSNESS_SCORES:
        raise ValueError(f"unknown consciousness level {consciousness!r}; expected one of "
                         f"{tuple(CONSCIOUSNESS_SCORES)}")
    scores = {
        "respiratory_rate": _maybe(_respiration_score, respiratory_rate, _WHOLE, "respiratory_rate"),
        "spo2": _spo2_score(spo2, supplemental_oxygen, spo2_scale),
        "supplemental_oxygen": None if supplemental_oxygen is None else (2 if supplemental_oxygen else 0),
        "systolic_bp": _maybe(_systolic_score, systolic_bp, _WHOLE, "systolic_bp"),
        "heart_rate": _maybe(_pulse_score, heart_rate, _WHOLE, "heart_rate"),
        "consciousness": None if consciousness is None else CONSCIOUSNESS_SCORES[consciousness],
        "temperature_c": _maybe(_temperature_score, temperature_c, _TENTH, "temperature_c"),
    }
    present = {name: score for name, score in scores.items() if score is not None}
    total = sum(present.values())
    any_single_three = any(score == 3 for score in present.values())
    return News2Result(
        score=total,
        band=news2_band(total, any_single_three),
        parameter_scores=present,
        missing=tuple(name for name in PARAMETERS if scores[name] is None),
        any_single_three=any_single_three,
    )


def news2_band(score: int, any_single_three: bool) -> str:
    """Aggregate score and red-score flag -> clinical risk band (RCP 2017 clinical response table).

    7 or more is high; 5-6 is medium; 0-4 is low-medium when any single parameter scored 3
    (the "red score", which triggers an urgent ward-based response), low otherwise.
    """
    if score >= 7:
        return "high"
    if score >= 5:
        return "medium"
    return "low-medium" if any_single_three else "low"


@functools.lru_cache(maxsize=1 << 14)
def round_to_chart(value: float, precision: decimal.Decimal) -> decimal.Decimal:
    """A measurement -> the value a nurse would chart: `precision` 1 or 0.1, half up, on the printed decimal.

    Cached: window means of steady readings repeat (a constant 36.8 °C, whole-number SpO2).
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot score a non-finite value {value!r}")
    return decimal.Decimal(repr(float(value))).quantize(precision, rounding=decimal.ROUND_HALF_UP)


def _maybe(score_fn, value, precision, name):
    if value is None:
        return None
    try:
        return score_fn(round_to_chart(value, precision))
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _respiration_score(rate: decimal.Decimal) -> int:
    # Chart 1, respiration rate per minute: <=8 | 9-11 | 12-20 | 21-24 | >=25.
    if rate <= 8:
        return 3
    if rate <= 11:
        return 1
    if rate <= 20:
        return 0
    if rate <= 24:
        return 2
    return 3


def _spo2_score(spo2: float | None, supplemental_oxygen: bool | None, scale: int) -> int | None:
    if spo2 is None:
        return None
    try:
        saturation = round_to_chart(spo2, _WHOLE)
    except ValueError as error:
        raise ValueError(f"spo2: {error}") from None
    if scale == 1:
        # Chart 1, SpO2 scale 1 (%): <=91 | 92-93 | 94-95 | >=96.
        if saturation <= 91:
            return 3
        if saturation <= 93:
            return 2
        if saturation <= 95:
            return 1
        return 0
    # Chart 1, SpO2 scale 2 (%), hypercapnic respiratory failure: <=83 | 84-85 | 86-87 | 88-92 or >=93 on air
    # score 0; on oxygen 93-94 | 95-96 | >=97 score 1 | 2 | 3 (over-oxygenation is itself a risk).
    if saturation <= 83:
        return 3
    if saturation <= 85:
        return 2
    if saturation <= 87:
        return 1
    if saturation <= 92:
        return 0
    if supplemental_oxygen is None:
        return None  # 0 on air, 1-3 on oxygen: unknown oxygen is not assumed to be air
    if not supplemental_oxygen:
        return 0
    if saturation <= 94:
        return 1
    if saturation <= 96:
        return 2
    return 3


def _systolic_score(pressure: decimal.Decimal) -> int:
    # Chart 1, systolic blood pressure (mmHg): <=90 | 91-100 | 101-110 | 111-219 | >=220.
    if pressure <= 90:
        return 3
    if pressure <= 100:
        return 2
    if pressure <= 110:
        return 1
    if pressure <= 219:
        return 0
    return 3


def _pulse_score(pulse: decimal.Decimal) -> int:
    # Chart 1, pulse per minute: <=40 | 41-50 | 51-90 | 91-110 | 111-130 | >=131.
    if pulse <= 40:
        return 3
    if pulse <= 50:
        return 1
    if pulse <= 90:
        return 0
    if pulse <= 110:
        return 1
    if pulse <= 130:
        return 2
    return 3


def _temperature_score(temperature: decimal.Decimal) -> int:
    # Chart 1, temperature (°C): <=35.0 | 35.1-36.0 | 36.1-38.0 | 38.1-39.0 | >=39.1.
    if temperature <= decimal.Decimal("35.0"):
        return 3
    if temperature <= decimal.Decimal("36.0"):
        return 1
    if temperature <= decimal.Decimal("38.0"):
        return 0
    if temperature <= decimal.Decimal("39.0"):
        return 1
    return 2
