"""Which arrival days a backfill of an event day reads, and which days it owns (no runner needed).

The runs themselves (a backfill across midnight equals one batch run, a re-run day changes nothing)
are in tests/test_exactly_once.py.
"""

import argparse
import datetime as dt

from launch.backfill import arrival_days, first_landed_day, horizon, last_arrival_day
from pipelines.cli import main

D = dt.date(2026, 3, 2)


def _flags(**overrides) -> argparse.Namespace:
    values = dict(window=60, allowed_lateness=7200, device_window=300, device_allowed_lateness=600,
                  triage_window=3600)
    return argparse.Namespace(**{**values, **overrides})


def test_the_default_horizon_ends_the_day_after():
    assert horizon(_flags()) == dt.timedelta(seconds=7260 + 3600)
    assert last_arrival_day(D, horizon(_flags())) == D + dt.timedelta(days=1)


def test_a_lateness_past_the_next_midnight_reads_one_more_day():
    reach = horizon(_flags(allowed_lateness=86_400))
    assert last_arrival_day(D, reach) == D + dt.timedelta(days=2)


def test_a_day_reads_history_from_its_start_and_at_least_the_day_before():
    reach = horizon(_flags())
    assert arrival_days(D, None, reach) == ("2026-03-01", "2026-03-02", "2026-03-03")
    assert arrival_days(D, dt.date(2026, 2, 27), reach) == (
        "2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02", "2026-03-03")


def test_the_first_landed_day_is_the_earliest_date_folder_of_any_stream(tmp_path):
    assert first_landed_day(str(tmp_path)) is None
    for stream, day in (("wearables", "2026-03-02"), ("device_logs", "2026-02-28"), ("observations", "2026-03-05")):
        folder = tmp_path / stream / f"date={day}"
        folder.mkdir(parents=True)
        (folder / f"{stream}-06.jsonl").write_text("{}\n")
    assert first_landed_day(str(tmp_path)) == dt.date(2026, 2, 28)


def test_each_day_is_one_job_that_owns_that_day_and_reads_through_the_next(capsys):
    assert main(["backfill", "--input", "x", "--demo", "--start", "2026-03-01", "--end", "2026-03-02",
                 "--history_start", "2026-02-27", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[4:7] for line in lines] == [
        ["2026-03-01:", "reads", "2026-02-27..2026-03-02:"], ["2026-03-02:", "reads", "2026-02-27..2026-03-03:"]]
