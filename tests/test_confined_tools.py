"""The analyst tools are confined (issue 13, B13, B14, B17): `medtwin query` reads the output tables
and nothing else; `medtwin report` reads regular files inside --images only, bounded in size."""

import datetime as dt
import os
import pathlib

import numpy as np
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


# --- medtwin report (B13, B17) and fetch (B17) ------------------------------------------------

SOP = "1.2.826.0.1.3680043.8.498.777"


def _xray(path):
    from model.radiograph import synthesize_chest_xray
    from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph

    study = StudyInfo(study_uid="1.2.3", series_uid="1.2.3.4", sop_uid=SOP, acquisition_time=T0, device_id="XR-1",
                      modality="DX", manufacturer="Sim", model_name="DR", institution="Springfield General",
                      station_name="XR1", accession_number="ACC1", referring_physician="Who^Doctor")
    patient = PatientIdentity(patient_id="MRN0099001", name="Doe^Jane", birth_date="19700101", sex="F",
                              address="1 Main Street")
    write_chest_radiograph(path, synthesize_chest_xray(np.random.default_rng(3), rows=96, cols=80), patient, study)
    return path


def _detection():
    return {"sop_instance_uid": SOP, "acquisition_time": T0, "covid_probability": 0.5, "boxes": []}


def _panel(images):
    from pipelines.report import index_images, load_xray

    return load_xray(_detection(), index_images(str(images)), str(images), 64)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images" / "1.2.3"
    folder.mkdir(parents=True)
    _xray(tmp_path / "outside.dcm")  # a real X-ray the report must not reach
    return tmp_path / "images"


def test_report_draws_a_regular_file_inside_images(images):
    _xray(images / "1.2.3" / f"{SOP}.dcm")
    panel = _panel(images)
    assert panel.image is not None and panel.missing_reason is None


def test_report_does_not_follow_a_symlink_out_of_images(images):
    os.symlink(images.parent / "outside.dcm", images / "1.2.3" / f"{SOP}.dcm")
    panel = _panel(images)
    assert panel.image is None and "symbolic link" in panel.missing_reason


def test_report_refuses_a_hard_link_to_a_file_outside_images(images):
    os.link(images.parent / "outside.dcm", images / "1.2.3" / f"{SOP}.dcm")
    panel = _panel(images)
    assert panel.image is None and "hard link" in panel.missing_reason


def test_report_does_not_hang_on_a_fifo_named_like_a_study(images):
    import threading

    fifo = images / "1.2.3" / f"{SOP}.dcm"
    os.mkfifo(fifo)
    panels = []
    worker = threading.Thread(target=lambda: panels.append(_panel(images)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # the old code blocks in open(): release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail("load_xray blocked on a FIFO")
    assert panels[0].image is None and "not a regular file" in panels[0].missing_reason


def _vm_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _zero_in_a_child(images, queue):
    import resource

    try:  # everything load_xray needs is imported by the parent; allow 1 GiB more address space than now
        limit = (_vm_kib("VmSize") + (1 << 20)) << 10
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # the old code read /dev/zero until it ran out
        with open("/proc/self/clear_refs", "w") as clear:  # "5" resets the peak (VmHWM) to the current RSS
            clear.write("5")
        before = _vm_kib("VmRSS")
        panel = _panel(images)
        queue.put((panel.missing_reason, _vm_kib("VmHWM") - before))
    except BaseException as error:  # reported, not lost with the child
        queue.put((f"child failed: {type(error).__name__}", -1))


def test_report_does_not_read_a_symlink_to_dev_zero(images):
    import multiprocessing

    import model.preprocess  # noqa: F401  (imported before the fork, so the child's growth is its reading)
    import pipelines.report  # noqa: F401
    import transforms.dicom_decode  # noqa: F401

    os.symlink("/dev/zero", images / "1.2.3" / f"{SOP}.dcm")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_zero_in_a_child, args=(images, queue))
    child.start()
    reason, grown_kib = queue.get(timeout=120)
    child.join(timeout=30)
    assert "symbolic link" in reason
    assert 0 <= grown_kib < 256 << 10  # under 256 MiB more than before the call: the file was never read


def test_report_refuses_a_file_over_the_size_cap(images, monkeypatch):
    from pipelines import report

    _xray(images / "1.2.3" / f"{SOP}.dcm")
    monkeypatch.setattr(report, "MAX_IMAGE_BYTES", 1000)
    panel = _panel(images)
    assert panel.image is None and "over the size cap" in panel.missing_reason


def test_fetch_refuses_a_hard_link_inside_the_prefix_to_a_file_outside(tmp_path):
    from transforms import dicom_fetch

    (tmp_path / "input").mkdir()
    secret = _xray(tmp_path / "secret.dcm")
    os.link(secret, tmp_path / "input" / "linked.dcm")
    with pytest.raises(dicom_fetch.FetchRejected) as caught:
        dicom_fetch.fetch_bytes(str(tmp_path / "input" / "linked.dcm"), (str(tmp_path / "input"),), 1 << 20)
    assert caught.value.kind == dicom_fetch.HARD_LINK and "2 names" in caught.value.detail


def test_fetch_does_not_hang_on_a_fifo(tmp_path):
    from transforms import dicom_fetch

    (tmp_path / "input").mkdir()
    os.mkfifo(tmp_path / "input" / "pipe.dcm")
    with pytest.raises(dicom_fetch.FetchRejected) as caught:
        dicom_fetch.fetch_bytes(str(tmp_path / "input" / "pipe.dcm"), (str(tmp_path / "input"),), 1 << 20)
    assert caught.value.kind == dicom_fetch.NOT_A_FILE
