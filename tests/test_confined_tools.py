"""The analyst tools are confined (issue 13, B13, B14, B17): `medtwin query` reads the output tables
and nothing else; `medtwin report` reads regular files inside --images only, bounded in size."""

import datetime as dt
import os
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines import query
from schemas import ALERTS, arrow_schema
from schemas.contract import BOOL, FLOAT, INT, STRING, TIMESTAMP

T0 = dt.datetime(2026, 3, 2, 6, 0, tzinfo=dt.timezone.utc)
_PLACEHOLDERS = {STRING: "x", INT: 0, FLOAT: 0.0, BOOL: False, TIMESTAMP: T0}


@pytest.fixture
def output(tmp_path):
    """An output directory with one alerts file, and a secret file beside it (outside the output)."""
    out = tmp_path / "out"
    folder = out / "alerts" / "date=2026-03-02"
    folder.mkdir(parents=True)
    row = {f.name: [] if f.repeated else None if f.nullable else _PLACEHOLDERS[f.type] for f in ALERTS.fields}
    row.update(kind="triage", severity="urgent", onset_time=T0)
    pq.write_table(pa.Table.from_pylist([row], schema=arrow_schema(ALERTS)), folder / "part-000-000000.parquet")
    (tmp_path / "secret.csv").write_text("key,value\nMEDTWIN_PSEUDONYM_KEY,hunter2\n")
    return out


# --- medtwin query (B14) --------------------------------------------------------------------

ESCAPES = {
    "read_csv": "SELECT * FROM read_csv('{secret}')",
    "read_csv /etc/passwd": "SELECT * FROM read_csv('/etc/passwd')",
    "read_text environ": "SELECT * FROM read_text('/proc/self/environ')",
    "read_blob": "SELECT * FROM read_blob('{secret}')",
    "glob": "SELECT * FROM glob('/etc/*')",
    "dotdot": "SELECT * FROM read_csv('{out}/../secret.csv')",
    "copy out": "COPY (SELECT 1 AS x) TO '{tmp}/copied.csv'",
    "copy into output": "COPY (SELECT 1 AS x) TO '{out}/alerts/date=2026-03-02/part-000-000000.parquet'",
    "attach file": "ATTACH '{tmp}/other.duckdb' AS other",
    "attach memory": "ATTACH ':memory:' AS other",
    "export": "EXPORT DATABASE '{out}/exported'",
    "enable external access": "SET enable_external_access = true",
    "unlock": "SET lock_configuration = false",
    "reset allowed dirs": "RESET allowed_directories",
    "install": "INSTALL httpfs",
    "load": "LOAD httpfs",
    "pragma": "PRAGMA enable_external_access",
    "create": "CREATE TABLE t AS SELECT 1",
    "second statement": "SELECT 1; COPY (SELECT 1 AS x) TO '{tmp}/second.csv'",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_query_refuses_everything_but_reading_the_tables(name, output, capsys):
    tmp = output.parent
    sql = ESCAPES[name].format(secret=tmp / "secret.csv", out=output, tmp=tmp)
    before = sorted(str(p) for p in tmp.rglob("*"))
    assert main(["query", str(output), sql]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "medtwin query:" in captured.err
    assert sorted(str(p) for p in tmp.rglob("*")) == before  # nothing written anywhere


README_QUERIES = [  # the README's "Analysts: DuckDB" examples
    """SELECT patient_key, window_start, news2_score FROM latest_patient_twin
       QUALIFY row_number() OVER (PARTITION BY patient_key ORDER BY window_start DESC) = 1 AND news2_band = 'high'""",
    """SELECT device_id, max(failure_risk) AS risk, arg_max(failure_risk_reasons, failure_risk) AS why
       FROM latest_device_twin GROUP BY device_id ORDER BY risk DESC""",
    "SELECT onset_time, kind, subject_id, message FROM alerts ORDER BY onset_time",
    """SELECT acquisition_time, device_id, covid_probability, quality_reasons FROM detections
       WHERE covid_probability >= 0.5 AND quality_flag ORDER BY acquisition_time""",
    "SELECT stage, reason, sum(record_count) FROM dead_letters GROUP BY ALL ORDER BY 3 DESC",
    "DESCRIBE alerts",
    "EXPLAIN SELECT * FROM alerts",
]


@pytest.mark.parametrize("sql", README_QUERIES)
def test_the_readme_queries_still_run(sql, output):
    assert main(["query", str(output), "--csv", sql]) == 0


def test_query_still_reads_the_tables_and_prints_the_summary(output, capsys):
    assert main(["query", str(output), "--csv", "SELECT kind, severity, count(*) AS n FROM alerts GROUP BY ALL"]) == 0
    assert capsys.readouterr().out.splitlines() == ["kind,severity,n", "triage,urgent,1"]
    assert main(["query", str(output), "--csv",
                 "WITH a AS (SELECT * FROM alerts) SELECT count(*) FROM a; SELECT count(*) FROM dead_letters"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0"
    assert main(["query", str(output), "--summary"]) == 0
    assert "Alerts by kind" in capsys.readouterr().out


def test_the_connection_is_locked_after_the_views_are_open(output):
    connection = query.connect(str(output))
    settings = dict(connection.execute(
        "SELECT name, value FROM duckdb_settings() WHERE name IN "
        "('enable_external_access', 'lock_configuration', 'autoload_known_extensions', "
        "'autoinstall_known_extensions')").fetchall())
    assert settings == {"enable_external_access": "false", "lock_configuration": "true",
                        "autoload_known_extensions": "false", "autoinstall_known_extensions": "false"}
    assert query.run_sql(connection, "SELECT count(*) FROM alerts").fetchall() == [(1,)]


def test_query_refuses_an_output_directory_with_a_symlink_out(output, tmp_path, capsys):
    os.symlink(tmp_path / "secret.csv", output / "alerts" / "secret.csv")
    assert main(["query", str(output), f"SELECT * FROM read_csv('{output}/alerts/secret.csv')"]) == 2
    captured = capsys.readouterr()
    assert "symbolic link" in captured.err and "hunter2" not in captured.out + captured.err
