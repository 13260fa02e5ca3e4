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
from transforms.windowing import WindowPolicy


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
        """The window's statistics; None for a pane without samples (see `panes.AttachPane`)."""
        chunks, removed = accumulator
        return summarise(chunks, already_removed=removed) if chunks else None


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
    has_copies = np.zeros(len(kept), dtype=bool)
    has_copies[sample[repeat]] = True
    copied = has_copies[sample]
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
    stages = _Codes(STAGES_BY_CODE)
    stage_codes = stages.of(merged.sleep_stages)
    (stats,) = segment_statistics(merged.times_us, merged.vitals, merged.steps, stage_codes, stages.values(),
                                  starts=np.zeros(1, dtype=np.int64), duplicates=[duplicates + already_removed])
    return stats


def segment_statistics(times_us: np.ndarray, vitals: np.ndarray, steps: np.ndarray, stage_codes: np.ndarray,
                       stage_names: tuple, *, starts: np.ndarray, duplicates) -> list[dict]:
    """`summarise` of each segment (window) of time-ordered samples, duplicates already removed.

    times_us (n,), vitals (n, 6), steps (n,) and stage_codes (n,) (index into `stage_names`, whose
    None means "no stage") are the samples, window by window; starts (k,) is the first row of each
    window (starts[0] == 0) and duplicates (k,) what deduplication removed from it. Returns k dicts.

    Every sum is one `np.add.reduceat` over a vital's present readings, exact (`exact_means`), so a
    window's mean is the same float whether it is computed alone (streaming) or among the patient's
    other windows (batch), and chart rounding follows the exact mean.
    """
    ends = np.append(starts[1:], len(times_us))
    columns = {
        "sample_count": (ends - starts).tolist(),
        "duplicates_removed": [int(count) for count in duplicates],
        "first_sample_us": times_us[starts].tolist(),
        "last_sample_us": times_us[ends - 1].tolist(),
    }
    count, _, low, high, last = _reduce_present(vitals, starts, ends)
    mean = exact_means(vitals, starts, ends, count)
    for i, (name, always) in enumerate(zip(VITAL_NAMES, count.all(axis=0).tolist())):
        present = None if always else count[:, i].tolist()
        columns[f"{name}_mean"] = _or_none(mean[:, i], present)
        columns[f"{name}_min"] = _or_none(low[:, i], present)
        columns[f"{name}_max"] = _or_none(high[:, i], present)
        columns[f"{name}_last"] = _or_none(last[:, i], present)
    count, total, *_ = _reduce_present(steps[:, None], starts, ends)
    columns["steps_total"] = [int(value) if present else None
                              for value, present in zip(total[:, 0].tolist(), count[:, 0].tolist())]
    columns["sleep_stage_last"] = _last_named_stage(stage_codes, stage_names, starts, ends)
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


# Readings are summed in millionths of their unit, as integers (exact in float64 below 2**53: a
# window of a million readings of 300 is 3e14), so a mean is the exact decimal mean of the readings
# as sent, rounded once.  A float sum is not: 37.98 + 37.98 + 38.19 sums to 114.14999..., whose mean
# 38.04999... rounds to 38.0 on the chart where the documented rule (transforms.news2) gives 38.1.
MICRO_UNITS = 1_000_000


def exact_means(vitals: np.ndarray, starts: np.ndarray, ends: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(k, m) means of the present readings of each segment, from exact sums of millionths.

    A reading with more than six decimals counts to the nearest millionth in the mean (min, max
    and last keep it as sent).  Segments without a reading in a column get an arbitrary value.
    """
    _, micro_total, *_ = _reduce_present(np.rint(vitals * MICRO_UNITS), starts, ends)
    return micro_total / (np.maximum(count, 1) * MICRO_UNITS)


def _reduce_present(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, ...]:
    """(n, m) readings, NaN where absent -> (count, sum, min, max, last), each (k, m).

    Per segment [starts[j], ends[j]) and column, over the readings present; where a segment has
    no reading in a column, its count is 0 and the other values are arbitrary.
    """
    if not np.isnan(values).any():
        count = np.broadcast_to((ends - starts)[:, None], (len(starts), values.shape[1]))
        return (count, *_reduce_rows(values, starts, ends))
    per_column = []
    for column in values.T:
        present = ~np.isnan(column)
        before = np.concatenate(([0], np.cumsum(present)))  # readings before each row
        begin, end = before[starts], before[ends]
        per_column.append((end - begin, *_reduce_rows(column[present][:, None], begin, end)))
    return tuple(np.column_stack(parts) for parts in zip(*per_column))


def _reduce_rows(readings: np.ndarray, begin: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, ...]:
    """(r, m) readings -> (sum, min, max, last) of rows [begin[j], end[j]), each (k, m).

    Reduces over (begin, end) pairs of a copy with one spare row, so that an empty segment (begin
    == end, possibly == r) stays in range; every second result is a segment.
    """
    padded = np.concatenate((readings, np.zeros((1, readings.shape[1]))))
    bounds = np.column_stack((begin, end)).ravel()
    return (np.add.reduceat(padded, bounds)[::2], np.minimum.reduceat(padded, bounds)[::2],
            np.maximum.reduceat(padded, bounds)[::2], padded[np.maximum(end - 1, 0)])


def _or_none(values: np.ndarray, present: list | None) -> list:
    """values as floats, None where `present` (counts per segment; None: all present) is 0."""
    if present is None:
        return values.tolist()
    return [value if count else None for value, count in zip(values.tolist(), present)]


def _last_named_stage(stage_codes: np.ndarray, stage_names: tuple, starts: np.ndarray, ends: np.ndarray) -> list:
    """The last sleep stage that is not None in each segment (None when there is none)."""
    named_rows = np.flatnonzero(np.array([name is not None for name in stage_names], dtype=bool)[stage_codes])
    last = np.searchsorted(named_rows, ends) - 1  # index in named_rows of the last named row before each end
    row = named_rows[np.maximum(last, 0)] if named_rows.size else np.zeros_like(last)
    found = (last >= 0) & (row >= starts)
    return [stage_names[stage_codes[r]] if ok else None for r, ok in zip(row.tolist(), found.tolist())]


class WindowedSamples(NamedTuple):
    """Chunks of one patient over any number of windows, concatenated column-wise.

    What is the same for a whole chunk (its window, its wearable) is kept once per chunk, and
    sleep stages as one-byte codes, so a block pickles as a few compact arrays (65 bytes a sample).

    Attributes:
      chunk_windows: (c,) int64 start of each chunk's window (that of its first sample).
      chunk_lengths: (c,) int64 samples in each chunk; the sample columns below are chunk by chunk.
      devices: the wearables' ids, sorted.
      chunk_devices: (c,) index into `devices` of each chunk's wearable.
      times_us, vitals, steps: as in `SampleChunk`: (n,) int64, (n, 6) float64, (n,) float64.
      sleep_stages: the sleep stages met (str or None).
      sleep_stage_codes: (n,) index into `sleep_stages` of each sample's stage.
    """

    chunk_windows: np.ndarray
    chunk_lengths: np.ndarray
    devices: tuple
    chunk_devices: np.ndarray
    times_us: np.ndarray
    vitals: np.ndarray
    steps: np.ndarray
    sleep_stages: tuple
    sleep_stage_codes: np.ndarray


class CollectWindowedSamplesFn(beam.CombineFn):
    """SampleChunk* of one patient -> one `WindowedSamples` block.

    Each chunk goes to the fixed window of its first sample, which is the event timestamp decode
    gives it (`transforms.decode.DecodeWearablesFn`), so the window Beam would assign. The
    accumulator is a list of chunks and blocks; `compact` concatenates them into one block, so
    what crosses the shuffle is a few arrays per patient.
    """

    def __init__(self, policy: WindowPolicy):
        self._policy = policy

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, chunk: SampleChunk):
        accumulator.append(chunk)
        return accumulator

    def merge_accumulators(self, accumulators):
        return [part for accumulator in accumulators for part in accumulator]

    def compact(self, accumulator):
        return [self._concatenate(accumulator)] if len(accumulator) > 1 else accumulator

    def extract_output(self, accumulator):
        if len(accumulator) == 1 and isinstance(accumulator[0], WindowedSamples):
            return accumulator[0]
        return self._concatenate(accumulator)

    def _concatenate(self, parts: list) -> WindowedSamples:
        return concatenate(parts, self._policy)


def concatenate(parts: list, policy: WindowPolicy) -> WindowedSamples:
    """SampleChunks (windowed by `policy` at their first sample) and `WindowedSamples` blocks -> one block."""
    blocks = [part for part in parts if isinstance(part, WindowedSamples)]
    chunks = [part for part in parts if not isinstance(part, WindowedSamples)]
    devices, stages = _Codes(), _Codes(STAGES_BY_CODE)
    chunk_windows = [policy.window_start_us(np.array([chunk.times_us[0] for chunk in chunks], dtype=np.int64))]
    chunk_lengths = [np.array([len(chunk.times_us) for chunk in chunks], dtype=np.int64)]
    chunk_devices = [devices.of([chunk.device_id for chunk in chunks])]
    stage_codes = [stages.of([stage for chunk in chunks for stage in chunk.sleep_stages])]
    for block in blocks:
        chunk_windows.append(block.chunk_windows)
        chunk_lengths.append(block.chunk_lengths)
        chunk_devices.append(devices.of(block.devices)[block.chunk_devices])
        stage_codes.append(stages.of(block.sleep_stages)[block.sleep_stage_codes])
    sources = [*chunks, *blocks]
    device_names, by_name = devices.sorted()
    return WindowedSamples(
        np.concatenate(chunk_windows), np.concatenate(chunk_lengths), device_names,
        _narrow(by_name[np.concatenate(chunk_devices)], len(device_names)),
        np.concatenate([source.times_us for source in sources]),
        np.concatenate([source.vitals for source in sources]).reshape(-1, len(VITAL_NAMES)),
        np.concatenate([source.steps for source in sources]),
        stages.values(), _narrow(np.concatenate(stage_codes), len(stages.values())))


def _narrow(codes: np.ndarray, count: int) -> np.ndarray:
    """Codes 0..count-1 in the smallest unsigned integer type that holds them."""
    return codes.astype(np.min_scalar_type(max(count - 1, 0)), copy=False)


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
    window_start_us = np.repeat(samples.chunk_windows, samples.chunk_lengths)
    device_codes = np.repeat(samples.chunk_devices, samples.chunk_lengths)
    order = np.lexsort((device_codes, samples.times_us, window_start_us))
    windows, times, owner = window_start_us[order], samples.times_us[order], device_codes[order]
    repeat = np.concatenate(([False], (windows[1:] == windows[:-1]) & (times[1:] == times[:-1])
                             & (owner[1:] == owner[:-1])))
    ranks = np.array([STAGE_CODES[stage] for stage in samples.sleep_stages], dtype=np.int64)
    kept = _one_copy_per_sample(order, repeat, lambda rows: _value_keys(
        samples.vitals[rows], samples.steps[rows], ranks[samples.sleep_stage_codes[rows]]))
    windows = window_start_us[kept]
    starts = np.flatnonzero(np.concatenate(([True], windows[1:] != windows[:-1])))
    removed = np.bincount(np.searchsorted(windows[starts], window_start_us[order[repeat]]),
                          minlength=len(starts))
    stats = segment_statistics(samples.times_us[kept], samples.vitals[kept], samples.steps[kept],
                               samples.sleep_stage_codes[kept], samples.sleep_stages, starts=starts,
                               duplicates=removed)
    return zip(windows[starts].tolist(), stats)
