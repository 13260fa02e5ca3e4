"""Per-window vital-sign statistics, from `SampleChunk`s.

Streaming: `VitalStatsFn`, a CombineFn per patient-window. Chunks are combined
as they are (lists of numpy arrays), so Beam moves a few elements per
patient-window instead of one per sample; the statistics are computed once per
pane with numpy.

Batch: `CollectWindowedSamplesFn`, a CombineFn per patient, concatenates the
patient's chunks of every window into one `WindowedSamples` block before the
shuffle (Beam lifts it into the producing stage), and `window_statistics`
computes every window's statistics from the block with the same rules.

Duplicated uploads (the same wearable reporting the same sample time again)
are removed per window, because both copies always land in the same window.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import apache_beam as beam
import numpy as np

from schemas.inputs import VITAL_NAMES
from transforms.decode import STAGE_CODES, STAGES_BY_CODE, SampleChunk


class VitalStatsFn(beam.CombineFn):
    """SampleChunk* -> dict of window statistics (see `summarise`).

    The accumulator is ``(chunks, duplicates_removed)``: `compact` folds each wearable's chunks
    into one, deduplicated, and adds what it removed to the count. Chunks of different wearables
    stay apart, so a later retry of either is still recognised as a duplicate.
    """

    def create_accumulator(self):
        return [], 0

    def add_input(self, accumulator, chunk: SampleChunk):
        chunks, removed = accumulator
        chunks.append(chunk)
        return chunks, removed

    def merge_accumulators(self, accumulators):
        merged, removed = [], 0
        for chunks, count in accumulators:
            merged.extend(chunks)
            removed += count
        return merged, removed

    def compact(self, accumulator):
        chunks, removed = accumulator
        by_wearable = {}
        for chunk in chunks:
            by_wearable.setdefault(chunk.device_id, []).append(chunk)
        if len(by_wearable) == len(chunks):
            return accumulator
        compacted = []
        for same_wearable in by_wearable.values():
            merged, duplicates = deduplicate(same_wearable)
            compacted.append(merged)
            removed += duplicates
        return compacted, removed

    def extract_output(self, accumulator):
        chunks, removed = accumulator
        return summarise(chunks, already_removed=removed)


def deduplicate(chunks: list[SampleChunk]) -> tuple[SampleChunk, int]:
    """Chunks of one patient-window -> (one time-ordered chunk without duplicates, duplicates removed).

    A duplicate is a second sample from the same wearable at the same event time (an upload retried).
    Which copy is kept does not depend on arrival order (see `_value_keys`). The merged chunk's
    ``device_id`` joins the wearables' ids with ``+``.
    """
    if len(chunks) == 1 and _strictly_increasing(chunks[0].times_us):
        return chunks[0], 0  # the common case: one upload per window, already ordered, nothing to remove
    devices = sorted({c.device_id for c in chunks})
    code = {device: i for i, device in enumerate(devices)}
    times = np.concatenate([c.times_us for c in chunks])
    owner = np.concatenate([np.full(len(c.times_us), code[c.device_id]) for c in chunks])
    vitals = np.concatenate([c.vitals for c in chunks])
    steps = np.concatenate([c.steps for c in chunks])
    stages = [stage for c in chunks for stage in c.sleep_stages]
    order = np.lexsort((owner, times))  # by time, then wearable
    in_time, by_owner = times[order], owner[order]
    repeat = np.r_[False, (in_time[1:] == in_time[:-1]) & (by_owner[1:] == by_owner[:-1])]

    def value_keys(rows):
        ranks = np.fromiter((STAGE_CODES[stages[row]] for row in rows), dtype=np.int64, count=len(rows))
        return _value_keys(vitals[rows], steps[rows], ranks)

    kept = _one_copy_per_sample(order, repeat, value_keys)
    merged = SampleChunk("+".join(devices), times[kept], vitals[kept], steps[kept], tuple(stages[i] for i in kept))
    return merged, len(order) - len(kept)


def _one_copy_per_sample(order: np.ndarray, repeat: np.ndarray, value_keys) -> np.ndarray:
    """The rows to keep, one per sample, in `order`.

    order: row indices sorted so that copies of a sample are adjacent; repeat[i]: order[i] is a
    copy of the sample at order[i - 1]; value_keys(rows): `_value_keys` of those rows. Only
    samples with copies are ranked by value (retries are a few percent of samples).
    """
    sample = np.cumsum(~repeat) - 1
    kept = order[~repeat]
    copied = np.isin(sample, sample[repeat])
    if copied.any():
        rows, samples = order[copied], sample[copied]
        by_value = np.lexsort((*value_keys(rows), samples))
        first = np.r_[True, samples[by_value][1:] != samples[by_value][:-1]]
        kept[samples[by_value][first]] = rows[by_value][first]
    return kept


def _value_keys(vitals: np.ndarray, steps: np.ndarray, stage_ranks: np.ndarray) -> tuple:
    """Least-significant `np.lexsort` keys ranking copies of one sample by their values.

    Retries normally repeat a sample exactly; when two copies differ, the first in this order (the
    lowest readings, missing values last) is kept, in batch and in streaming alike, whatever order
    the copies arrived in.
    """
    return (stage_ranks, steps, *vitals.T[::-1])


def _strictly_increasing(times_us: np.ndarray) -> bool:
    return bool((times_us[1:] > times_us[:-1]).all())


def summarise(chunks: list[SampleChunk], *, already_removed: int = 0) -> dict:
    """The statistics of one window: counts, mean/min/max/last per vital, steps, last sleep stage.

    Returns a dict with ``sample_count``, ``duplicates_removed``, ``first_sample_us``,
    ``last_sample_us``, ``<vital>_{mean,min,max,last}`` (None when the vital is absent),
    ``steps_total`` and ``sleep_stage_last``.
    """
    merged, duplicates = deduplicate(chunks)
    stages = [stage for stage in merged.sleep_stages if stage is not None]
    return _statistics(merged.times_us, merged.vitals, merged.steps, duplicates + already_removed,
                       stages[-1] if stages else None)


def _statistics(times_us: np.ndarray, vitals: np.ndarray, steps: np.ndarray, duplicates: int,
                sleep_stage_last: str | None) -> dict:
    """`summarise` of one window's time-ordered samples, duplicates already removed."""
    stats = {
        "sample_count": int(len(times_us)),
        "duplicates_removed": duplicates,
        "first_sample_us": int(times_us[0]),
        "last_sample_us": int(times_us[-1]),
    }
    stats.update(_vital_statistics(vitals))
    steps = steps[~np.isnan(steps)]
    stats["steps_total"] = int(steps.sum()) if steps.size else None
    stats["sleep_stage_last"] = sleep_stage_last
    return stats


def _vital_statistics(vitals: np.ndarray) -> dict:
    """(n, 6) vitals -> ``<vital>_{mean,min,max,last}`` over the readings present (None when none is).

    Each vital is reduced as one contiguous row, so a mean is the same pairwise sum whether the
    window had gaps or not.
    """
    by_vital = np.ascontiguousarray(vitals.T)  # (6, n)
    if np.isnan(by_vital).any():
        return _vital_statistics_with_gaps(by_vital)
    table = np.column_stack((np.add.reduce(by_vital, axis=1) / by_vital.shape[1], by_vital.min(axis=1),
                             by_vital.max(axis=1), by_vital[:, -1]))  # (6, 4): mean, min, max, last
    return dict(zip(_STAT_NAMES, table.ravel().tolist()))


def _vital_statistics_with_gaps(by_vital: np.ndarray) -> dict:
    stats = {}
    for name, values in zip(VITAL_NAMES, by_vital):
        present = values[~np.isnan(values)]
        if present.size:
            stats.update({f"{name}_mean": float(present.mean()), f"{name}_min": float(present.min()),
                          f"{name}_max": float(present.max()), f"{name}_last": float(present[-1])})
        else:
            stats.update({f"{name}_{stat}": None for stat in _STATS})
    return stats


_STATS = ("mean", "min", "max", "last")
_STAT_NAMES = tuple(f"{name}_{stat}" for name in VITAL_NAMES for stat in _STATS)


class WindowedSamples(NamedTuple):
    """Chunks of one patient over any number of windows, concatenated column-wise.

    Wearables and sleep stages are coded as small integers, so a block pickles as a few arrays.

    Attributes:
      window_start_us: (n,) int64 start of each sample's window (that of the chunk it came in).
      devices: the wearables' ids, sorted.
      device_codes: (n,) int64 index into `devices` of the wearable that took each sample.
      times_us, vitals, steps: as in `SampleChunk`: (n,) int64, (n, 6) float64, (n,) float64.
      sleep_stages: the sleep stages met (str or None).
      sleep_stage_codes: (n,) int64 index into `sleep_stages` of each sample's stage.
    Samples are in no particular order.
    """

    window_start_us: np.ndarray
    devices: tuple
    device_codes: np.ndarray
    times_us: np.ndarray
    vitals: np.ndarray
    steps: np.ndarray
    sleep_stages: tuple
    sleep_stage_codes: np.ndarray


class CollectWindowedSamplesFn(beam.CombineFn):
    """(window_start_us, SampleChunk)* of one patient -> one `WindowedSamples` block.

    The accumulator is a list of (window_start_us, chunk) pairs and blocks; `compact` concatenates
    them into one block, so what crosses the shuffle is a few arrays per patient.
    """

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, windowed_chunk: tuple[int, SampleChunk]):
        accumulator.append(windowed_chunk)
        return accumulator

    def merge_accumulators(self, accumulators):
        return [part for accumulator in accumulators for part in accumulator]

    def compact(self, accumulator):
        return [concatenate(accumulator)] if len(accumulator) > 1 else accumulator

    def extract_output(self, accumulator):
        if len(accumulator) == 1 and isinstance(accumulator[0], WindowedSamples):
            return accumulator[0]
        return concatenate(accumulator)


def concatenate(parts: list) -> WindowedSamples:
    """(window_start_us, SampleChunk) pairs and `WindowedSamples` blocks -> one block."""
    blocks = [part for part in parts if isinstance(part, WindowedSamples)]
    pairs = [part for part in parts if not isinstance(part, WindowedSamples)]
    chunks = [chunk for _, chunk in pairs]
    devices, stages = _Codes(), _Codes(STAGES_BY_CODE)
    lengths = [len(chunk.times_us) for chunk in chunks]
    window_start_us = [np.repeat(np.array([start for start, _ in pairs], dtype=np.int64), lengths)]
    device_codes = [np.repeat(devices.of([chunk.device_id for chunk in chunks]), lengths)]
    stage_codes = [stages.of([stage for chunk in chunks for stage in chunk.sleep_stages])]
    for block in blocks:
        window_start_us.append(block.window_start_us)
        device_codes.append(devices.of(block.devices)[block.device_codes])
        stage_codes.append(stages.of(block.sleep_stages)[block.sleep_stage_codes])
    sources = [*chunks, *blocks]
    device_names, by_name = devices.sorted()
    return WindowedSamples(
        np.concatenate(window_start_us), device_names, by_name[np.concatenate(device_codes)],
        np.concatenate([source.times_us for source in sources]),
        np.concatenate([source.vitals for source in sources]).reshape(-1, len(VITAL_NAMES)),
        np.concatenate([source.steps for source in sources]),
        stages.values(), np.concatenate(stage_codes))




class _Codes:
    """Small integer codes for the values of a categorical column (wearable ids, sleep stages)."""

    def __init__(self, known: tuple = ()):
        self._codes = {value: code for code, value in enumerate(known)}

    def of(self, values: list | tuple) -> np.ndarray:
        try:
            return np.fromiter(map(self._codes.__getitem__, values), dtype=np.int64, count=len(values))
        except KeyError:
            return np.array([self._codes.setdefault(value, len(self._codes)) for value in values], dtype=np.int64)

    def values(self) -> tuple:
        return tuple(self._codes)

    def sorted(self) -> tuple[tuple, np.ndarray]:
        """(the values sorted, code -> code of the value in that order)."""
        names = sorted(self._codes)
        position = {name: i for i, name in enumerate(names)}
        return tuple(names), np.array([position[value] for value in self._codes], dtype=np.int64)


def window_statistics(samples: WindowedSamples) -> Iterator[tuple[int, dict]]:
    """A patient's samples -> (window_start_us, `summarise` of that window) per window, in window order."""
    # By window, then time and wearable: each window ordered as `deduplicate` orders it.
    order = np.lexsort((samples.device_codes, samples.times_us, samples.window_start_us))
    windows, times, owner = samples.window_start_us[order], samples.times_us[order], samples.device_codes[order]
    repeat = np.r_[False, (windows[1:] == windows[:-1]) & (times[1:] == times[:-1]) & (owner[1:] == owner[:-1])]
    ranks = np.array([STAGE_CODES[stage] for stage in samples.sleep_stages], dtype=np.int64)
    kept = _one_copy_per_sample(order, repeat, lambda rows: _value_keys(
        samples.vitals[rows], samples.steps[rows], ranks[samples.sleep_stage_codes[rows]]))
    windows, times = samples.window_start_us[kept], samples.times_us[kept]
    removed = np.bincount(np.searchsorted(windows, samples.window_start_us[order[repeat]]), minlength=len(kept))
    vitals, steps, stage_codes = samples.vitals[kept], samples.steps[kept], samples.sleep_stage_codes[kept]
    named = np.array([stage is not None for stage in samples.sleep_stages], dtype=bool)[stage_codes]
    starts = np.flatnonzero(np.r_[True, windows[1:] != windows[:-1]]).tolist()
    for begin, end in zip(starts, [*starts[1:], len(windows)]):
        last_named = np.flatnonzero(named[begin:end])
        stage = samples.sleep_stages[stage_codes[begin + last_named[-1]]] if last_named.size else None
        yield int(windows[begin]), _statistics(times[begin:end], vitals[begin:end], steps[begin:end],
                                               int(removed[begin]), stage)
