"""Patients: who they are, what their bodies do, and what their wearables and nurses report.

Flow for one patient (each step takes its own `np.random.Generator`):

* `make_patient` (index, cohort role) -> `Patient`: identity (PHI that only ever
  goes into DICOM headers), baseline physiology, sleep and activity habits, and
  an `InfectionCourse` for the infected.
* `simulate_vitals` (Patient, period) -> `VitalSeries`: one sample every
  `sample_seconds`, computed column-wise with numpy: circadian rhythm, sleep
  stages, activity bursts, the infection, sensor noise, missing readings and
  off-wrist gaps.
* `phone_uploads` -> `Upload`s: the phone syncs every ~5 minutes, sometimes
  retries an upload it already delivered, sometimes is offline for hours and
  then sends one big late upload. `upload_records` turns them into
  WearableUpload JSON records.
* `nurse_observations` -> ClinicalObservation records every ~4 hours, hourly
  once the patient deteriorates.

Times inside this module are float seconds after the simulation start. The
hospital clock is UTC (a UK hospital in March), so the clock hour is the UTC hour.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid

import numpy as np

from schemas.contract import format_timestamp
from schemas.inputs import SLEEP_STAGES, VITAL_NAMES
from simulator.dicom import PatientIdentity
from simulator.writers import Landed

AWAKE, LIGHT, DEEP, REM = (SLEEP_STAGES.index(s) for s in ("awake", "light", "deep", "rem"))
_COLUMN = {name: i for i, name in enumerate(VITAL_NAMES)}
SYNC_INTERVAL_S = (240.0, 360.0)      # the phone app syncs every 4-6 minutes
RETRY_PROBABILITY = 0.03              # the server stored the upload but the phone never saw the ack
ROUND_INTERVAL_S = 4 * 3600.0         # routine nursing observations
ESCALATED_INTERVAL_S = 3600.0         # NEWS2 >= 5 calls for at least hourly observations (RCP 2017)
OXYGEN_START_SPO2 = 92.0              # nurses start oxygen below a SpO2 of 92 % (BTS target 94-98 %)

_GIVEN = {
    "M": ("Oliver", "George", "Harry", "Jack", "Mohammed", "Arjun", "Tomasz", "Kwame", "David", "James",
          "Liam", "Daniel", "Wei", "Samuel", "Patrick", "Ibrahim", "Luca", "Connor", "Rhys", "Matthew"),
    "F": ("Olivia", "Amelia", "Isla", "Ava", "Fatima", "Priya", "Zofia", "Ama", "Sarah", "Emily",
          "Grace", "Chloe", "Mei", "Hannah", "Aoife", "Aisha", "Sofia", "Niamh", "Megan", "Ruth"),
}
_FAMILY = ("Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Wilson", "Thomas", "Johnson",
           "Roberts", "Robinson", "Thompson", "Wright", "Walker", "White", "Edwards", "Hughes", "Green", "Hall",
           "Khan", "Patel", "Ahmed", "Nowak", "Mensah", "Okafor", "O'Brien", "Chen", "Singh", "Kowalski",
           "Murphy", "Campbell")
_STREETS = ("Station Road", "Church Lane", "Victoria Street", "Mill Lane", "Park Avenue", "Queens Road",
            "Manor Close", "Kingsway", "Orchard Way", "Elm Grove", "Canal Street", "Beech Drive")
_TOWNS = ("Northgate", "Ashby Vale", "Holmbridge", "Kirkwood", "Eastmere")


@dataclasses.dataclass(frozen=True)
class InfectionCourse:
    """A COVID-like deterioration: vitals move from baseline towards these targets.

    onset_s: seconds after the start when it begins; ramp_s: seconds to full effect.
    Targets: peak temperature (°C), peak respiratory rate (/min), SpO2 nadir (%),
    heart-rate rise (bpm), systolic drop (mmHg).
    """

    onset_s: float
    ramp_s: float
    severe: bool
    peak_temperature_c: float
    peak_respiratory_rate: float
    nadir_spo2: float
    heart_rate_rise: float
    systolic_drop: float
    becomes_confused: bool

    def progress(self, seconds: np.ndarray | float) -> np.ndarray:
        """0 before onset, rising smoothly to 1 at onset + ramp."""
        t = np.clip((np.asarray(seconds, dtype=np.float64) - self.onset_s) / self.ramp_s, 0.0, 1.0)
        return t * t * (3 - 2 * t)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """Resting values when healthy and awake at the 24-h mean: bpm, °C, /min, %, mmHg."""

    heart_rate: float
    circadian_amplitude: float
    temperature_c: float
    respiratory_rate: float
    spo2: float
    systolic_bp: float
    diastolic_bp: float


@dataclasses.dataclass(frozen=True)
class Habits:
    """Bedtime and wake-up (clock hours), wrist-cuff BP interval (s), walks per waking hour."""

    bedtime_h: float
    wake_h: float
    bp_interval_s: float
    walks_per_hour: float


@dataclasses.dataclass(frozen=True)
class Patient:
    index: int
    identity: PatientIdentity
    wearable_id: str
    baseline: Baseline
    habits: Habits
    course: InfectionCourse | None

    @property
    def patient_id(self) -> str:
        return self.identity.patient_id

    def true_spo2(self, seconds: float) -> float:
        """Noise-free SpO2 (%) at `seconds`, what a bedside oximeter shows the nurse."""
        if self.course is None:
            return self.baseline.spo2
        drop = self.baseline.spo2 - self.course.nadir_spo2
        return float(self.baseline.spo2 - drop * self.course.progress(seconds))


@dataclasses.dataclass(frozen=True)
class VitalSeries:
    """One patient's samples over the period, off-wrist gaps already removed.

    seconds: (n,) float64 sample times after the start; vitals: (n, 6) float64 in
    `VITAL_NAMES` order, NaN where not reported; steps: (n,) int64 steps since the
    previous sample; sleep_stages: (n,) int8 indices into `SLEEP_STAGES`.
    """

    seconds: np.ndarray
    vitals: np.ndarray
    steps: np.ndarray
    sleep_stages: np.ndarray


@dataclasses.dataclass(frozen=True)
class Upload:
    """One upload attempt: samples series[first:stop], arriving `arrival_s` after the start.

    is_retry: a second delivery of an upload already stored (same id, same samples).
    offline_s: how long the phone had been offline before this sync (0 if it had not).
    """

    upload_id: str
    arrival_s: float
    first: int
    stop: int
    is_retry: bool
    offline_s: float


def scrambled_number(index: int, seed: int, salt: int, digits: int) -> int:
    """A number of `digits` decimal digits, unique per index (< 10**digits) for one seed and salt:
    an affine map with a multiplier coprime to 10 is a bijection modulo 10**digits."""
    modulus = 10 ** digits
    offset = (seed * 2654435761 + salt * 40503) % modulus
    return (387403 * index + offset) % modulus


def make_patient(index: int, rng: np.random.Generator, *, seed: int, start: dt.datetime, hours: float,
                 infected: bool, severe: bool) -> Patient:
    """Draw one patient admitted at `start`. hours: the simulated period, within which an
    infection (when `infected`) starts and peaks."""
    sex = "O" if rng.random() < 0.01 else ("M" if rng.random() < 0.5 else "F")
    given = _GIVEN[sex if sex != "O" else ("M", "F")[int(rng.integers(2))]]
    age = float(np.clip(rng.normal(62, 16), 18, 95))
    birth = start.date() - dt.timedelta(days=int(age * 365.25))
    address = (f"{int(rng.integers(1, 200))} {_STREETS[int(rng.integers(len(_STREETS)))]}, "
               f"{_TOWNS[int(rng.integers(len(_TOWNS)))]} NG{int(rng.integers(1, 10))} "
               f"{int(rng.integers(1, 10))}{''.join(rng.choice(list('ABDEFGHJLNPQRSTUWXYZ'), 2))}")
    identity = PatientIdentity(
        patient_id=f"MRN-{scrambled_number(index, seed, 1, 6):06d}",
        name=f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{given[int(rng.integers(len(given)))]}",
        birth_date=birth.strftime("%Y%m%d"), sex=sex, address=address)
    older = (age - 60) / 30
    systolic = float(np.clip(rng.normal(122 + 8 * older, 12), 98, 165))
    baseline = Baseline(
        heart_rate=float(np.clip(rng.normal(72, 8), 54, 96)),
        circadian_amplitude=float(rng.uniform(4, 8)),
        temperature_c=float(rng.normal(36.7, 0.15)),
        respiratory_rate=float(np.clip(rng.normal(15, 1.5), 12, 19)),
        spo2=float(np.clip(rng.normal(97.2 - 0.8 * older, 0.9), 95, 99.5)),
        systolic_bp=systolic,
        diastolic_bp=float(np.clip(systolic * 0.62 + rng.normal(0, 5), 58, 100)),
    )
    habits = Habits(bedtime_h=float(rng.uniform(22.0, 23.75)), wake_h=float(rng.uniform(5.75, 7.25)),
                    bp_interval_s=60.0 * float(rng.choice([5, 10, 15])),
                    walks_per_hour=float(rng.uniform(0.4, 1.5)))
    course = _infection_course(rng, hours, severe) if infected else None
    return Patient(index=index, identity=identity, wearable_id=f"WB-{scrambled_number(index, seed, 2, 8):08d}",
                   baseline=baseline, habits=habits, course=course)


def _infection_course(rng: np.random.Generator, hours: float, severe: bool) -> InfectionCourse:
    # Real COVID-19 deteriorates over days; the course is compressed so that it starts and peaks
    # inside the simulated period, whatever its length.
    period_s = hours * 3600
    onset_s = rng.uniform(0.05, 0.45) * period_s
    ramp_s = float(np.clip(rng.uniform(0.25, 0.4) * period_s, 1800, 8 * 3600))
    if severe:  # NEWS2 >= 7 from the wearable alone: RR >= 25 (3), SpO2 <= 91 (3), temperature >= 39.1 (2)
        targets = (rng.uniform(39.15, 39.5), rng.uniform(25.5, 30), rng.uniform(86, 90), rng.uniform(25, 40),
                   rng.uniform(10, 25))
    else:
        targets = (rng.uniform(38.5, 39.0), rng.uniform(22, 24), rng.uniform(90.5, 92), rng.uniform(12, 22), 0.0)
    return InfectionCourse(onset_s=float(onset_s), ramp_s=ramp_s, severe=severe,
                           peak_temperature_c=float(targets[0]), peak_respiratory_rate=float(targets[1]),
                           nadir_spo2=float(targets[2]), heart_rate_rise=float(targets[3]),
                           systolic_drop=float(targets[4]), becomes_confused=bool(severe and rng.random() < 0.5))


def simulate_vitals(patient: Patient, rng: np.random.Generator, *, start: dt.datetime, hours: float,
                    sample_seconds: float) -> VitalSeries:
    """Every sample of the period for one patient, before any upload logic."""
    n = int(hours * 3600 // sample_seconds)
    seconds = rng.uniform(0, sample_seconds) + sample_seconds * np.arange(n)
    start_hour = start.hour + start.minute / 60 + start.second / 3600
    clock_h = (start_hour + seconds / 3600) % 24
    circadian = np.cos(2 * np.pi * (clock_h - 16) / 24)  # peak late afternoon, trough around 04:00
    stages = _sleep_stages(rng, seconds, start_hour, patient.habits)
    progress = patient.course.progress(seconds) if patient.course else np.zeros(n)
    cadence = _walking_cadence(rng, seconds, sample_seconds, stages, patient.habits, progress)
    exertion = _exponential_smooth(cadence / 100.0, sample_seconds, tau_s=60.0)
    awake_shuffle = np.where(stages == AWAKE, 0.3, 0.0)  # steps per minute pottering around the bed
    steps = np.minimum(rng.poisson((cadence + awake_shuffle) * sample_seconds / 60), 1000).astype(np.int64)

    vitals = _vitals(patient, rng, sample_seconds, circadian, stages, exertion, progress)
    _drop_readings(rng, vitals, seconds, exertion, patient.habits.bp_interval_s)
    worn = _worn_mask(rng, seconds, hours)
    return VitalSeries(seconds=seconds[worn], vitals=vitals[worn], steps=steps[worn], sleep_stages=stages[worn])


def _vitals(patient: Patient, rng: np.random.Generator, sample_seconds: float, circadian: np.ndarray,
            stages: np.ndarray, exertion: np.ndarray, progress: np.ndarray) -> np.ndarray:
    """(n, 6) readings in VITAL_NAMES order, rounded as a wearable reports them.

    circadian: (n,) in [-1, 1]; stages: (n,) sleep stage indices; exertion: (n,) smoothed walking
    effort (1 at 100 steps/min); progress: (n,) infection course in [0, 1].
    """
    n = circadian.size
    asleep = (stages != AWAKE).astype(np.float64)
    b, c = patient.baseline, patient.course
    sleep_dip = np.zeros(len(SLEEP_STAGES))
    sleep_dip[[LIGHT, DEEP, REM]] = (-4.0, -8.0, -1.0)  # heart rate falls most in deep sleep, least in REM
    heart_rate = (b.heart_rate + b.circadian_amplitude * circadian + 28 * exertion + sleep_dip[stages]
                  + (c.heart_rate_rise * progress if c else 0)
                  + _slow_noise(rng, n, sample_seconds, 600, 2.5) + rng.normal(0, 1.5, n))
    temperature = (b.temperature_c + 0.25 * circadian - 0.1 * asleep
                   + ((c.peak_temperature_c - b.temperature_c) * progress if c else 0)
                   + _slow_noise(rng, n, sample_seconds, 1800, 0.08) + rng.normal(0, 0.04, n))
    respiratory = (b.respiratory_rate + 0.4 * circadian - 1.0 * asleep + 6 * exertion
                   + ((c.peak_respiratory_rate - b.respiratory_rate) * progress if c else 0)
                   + _slow_noise(rng, n, sample_seconds, 600, 0.6) + rng.normal(0, 0.8, n))
    spo2 = (b.spo2 - 0.8 * asleep - ((b.spo2 - c.nadir_spo2) * progress if c else 0)
            + _slow_noise(rng, n, sample_seconds, 900, 0.4) + rng.normal(0, 0.6, n))
    drop = c.systolic_drop * progress if c else 0
    systolic = (b.systolic_bp + 5 * circadian - 10 * asleep + 12 * exertion - drop
                + _slow_noise(rng, n, sample_seconds, 1800, 3.0) + rng.normal(0, 4, n))
    diastolic = (b.diastolic_bp + 3 * circadian - 7 * asleep + 5 * exertion - 0.5 * drop
                 + _slow_noise(rng, n, sample_seconds, 1800, 2.0) + rng.normal(0, 3, n))
    diastolic = np.minimum(diastolic, systolic - 15)

    return np.column_stack([
        np.rint(np.clip(heart_rate, 30, 200)), np.rint(np.clip(spo2, 70, 100)),
        np.rint(np.clip(systolic, 70, 220)), np.rint(np.clip(diastolic, 40, 130)),
        np.round(np.clip(temperature, 34, 42), 2), np.rint(np.clip(respiratory, 6, 45)),
    ])


def _sleep_stages(rng: np.random.Generator, seconds: np.ndarray, start_hour: float, habits: Habits) -> np.ndarray:
    """(n,) int8 stage per sample: ~90-minute cycles of light, deep, light, REM sleep, deep sleep
    shrinking and REM growing through the night, with brief awakenings."""
    stages = np.full(seconds.shape, AWAKE, dtype=np.int8)
    period_s = float(seconds[-1]) if seconds.size else 0.0
    for day in range(-1, math.ceil(period_s / 86400) + 1):
        begin = (24 * day + habits.bedtime_h - start_hour) * 3600
        end = begin + (24 - habits.bedtime_h + habits.wake_h) * 3600
        if end < 0 or begin > period_s:
            continue
        t = begin + rng.uniform(5, 25) * 60  # sleep latency
        cycle = 0
        while t < end:
            late = min(cycle / 4, 1.0)
            plan = [(LIGHT, rng.uniform(10, 25)), (DEEP, rng.uniform(20, 40) * (1 - late)),
                    (LIGHT, rng.uniform(5, 15)), (REM, rng.uniform(5, 12) + 18 * late)]
            if rng.random() < 0.3:
                plan.append((AWAKE, rng.uniform(1, 5)))
            for stage, minutes in plan:
                stop = min(t + minutes * 60, end)
                first, last = np.searchsorted(seconds, [t, stop])
                stages[first:last] = stage
                t = stop
            cycle += 1
    return stages


def _walking_cadence(rng: np.random.Generator, seconds: np.ndarray, sample_seconds: float, stages: np.ndarray,
                     habits: Habits, progress: np.ndarray) -> np.ndarray:
    """(n,) steps per minute: walks of 1-10 minutes while awake; the ill walk less."""
    cadence = np.zeros(seconds.shape)
    period_s = seconds.size * sample_seconds
    count = rng.poisson(habits.walks_per_hour * period_s / 3600)
    for begin, minutes, pace in zip(rng.uniform(0, period_s, count), rng.uniform(1, 10, count),
                                    rng.uniform(50, 105, count)):
        first, last = np.searchsorted(seconds, [begin, begin + minutes * 60])
        if first < seconds.size and stages[first] == AWAKE and rng.random() > progress[first]:
            cadence[first:last] = pace
    return cadence * (stages == AWAKE)


def _exponential_smooth(x: np.ndarray, dt_s: float, tau_s: float) -> np.ndarray:
    """Causal first-order low-pass (time constant tau_s, unit gain) via FFT convolution."""
    length = min(x.size, int(8 * tau_s / dt_s) + 1)
    if x.size == 0:
        return x.astype(np.float64)
    kernel = np.exp(-np.arange(length) * dt_s / tau_s)
    kernel /= kernel.sum()
    size = 1 << int(np.ceil(np.log2(x.size + length)))
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(kernel, size), size)[:x.size]


def _slow_noise(rng: np.random.Generator, n: int, dt_s: float, tau_s: float, sd: float) -> np.ndarray:
    """(n,) zero-mean drift with correlation time tau_s and standard deviation ~sd."""
    white = rng.standard_normal(n)
    smooth = _exponential_smooth(white, dt_s, tau_s)
    # A unit-gain first-order filter of white noise keeps a fraction (1-a)/(1+a) of its variance.
    a = math.exp(-dt_s / tau_s)
    return smooth * sd / math.sqrt((1 - a) / (1 + a))


def _drop_readings(rng: np.random.Generator, vitals: np.ndarray, seconds: np.ndarray, exertion: np.ndarray,
                   bp_interval_s: float) -> None:
    """Blank (NaN) the readings a wearable would not report, in place.

    A wrist cuff measures blood pressure once per interval, and fails while the arm moves;
    optical SpO2 drops out with motion; other vitals drop out now and then.
    """
    n = seconds.size
    slot = np.floor(seconds / bp_interval_s)
    measured = np.r_[True, slot[1:] != slot[:-1]] & (exertion < 0.3)
    for name in ("systolic_bp", "diastolic_bp"):
        vitals[~measured, _COLUMN[name]] = np.nan
    missing = {"heart_rate": 0.01, "spo2": 0.03, "temperature_c": 0.01, "respiratory_rate": 0.03}
    for name, chance in missing.items():
        vitals[rng.random(n) < chance, _COLUMN[name]] = np.nan
    vitals[(exertion > 0.3) & (rng.random(n) < 0.3), _COLUMN["spo2"]] = np.nan


def _worn_mask(rng: np.random.Generator, seconds: np.ndarray, hours: float) -> np.ndarray:
    """(n,) bool: False while the band is off the wrist (a few gaps of 2-30 minutes per day)."""
    worn = np.ones(seconds.shape, dtype=bool)
    count = rng.poisson(0.2 * hours)
    for begin, minutes in zip(rng.uniform(0, hours * 3600, count), np.clip(rng.exponential(8, count), 2, 30)):
        first, last = np.searchsorted(seconds, [begin, begin + minutes * 60])
        worn[first:last] = False
    return worn


def offline_episodes(index: int, rng: np.random.Generator, hours: float) -> list[tuple[float, float]]:
    """(begin_s, end_s) periods with the phone offline. Patient 0 is offline for over 2 hours
    (beyond the pipeline's allowed lateness) when the period allows, patient 1 for 30-90 minutes,
    anyone else for 30 minutes to 3 hours with probability 0.2."""
    if index == 0 and hours >= 2.5:
        low, high = 2.1, min(3.0, hours - 0.3)
    elif index == 1 and hours >= 1.0:
        low, high = 0.5, min(1.5, hours - 0.4)
    elif index > 1 and hours >= 1.0 and rng.random() < 0.2:
        low, high = 0.5, min(3.0, hours - 0.4)
    else:
        return []
    duration = rng.uniform(low, high) * 3600
    begin = rng.uniform(0, hours * 3600 - duration - 0.2 * 3600)
    return [(begin, begin + duration)]


def phone_uploads(patient: Patient, series: VitalSeries, rng: np.random.Generator, *, hours: float) -> list[Upload]:
    """The uploads that reach the hospital by the end of the period, in the order sent."""
    period_s = hours * 3600
    episodes = offline_episodes(patient.index, rng, hours)
    uploads: list[Upload] = []
    covered, offline_s = 0, 0.0
    sync = rng.uniform(0, SYNC_INTERVAL_S[1])
    while sync < period_s:
        episode = next(((b, e) for b, e in episodes if b <= sync < e), None)
        if episode:
            offline_s = episode[1] - episode[0]
            sync = episode[1] + rng.uniform(5, 60)  # back online: the app syncs at once
            continue
        stop = int(np.searchsorted(series.seconds, sync, side="right"))
        if stop > covered:
            upload_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            arrival = sync + rng.uniform(0.3, 4.0)
            retry_arrival = arrival + rng.uniform(5, 90) if rng.random() < RETRY_PROBABILITY else math.inf
            if arrival <= period_s:
                uploads.append(Upload(upload_id, arrival, covered, stop, False, offline_s))
            if retry_arrival <= period_s:
                uploads.append(Upload(upload_id, retry_arrival, covered, stop, True, offline_s))
            covered, offline_s = stop, 0.0
        sync += rng.uniform(*SYNC_INTERVAL_S)
    return uploads


def sample_records(series: VitalSeries, start: dt.datetime) -> list[dict]:
    """Each sample as a JSON-ready dict in VitalSample field order; absent readings are omitted."""
    micros = np.rint(series.seconds * 1e6).astype(np.int64) + _micros(start)
    times = np.char.add(np.datetime_as_string(micros.astype("datetime64[us]"), unit="us"), "Z").tolist()
    stage_names = [SLEEP_STAGES[s] for s in series.sleep_stages.tolist()]
    records = []
    for when, row, steps, stage in zip(times, series.vitals.tolist(), series.steps.tolist(), stage_names):
        sample = {"event_time": when}
        sample.update((name, value) for name, value in zip(VITAL_NAMES, row) if value == value)
        sample["steps"] = steps
        sample["sleep_stage"] = stage
        records.append(sample)
    return records


def upload_records(patient: Patient, samples: list[dict], uploads: list[Upload], start: dt.datetime) -> list[Landed]:
    """Uploads -> WearableUpload JSON records (samples shared, not copied), landed at their arrival."""
    landed = []
    for upload in uploads:
        arrival = start + dt.timedelta(seconds=upload.arrival_s)
        record = {"upload_id": upload.upload_id, "device_id": patient.wearable_id,
                  "patient_id": patient.patient_id, "upload_time": format_timestamp(arrival),
                  "samples": samples[upload.first:upload.stop]}
        landed.append(Landed(arrival=arrival, payload=record, record_id=upload.upload_id))
    return landed


def nurse_observations(patient: Patient, rng: np.random.Generator, *, start: dt.datetime,
                       hours: float) -> list[Landed]:
    """ClinicalObservation JSON records, landed when the nurse enters them (1-15 minutes later)."""
    period_s = hours * 3600
    landed = []
    on_oxygen = False
    t = rng.uniform(5, 40) * 60
    while t < period_s:
        progress = float(patient.course.progress(t)) if patient.course else 0.0
        on_oxygen = on_oxygen or patient.true_spo2(t) < OXYGEN_START_SPO2
        confused = bool(patient.course and patient.course.becomes_confused and progress > 0.7)
        consciousness = "new_confusion" if confused else "alert"
        arrival_s = t + rng.uniform(60, 900)
        observation = {
            "observation_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
            "patient_id": patient.patient_id,
            "event_time": format_timestamp(start + dt.timedelta(seconds=t)),
            "consciousness": None if rng.random() < 0.03 else consciousness,
            "supplemental_oxygen": None if rng.random() < 0.03 else on_oxygen,
        }
        if arrival_s <= period_s:
            landed.append(Landed(arrival=start + dt.timedelta(seconds=arrival_s), payload=observation,
                                 record_id=observation["observation_id"]))
        t = _next_observation(patient, rng, t, progress)
    return landed


def _next_observation(patient: Patient, rng: np.random.Generator, t: float, progress: float) -> float:
    """Hourly once deteriorating; otherwise the next round, unless the patient deteriorates
    before it and the nurse is called to review within 10-30 minutes."""
    if progress > 0.5:
        return t + ESCALATED_INTERVAL_S * rng.uniform(0.9, 1.1)
    next_round = t + ROUND_INTERVAL_S * rng.uniform(0.9, 1.1)
    course = patient.course
    if course is not None and t < course.onset_s + course.ramp_s / 2 < next_round:
        return min(next_round, course.onset_s + course.ramp_s / 2 + rng.uniform(10, 30) * 60)
    return next_round


def _micros(when: dt.datetime) -> int:
    return (when - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
