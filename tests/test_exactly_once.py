"""Nothing lost, nothing doubled: the Parquet commit protocol under backfills, re-runs, restarts and retries.

One small hospital that crosses midnight (6 patients, 2 devices, 23:30 to 00:30 UTC) runs on the real
runners, through the session's Prism and Flink job services (`job_endpoints` in tests/conftest.py):

* a backfill of both days (one batch job per day) equals one batch run over the same landing, every
  row of every table, baselines included (issue 12: a two-day backfill kept 200 of 1,199 patient_twin
  rows of day 1; per-day backfills gave other baselines than one run);
* re-running a backfill day changes nothing, byte for byte;
* a streaming job run twice over the same input into the same output neither doubles nor wipes rows
  (issue 12: a restarted streaming job wiped the first job's rows for the same date);
* with a write step failing once per bundle (`MEDTWIN_TEST_FAIL_ONCE_DIR`), Flink retries (its restart
  strategy, from a per-job ``--flink_conf_dir``) and every table is the same as without failures.
  Prism 2.77 does not retry a failed bundle (the job fails), so this runs on Flink only.

The commit steps themselves (`commit_partition`) are checked on a local folder first, both the
atomic folder exchange and the per-object path used on gs://.
"""

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import main
from pipelines.config import FAIL_ONCE_ENV
from pipelines.query import connect
from schemas import OUTPUT_TABLES, SWAP_TABLES
from transforms.parquet_sink import COMMIT_MARKER, commit_partition, row_identity

DAYS = ("2026-03-01", "2026-03-02")
VOLATILE = {"detections": ("inference_latency_ms",)}  # wall-clock time of the model call


class FlinkConfDirOption(PipelineOptions):
    """Beam Java's FlinkPipelineOptions.flinkConfDir, known here so the job carries it to the job server."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--flink_conf_dir", help="folder with a flink-conf.yaml applied to this job")


# ------------------------------------------------------------------------------ commit steps, no runner

def _staged(tmp_path, name: str, values: list[int]) -> str:
    path = tmp_path / "staged" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": values}), path)
    return str(path)


def _partition(root, table="alerts", date="2026-03-01") -> dict:
    folder = root / table / f"date={date}"
    if not folder.exists():
        return {}
    return {p.name: pq.read_table(p).column("x").to_pylist() for p in sorted(folder.glob("*.parquet"))}


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["folder-exchange", "per-object"])
def test_a_commit_replaces_the_partition_whole_and_a_retried_commit_changes_nothing(tmp_path, atomic_swap):
    root = tmp_path / "out"
    first = [(0, _staged(tmp_path, "a", [1, 2])), (1, _staged(tmp_path, "b", [3]))]
    commit_partition(str(root), "job-1", "alerts", "2026-03-01", first, 2, atomic_swap=atomic_swap)
    assert _partition(root) == {"part-000-of-002.parquet": [1, 2], "part-001-of-002.parquet": [3]}
    # The next job has one shard: the partition is its file alone, no leftover of the first job.
    second = [(0, _staged(tmp_path, "c", [4]))]
    commit_partition(str(root), "job-2", "alerts", "2026-03-01", second, 1, atomic_swap=atomic_swap)
    assert _partition(root) == {"part-000-of-001.parquet": [4]}
    # The same commit again (a retried bundle: its staged files are gone, they were moved): no change.
    commit_partition(str(root), "job-2", "alerts", "2026-03-01", second, 1, atomic_swap=atomic_swap)
    assert _partition(root) == {"part-000-of-001.parquet": [4]}
    if atomic_swap:
        assert (root / "alerts" / "date=2026-03-01" / COMMIT_MARKER).read_text() == "job-2"
        # A day left without rows is removed.
        commit_partition(str(root), "job-3", "alerts", "2026-03-01", [], 1)
        assert not (root / "alerts" / "date=2026-03-01").exists()


# ------------------------------------------------------------------------------------- on the runners

@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    folder = tmp_path_factory.mktemp("midnight") / "in"
    assert main(["simulate", "--out", str(folder), "--patients", "6", "--devices", "2", "--hours", "1",
                 "--seed", "7", "--start", "2026-03-01T23:30", "--corrupt-fraction", "0.01", "--quiet"]) == 0
    return folder


def _on(runner: str, endpoints: dict) -> list[str]:
    return ["--runner", runner, f"--job_endpoint={endpoints[runner]}", "--model_per_process"]


def _backfill_on_prism(hospital, out, endpoints, start, end):
    assert main(["backfill", "--input", str(hospital), "--output", str(out), "--demo", "--start", start,
                 "--end", end, "--model_per_process", "--runner=PrismRunner",
                 f"--job_endpoint={endpoints['prism']}", "--environment_type=LOOPBACK"]) == 0


@pytest.fixture(scope="module")
def batch(hospital, tmp_path_factory, job_endpoints):  # noqa: F811
    out = tmp_path_factory.mktemp("batch") / "out"
    assert main(["run", "--input", str(hospital), "--output", str(out), "--demo", *_on("prism", job_endpoints)]) == 0
    return out


def _tables(out) -> dict:
    """Every table's rows (volatile columns left out), sorted."""
    connection = connect(str(out))
    tables = {}
    for table in OUTPUT_TABLES:
        leave_out = VOLATILE.get(table, ())
        columns = [name for (name,) in connection.execute(f"select column_name from (describe {table})").fetchall()
                   if name not in leave_out]
        tables[table] = sorted(connection.execute(f"select {', '.join(columns)} from {table}").fetchall(), key=repr)
    return tables


def _files(out) -> dict:
    return {os.path.relpath(os.path.join(folder, name), out): hashlib.sha256(
                open(os.path.join(folder, name), "rb").read()).hexdigest()
            for folder, _, names in os.walk(out) for name in names if name.endswith(".parquet")}


def test_the_hospital_crosses_midnight_and_fills_every_table(batch):
    days = {table: {row[-1].isoformat() for row in rows} for table, rows in _tables(batch).items()}
    assert days["patient_twin"] == set(DAYS) and days["device_twin"] == set(DAYS)
    assert all(days[table] for table in OUTPUT_TABLES if table not in SWAP_TABLES), days


def test_a_backfill_across_midnight_equals_one_batch_run(hospital, batch, tmp_path, job_endpoints):  # noqa: F811
    out = tmp_path / "backfill"
    _backfill_on_prism(hospital, out, job_endpoints, *DAYS)
    expected, got = _tables(batch), _tables(out)
    for table in OUTPUT_TABLES:
        assert got[table] == expected[table], table
    # The day-2 job carried the twins' state across midnight: each patient's first window of day 2 has
    # the baseline day 1 built (a job that started empty at midnight would have none).
    first_of_day_2 = connect(str(out)).execute("""
        select patient_key, baseline_heart_rate from patient_twin where date = DATE '2026-03-02'
        qualify row_number() over (partition by patient_key order by window_start) = 1""").fetchall()
    assert first_of_day_2 and all(baseline is not None for _, baseline in first_of_day_2)


def test_re_running_a_backfill_day_changes_nothing(hospital, tmp_path, job_endpoints):  # noqa: F811
    out = tmp_path / "rerun"
    _backfill_on_prism(hospital, out, job_endpoints, DAYS[0], DAYS[0])
    files, tables = _files(out), _tables(out)
    assert files and tables["patient_twin"]
    _backfill_on_prism(hospital, out, job_endpoints, DAYS[0], DAYS[0])
    assert _files(out) == files
    assert _tables(out) == tables
    assert not (out / "_temporary").exists()


def test_a_restarted_streaming_job_neither_doubles_nor_wipes_rows(hospital, tmp_path, job_endpoints):  # noqa: F811
    out = tmp_path / "streaming"
    argv = ["run", "--input", str(hospital), "--output", str(out), "--demo", "--streaming",
            *_on("prism", job_endpoints)]
    assert main(argv) == 0
    first = _tables(out)
    assert first["patient_twin"] and first["dead_letters"]
    assert main(argv) == 0
    second = _tables(out)
    for table in OUTPUT_TABLES:
        kept = {repr(row) for row in second[table]}
        assert all(repr(row) in kept for row in first[table]), f"{table}: the second job removed rows of the first"
        record = OUTPUT_TABLES[table]
        columns = [c for c in record.names if c not in VOLATILE.get(table, ())]
        identities = [row_identity(record, dict(zip(columns, row))) for row in second[table]]
        assert len(identities) == len(set(identities)), f"{table}: a row is there twice"
    for table in ("patient_twin", "device_twin"):
        final = [row for row in second[table] if row[OUTPUT_TABLES[table].names.index("is_final")]]
        assert final == [row for row in first[table] if row[OUTPUT_TABLES[table].names.index("is_final")]]


def test_a_write_step_failing_once_per_bundle_leaves_every_table_identical_on_flink(
        hospital, batch, tmp_path, monkeypatch, job_endpoints):  # noqa: F811
    failures = tmp_path / "failed-bundles"
    failures.mkdir()
    conf = tmp_path / "flink-conf"
    conf.mkdir()
    (conf / "flink-conf.yaml").write_text("restart-strategy: fixed-delay\nrestart-strategy.fixed-delay.attempts: 20\n"
                                          "restart-strategy.fixed-delay.delay: 100 ms\n")
    monkeypatch.setenv(FAIL_ONCE_ENV, str(failures))
    out = tmp_path / "flink"
    assert main(["run", "--input", str(hospital), "--output", str(out), "--demo", *_on("flink", job_endpoints),
                 f"--flink_conf_dir={conf}"]) == 0
    assert len(os.listdir(failures)) >= len(OUTPUT_TABLES) - len(SWAP_TABLES), "no bundle failed: the retry was not exercised"
    expected, got = _tables(batch), _tables(out)
    for table in OUTPUT_TABLES:
        assert got[table] == expected[table], table
    assert not (out / "_temporary").exists()
