"""`medtwin query`: a view per output table on any run, and the latest_* views over the twin panes."""

import datetime as dt
import io

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.query import connect, print_summary, table_counts
from schemas import DEVICE_TWIN, OUTPUT_TABLES, PATIENT_TWIN, arrow_schema
from twin_fixtures import T0
from twin_fixtures import placeholder_row as _row


def _write(root, record, rows, part):
    """One Parquet file of `rows`, where the sink puts it (TABLE/date=YYYY-MM-DD/part-...)."""
    folder = root / record.name / "date=2026-03-02"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(record)), folder / f"part-000-{part:06d}.parquet")


def _pane(record, key_field, key, window_minutes, pane_index, is_final):
    start = T0 + dt.timedelta(minutes=window_minutes)
    return _row(record, **{key_field: key}, window_start=start, window_end=start + dt.timedelta(minutes=5),
                pane_index=pane_index, pane_timing="EARLY" if pane_index == 0 else "LATE", is_final=is_final)


def test_a_table_without_files_is_an_empty_view_with_the_tables_columns(tmp_path):
    _write(tmp_path, DEVICE_TWIN, [_row(DEVICE_TWIN, device_id="XR-1", is_final=True)], part=0)
    connection = connect(str(tmp_path))
    columns = [name for name, *_ in connection.execute("DESCRIBE dead_letters").fetchall()]
    assert columns == [*OUTPUT_TABLES["dead_letters"].names, "date"]
    assert connection.execute("SELECT stage, sum(record_count) FROM dead_letters GROUP BY ALL").fetchall() == []
    assert connection.execute("SELECT count(*) FROM latest_patient_twin").fetchone() == (0,)
    assert table_counts(str(tmp_path)) == {"patient_twin": 0, "device_twin": 1, "detections": 0, "alerts": 0,
                                           "dead_letters": 0, "rescored": 0}
    summary = io.StringIO()
    print_summary(str(tmp_path), out=summary)
    assert "Dead letters by stage and reason" in summary.getvalue()


def test_latest_twin_views_keep_the_final_row_of_a_window_else_its_highest_pane(tmp_path):
    for record, key_field in ((PATIENT_TWIN, "patient_key"), (DEVICE_TWIN, "device_id")):
        # Window 0 is final (pane 2); window 5 is still open at pane 1. The sink writes a file per pane.
        panes = [(0, 0, False), (0, 1, False), (0, 2, True), (5, 0, False), (5, 1, False)]
        for part, (minutes, pane_index, is_final) in enumerate(panes):
            _write(tmp_path, record, [_pane(record, key_field, "K", minutes, pane_index, is_final)], part)
    connection = connect(str(tmp_path))
    for table, key_field in (("latest_patient_twin", "patient_key"), ("latest_device_twin", "device_id")):
        rows = connection.execute(f"SELECT {key_field}, window_start, pane_index, is_final FROM {table} "
                                  "ORDER BY window_start").fetchall()
        assert [(key, start.astimezone(dt.timezone.utc), pane, final) for key, start, pane, final in rows] == [
            ("K", T0, 2, True), ("K", T0 + dt.timedelta(minutes=5), 1, False)], table
