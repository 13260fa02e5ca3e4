"""Per-window statistics of one imaging device's log: a CombineFn over `DeviceLogEvent` dicts.

Device logs are low-volume (a heartbeat every 30 s, a few other events), so
the accumulator keeps the events and the statistics are computed per pane.

Pub/Sub and Kafka deliver at least once, so the same event (same ``event_id``)
can reach a window twice; each window counts it once (``duplicates_removed``
says how many copies it dropped).

Versions outlive windows: a window reports only the points where its log shows
a firmware or configuration version (`version_points`), and the device twin
folds them, window by window, into what is known at each window's end
(`KnownVersions`, `advance_versions`).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt

import apache_beam as beam
import numpy as np

from transforms.decode import to_micros

ERROR_SEVERITIES = ("error", "critical")
DOWN_STATUSES = ("offline", "service")


class DeviceStatsFn(beam.CombineFn):
    """DeviceLogEvent* -> the raw material of a device_twin row (see `summarise_device_window`).

    The window bounds are not known inside a CombineFn, so the heartbeat times are kept in the
    output (``heartbeat_us``) and `heartbeat_features` finishes the job once they are.
    """

    def create_accumulator(self):
        return []

    def add_input(self, events, event):
        events.append(event)
        return events

    def merge_accumulators(self, accumulators):
        return [event for events in accumulators for event in events]

    def extract_output(self, events):
        """The window's summary; None for a pane without events (see `panes.AttachPane`)."""
        return summarise_device_window(events) if events else None


def summarise_device_window(events: list[dict]) -> dict:
    """Events of one device-window, in any order and possibly redelivered -> counts, last values,
    heartbeat times (sorted by event time), ``duplicates_removed`` and ``version_points``."""
    received = len(events)
    events = sorted(distinct_events(events), key=lambda e: (e["event_time"], e["event_id"]))
    errors = [e for e in events if e["severity"] in ERROR_SEVERITIES]
    by_code = collections.Counter((e.get("code") or "unknown", e["severity"]) for e in errors)
    temperatures = np.array([e["tube_temperature_c"] for e in events if e.get("tube_temperature_c") is not None])
    statuses = [e for e in events if e.get("status") is not None]
    # Maintenance seen in this window: a maintenance event, or a device reporting when it was last serviced.
    maintenance = [e["event_time"] for e in events if e["kind"] == "maintenance"]
    maintenance += [e["last_maintenance_time"] for e in events if e.get("last_maintenance_time") is not None]

    def last(field):
        values = [e[field] for e in events if e.get(field) is not None]
        return values[-1] if values else None

    return {
        "device_model": last("device_model"),
        "event_count": len(events),
        "duplicates_removed": received - len(events),
        "last_event_us": to_micros(events[-1]["event_time"]) if events else None,
        "status": statuses[-1]["status"] if statuses else None,
        "down_since_us": _down_since_us(statuses),
        "heartbeat_us": [to_micros(e["event_time"]) for e in events if e["kind"] == "heartbeat"],
        "error_count": len(errors),
        "critical_count": sum(e["severity"] == "critical" for e in events),
        "warning_count": sum(e["severity"] == "warning" for e in events),
        "error_counts": [{"code": code, "severity": severity, "count": count}
                         for (code, severity), count in sorted(by_code.items())],
        "exposure_count": sum(e.get("exposure_count") or 0 for e in events if e["kind"] == "exposure"),
        "tube_temperature_mean": float(temperatures.mean()) if temperatures.size else None,
        "tube_temperature_max": float(temperatures.max()) if temperatures.size else None,
        "version_points": version_points(events),
        "maintenance_at": max(maintenance, default=None),
    }


def distinct_events(events: list[dict]) -> list[dict]:
    """One copy of each ``event_id``. Copies of one event should be equal; if they are not, the
    kept one is the smallest by content, so the choice does not depend on arrival order."""
    kept = {}
    for event in events:
        current = kept.setdefault(event["event_id"], event)
        if current is not event and _content(event) < _content(current):
            kept[event["event_id"]] = event
    return list(kept.values())


def _content(event: dict) -> str:
    return repr(sorted(event.items()))


def version_points(events: list[dict]) -> tuple:
    """Time-ordered events of one window -> where its log says something new about versions.

    Returns ``(event_time, firmware_version, config_version, announced)`` tuples, in time order:
    each ``config_change`` event (``announced``) and each event reporting a version (either may
    be None) that differs from, or is the first of, that version's reports in the window. Folding
    these with `advance_versions` gives what folding every event would.
    """
    points, firmware, config = [], None, None
    for event in events:
        reported_firmware, reported_config = event.get("firmware_version"), event.get("config_version")
        announced = event["kind"] == "config_change"
        news = (reported_firmware is not None and reported_firmware != firmware
                or reported_config is not None and reported_config != config)
        if announced or news:
            points.append((event["event_time"], reported_firmware, reported_config, announced))
        firmware = firmware if reported_firmware is None else reported_firmware
        config = config if reported_config is None else reported_config
    return tuple(points)


@dataclasses.dataclass(frozen=True)
class KnownVersions:
    """A device's versions as known at some time: the last reported of each, and ``changed_at``,
    the latest time either changed (None: no change seen yet; a first report is no change)."""

    firmware_version: str | None = None
    config_version: str | None = None
    changed_at: dt.datetime | None = None


def advance_versions(known: KnownVersions, points: tuple) -> KnownVersions:
    """`known` then a window's `version_points` -> what is known after them.

    A point changes the versions when it is a ``config_change`` event, or reports a version that
    differs from the one known before it.
    """
    for at, firmware, config, announced in points:
        differs = any(new is not None and old is not None and new != old
                      for new, old in ((firmware, known.firmware_version), (config, known.config_version)))
        known = KnownVersions(
            firmware_version=known.firmware_version if firmware is None else firmware,
            config_version=known.config_version if config is None else config,
            changed_at=at if announced or differs else known.changed_at)
    return known


def _down_since_us(statuses: list[dict]) -> int | None:
    """Start of the trailing offline/service period, if the last status says the device is down."""
    if not statuses or statuses[-1]["status"] not in DOWN_STATUSES:
        return None
    since = statuses[-1]["event_time"]
    for event in reversed(statuses):
        if event["status"] not in DOWN_STATUSES:
            break
        since = event["event_time"]
    return to_micros(since)


def heartbeat_features(heartbeat_us: list[int], window_start_us: int, window_end_us: int,
                       interval_s: float, down_since_us: int | None) -> dict:
    """Heartbeat coverage of a window.

    Returns ``heartbeat_count``; ``max_heartbeat_gap_s``, the longest silence including the window
    edges; ``missed_heartbeats``, the heartbeats expected in the window (one per `interval_s`) that
    did not arrive; and ``uptime_fraction``, the share of the window covered by heartbeats (each
    vouches for one interval) and not after an offline/service status.
    """
    interval_us = interval_s * 1_000_000
    edges = np.array([window_start_us, *sorted(heartbeat_us), window_end_us], dtype=np.float64)
    gaps = np.diff(edges)
    expected = round((window_end_us - window_start_us) / interval_us)
    covered_until = window_end_us if down_since_us is None else min(window_end_us, down_since_us)
    covered = 0.0
    beats = np.array(sorted(heartbeat_us), dtype=np.float64)
    if beats.size:
        ends = np.minimum(np.r_[beats[1:], np.inf], beats + interval_us)
        covered = float(np.clip(np.minimum(ends, covered_until) - beats, 0, None).sum())
    return {
        "heartbeat_count": len(heartbeat_us),
        "max_heartbeat_gap_s": float(gaps.max()) / 1_000_000,
        "missed_heartbeats": max(expected - len(heartbeat_us), 0),
        "uptime_fraction": min(1.0, covered / (window_end_us - window_start_us)),
    }
