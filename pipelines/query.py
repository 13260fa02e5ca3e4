"""`medtwin query OUT "SQL"`: DuckDB over the Parquet tables, for analysts.

Every output table is a view of the same name (``patient_twin``,
``device_twin``, ``alerts``, ``dead_letters``, ``detections``), read from OUT
with Hive partitioning (the ``date`` column); a table that has no files yet
(a run without dead letters, say) is an empty view with the same columns, so
queries work on any run. Twin tables have one row per pane; the
``latest_patient_twin`` / ``latest_device_twin`` views keep the best row of
each window: the final one if it exists, else the highest pane index.

    medtwin query demo/out "SELECT news2_band, count(*) FROM latest_patient_twin GROUP BY 1"
    medtwin query demo/out --summary

Confinement: the SQL comes from a person, and DuckDB can read any file, write
any file (COPY ... TO), attach databases and install extensions.  Once the
views are open the connection is locked down (`confine`): no external access
but the output directory (``allowed_directories``), no extension installing or
autoloading, and ``lock_configuration`` so no statement can undo it; and
`run_sql` runs read-only statements only (SELECT, EXPLAIN), so nothing can be
written even inside the output directory.  An output directory holding a
symbolic link is refused: DuckDB checks allowed directories on the path
string, so a link inside it could lead anywhere.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import pyarrow as pa

from schemas import OUTPUT_TABLES, arrow_schema

_LATEST = """
CREATE OR REPLACE VIEW latest_{table} AS
SELECT * FROM {table}
QUALIFY row_number() OVER (PARTITION BY {key}, window_start ORDER BY is_final DESC, pane_index DESC) = 1
"""
_TWIN_KEYS = {"patient_twin": "patient_key", "device_twin": "device_id"}
# Statement types analyst SQL may run: reading only (DESCRIBE, SHOW, SUMMARIZE parse as SELECT).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")
# The Hive partition column of the files (`transforms.sinks` writes TABLE/date=YYYY-MM-DD/...).
_PARTITION = pa.field("date", pa.date32())

SUMMARY_QUERIES = {
    "Patients in the high NEWS2 band in their latest window": """
        SELECT patient_key, window_start, news2_score, news2_band, spo2_mean, respiratory_rate_mean,
               temperature_c_mean
        FROM latest_patient_twin
        QUALIFY row_number() OVER (PARTITION BY patient_key ORDER BY window_start DESC) = 1
            AND news2_band = 'high'
        ORDER BY news2_score DESC LIMIT 10""",
    "Devices at risk (highest failure risk per device)": """
        SELECT device_id, max(failure_risk) AS max_risk, arg_max(window_start, failure_risk) AS at,
               arg_max(failure_risk_reasons, failure_risk) AS reasons
        FROM latest_device_twin GROUP BY device_id ORDER BY max_risk DESC LIMIT 10""",
    "Alerts by kind": "SELECT kind, severity, count(*) AS alerts FROM alerts GROUP BY ALL ORDER BY ALL",
    "Alert timeline (first 15)": """
        SELECT onset_time, kind, subject_id, message FROM alerts ORDER BY onset_time, kind LIMIT 15""",
    "Dead letters by stage and reason": """
        SELECT stage, regexp_replace(reason, '[0-9].*$', '') AS reason, sum(record_count) AS records
        FROM dead_letters GROUP BY ALL ORDER BY records DESC LIMIT 15""",
}


class QueryRefused(Exception):
    """SQL or an output directory the confined tool will not run on; the message says why."""


def connect(output_dir: str, *, timezone: str | None = None):
    """A DuckDB connection with a view per output table over its files under `output_dir` (empty
    when it has none), and the latest_* views, confined to reading `output_dir` (`confine`).
    timezone: the session TimeZone (e.g. "UTC"), set before the configuration is locked.

    Raises QueryRefused when `output_dir` holds a symbolic link.
    """
    import duckdb

    output_dir = os.path.realpath(output_dir)
    links = [os.path.join(folder, name) for folder, dirs, names in os.walk(output_dir)
             for name in dirs + names if os.path.islink(os.path.join(folder, name))]
    if links:
        raise QueryRefused(f"{output_dir} holds {len(links)} symbolic link(s) (first: "
                           f"{os.path.relpath(links[0], output_dir)}); refusing to open it")
    connection = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for table, record in OUTPUT_TABLES.items():
        folder = os.path.join(output_dir, table)
        if any(name.endswith(".parquet") for _, _, names in os.walk(folder) for name in names):
            pattern = os.path.join(folder, "**", "*.parquet").replace("'", "''")
            connection.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                               f"read_parquet('{pattern}', hive_partitioning = true, union_by_name = true)")
        else:
            schema = arrow_schema(record)
            connection.register(table, schema.append(_PARTITION).empty_table())
        if table in _TWIN_KEYS:
            connection.execute(_LATEST.format(table=table, key=_TWIN_KEYS[table]))
    if timezone is not None:
        connection.execute("SET TimeZone = ?", [timezone])
    confine(connection, output_dir)
    return connection


def confine(connection, directory: str) -> None:
    """Lock `connection` down to reading files under `directory`; nothing can undo it afterwards."""
    connection.execute("SET allowed_directories = ?", [[directory.rstrip(os.sep) + os.sep]])
    connection.execute("SET enable_external_access = false")
    connection.execute("SET allow_community_extensions = false")
    connection.execute("SET lock_configuration = true")


def run_sql(connection, sql: str):
    """The result of analyst `sql` (its last statement) on a confined connection.

    Raises QueryRefused for any statement that is not read-only (COPY, ATTACH, SET, INSTALL,
    CREATE, PRAGMA, CALL...), before any of them runs; duckdb.Error for SQL DuckDB refuses.
    """
    statements = connection.extract_statements(sql)
    refused = sorted({s.type.name for s in statements if s.type.name not in READ_ONLY_STATEMENTS})
    if refused:
        raise QueryRefused(f"only {' and '.join(READ_ONLY_STATEMENTS)} statements are run here, "
                           f"not {', '.join(refused)}")
    return connection.sql(sql)


def table_counts(output_dir: str) -> dict[str, int]:
    """Rows per output table (0 for a table without files)."""
    connection = connect(output_dir)
    return {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in OUTPUT_TABLES}


def print_summary(output_dir: str, out=None) -> None:
    """What a run wrote: rows per table, then the example analyses (to `out`, else sys.stdout)."""
    out = out or sys.stdout
    connection = connect(output_dir)
    counts = table_counts(output_dir)
    print(f"\nTables in {output_dir}:", file=out)
    for table, rows in counts.items():
        print(f"  {table:<14} {rows:>9,} rows", file=out)
    for title, sql in SUMMARY_QUERIES.items():
        print(f"\n{title}:", file=out)
        print(connection.sql(sql), file=out)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "query", help="query the output tables with DuckDB", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the pipeline's Parquet output directory")
    parser.add_argument("sql", nargs="?", help="a DuckDB SQL statement over the table views")
    parser.add_argument("--summary", action="store_true", help="print row counts and the example analyses")
    parser.add_argument("--csv", action="store_true", help="print the result as CSV")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import duckdb

    if not os.path.isdir(args.output):
        print(f"medtwin query: no output directory {args.output}", file=sys.stderr)
        return 2
    try:
        if args.summary or not args.sql:
            print_summary(args.output)
            return 0
        result = run_sql(connect(args.output), args.sql)
    except (duckdb.Error, QueryRefused) as error:
        print(f"medtwin query: {error}", file=sys.stderr)
        return 2
    if result is None:
        return 0
    if args.csv:
        # Through Python's stdout, not DuckDB's write_csv("/dev/stdout"), which writes from offset 0
        # of whatever stdout is (a file or a pipe) around Python's own buffer.
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows(result.fetchall())
    else:
        result.show(max_rows=200, max_width=200)
    return 0
