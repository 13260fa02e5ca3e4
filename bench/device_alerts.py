"""Benchmark: does the device twin flag failing imaging devices before they fail?

For each seed, simulates a hospital (`--devices` devices over `--hours`; the
simulator makes about one device in four fail, after a 30-90 minute run-up),
runs `medtwin run` on it (batch, DirectRunner, Parquet) and compares the
``device_failure_risk`` alerts with the simulator's truth:

* **lead time**: failure time minus the onset of the first alert on that
  device within `--horizon` hours before its failure (a failure with no such
  alert is a miss);
* **false alarms**: alert onsets on a device that does not fail within the
  horizon after them, per device-day of the devices that did not fail.

    python bench/device_alerts.py                      # 6 seeds x 12 devices x 8 h
    python bench/device_alerts.py --seeds 2 --hours 4
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import main as medtwin  # noqa: E402
from pipelines.query import connect  # noqa: E402
from schemas.contract import parse_timestamp  # noqa: E402


def failure_times(hospital: Path) -> dict[str, dt.datetime]:
    """A simulated hospital's truth -> {device: failure time} of the devices that fail."""
    truth = json.loads((hospital / "truth" / "device_failures.json").read_text())
    return {f["device_id"]: parse_timestamp(f["failure_time"], "failure_time") for f in truth["failures"]}


def judge(alerts: list[tuple[str, dt.datetime]], failures: dict[str, dt.datetime], horizon: dt.timedelta):
    """(device, onset) alerts and {device: failure time} -> (lead times in minutes, misses, false alarms)."""
    leads, misses, false_alarms = [], 0, 0
    for device, failed_at in failures.items():
        onsets = [onset for d, onset in alerts if d == device and failed_at - horizon <= onset <= failed_at]
        if onsets:
            leads.append((failed_at - min(onsets)).total_seconds() / 60)
        else:
            misses += 1
    for device, onset in alerts:
        failed_at = failures.get(device)
        if failed_at is None or onset < failed_at - horizon:   # alerts after a failure are not counted
            false_alarms += 1
    return leads, misses, false_alarms


def run_seed(seed: int, args, work: Path):
    hospital, out = work / f"h{seed}", work / f"o{seed}"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert medtwin(["simulate", "--out", str(hospital), "--patients", "2", "--devices", str(args.devices),
                        "--hours", str(args.hours), "--seed", str(seed)]) == 0
        assert medtwin(["run", "--input", str(hospital), "--output", str(out), "--demo"]) == 0
    failures = failure_times(hospital)
    rows = connect(str(out)).execute(
        "select subject_id, onset_time from alerts where kind = 'device_failure_risk'").fetchall()
    alerts = [(device, onset.astimezone(dt.timezone.utc)) for device, onset in rows]
    return failures, alerts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--devices", type=int, default=12)
    parser.add_argument("--hours", type=float, default=8)
    parser.add_argument("--horizon", type=float, default=3.0, help="hours before a failure that count [%(default)s]")
    args = parser.parse_args(argv)

    horizon = dt.timedelta(hours=args.horizon)
    leads, misses, false_alarms, failed, healthy_hours = [], 0, 0, 0, 0.0
    with tempfile.TemporaryDirectory(prefix="medtwin-devices-") as work:
        for seed in range(args.seeds):
            failures, alerts = run_seed(seed, args, Path(work))
            seed_leads, seed_misses, seed_false = judge(alerts, failures, horizon)
            leads += seed_leads
            misses += seed_misses
            false_alarms += seed_false
            failed += len(failures)
            healthy_hours += (args.devices - len(failures)) * args.hours
            print(f"seed {seed}: {len(failures)} failures, lead times (min) "
                  f"{[round(x) for x in seed_leads]}, missed {seed_misses}, false alarms {seed_false}")
    detected = len(leads)
    print(f"\n{args.seeds} seeds x {args.devices} devices x {args.hours:g} h: {failed} failures")
    print(f"detected before failure: {detected}/{failed}"
          + (f"; lead time median {statistics.median(leads):.0f} min, min {min(leads):.0f}, max {max(leads):.0f}"
             if leads else ""))
    print(f"false alarms: {false_alarms} in {healthy_hours / 24:.1f} device-days of devices that did not fail "
          f"({false_alarms / (healthy_hours / 24):.2f} per device-day)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
