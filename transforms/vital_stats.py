"""Per-window vital-sign statistics: a CombineFn over `SampleChunk`s.

Chunks are combined as they are (lists of numpy arrays), so Beam moves a few
elements per patient-window instead of one per sample; the statistics are
computed once per pane with numpy. Duplicated uploads (the same wearable
reporting the same sample time again) are removed here, because both copies
always land in the same window.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from schemas.inputs import VITAL_NAMES
from transforms.decode import SampleChunk


class VitalStatsFn(beam.CombineFn):
    """SampleChunk* -> dict of window statistics (see `summarise`).

    The accumulator is ``(chunks, duplicates_removed)``: `compact` folds the chunks into one,
    deduplicated, and adds what it removed to the count.
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
        if len(chunks) < 2:
            return accumulator
        merged, duplicates = deduplicate(chunks)
        return [merged], removed + duplicates

    def extract_output(self, accumulator):
        chunks, removed = accumulator
        return summarise(chunks, already_removed=removed)


def deduplicate(chunks: list[SampleChunk]) -> tuple[SampleChunk, int]:
    """Chunks of one patient-window -> (one time-ordered chunk without duplicates, duplicates removed).

    A duplicate is a second sample from the same wearable at the same event time (an upload retried).
    The merged chunk's ``device_id`` joins the wearables' ids with ``+``.
    """
    devices = sorted({c.device_id for c in chunks})
    code = {device: i for i, device in enumerate(devices)}
    times = np.concatenate([c.times_us for c in chunks])
    owner = np.concatenate([np.full(len(c.times_us), code[c.device_id]) for c in chunks])
    vitals = np.concatenate([c.vitals for c in chunks])
    steps = np.concatenate([c.steps for c in chunks])
    stages = [stage for c in chunks for stage in c.sleep_stages]
    order = np.lexsort((owner, times))  # by time, then wearable
    times, owner, vitals, steps = times[order], owner[order], vitals[order], steps[order]
    keep = np.r_[True, (times[1:] != times[:-1]) | (owner[1:] != owner[:-1])]
    kept_stages = tuple(stages[i] for i, k in zip(order, keep) if k)
    merged = SampleChunk("+".join(devices), times[keep], vitals[keep], steps[keep], kept_stages)
    return merged, int(len(keep) - keep.sum())


def summarise(chunks: list[SampleChunk], *, already_removed: int = 0) -> dict:
    """The statistics of one window: counts, mean/min/max/last per vital, steps, last sleep stage.

    Returns a dict with ``sample_count``, ``duplicates_removed``, ``first_sample_us``,
    ``last_sample_us``, ``<vital>_{mean,min,max,last}`` (None when the vital is absent),
    ``steps_total`` and ``sleep_stage_last``.
    """
    merged, duplicates = deduplicate(chunks)
    stats = {
        "sample_count": int(len(merged.times_us)),
        "duplicates_removed": duplicates + already_removed,
        "first_sample_us": int(merged.times_us[0]),
        "last_sample_us": int(merged.times_us[-1]),
    }
    for column, name in enumerate(VITAL_NAMES):
        values = merged.vitals[:, column]
        present = values[~np.isnan(values)]
        if present.size:
            stats.update({f"{name}_mean": float(present.mean()), f"{name}_min": float(present.min()),
                          f"{name}_max": float(present.max()), f"{name}_last": float(present[-1])})
        else:
            stats.update({f"{name}_{stat}": None for stat in ("mean", "min", "max", "last")})
    steps = merged.steps[~np.isnan(merged.steps)]
    stats["steps_total"] = int(steps.sum()) if steps.size else None
    stages = [stage for stage in merged.sleep_stages if stage is not None]
    stats["sleep_stage_last"] = stages[-1] if stages else None
    return stats
