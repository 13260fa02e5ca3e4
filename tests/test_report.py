"""`medtwin report`: one patient's PNG from the Parquet tables and the DICOM files."""
import datetime as dt
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.radiograph import synthesize_chest_xray
from pipelines.cli import main
from pipelines.report import (
    NOT_FOR_CLINICAL_USE,
    draw_xray,
    index_images,
    load_patient,
    load_xray,
    render,
)
from schemas import ALERTS, DETECTIONS, PATIENT_TWIN, arrow_schema
from simulator.dicom import PatientIdentity, StudyInfo, write_chest_radiograph
from transforms.pseudonymise import DEMO_KEY, KEY_ENV, Pseudonymiser

START = dt.datetime(2024, 3, 1, 10, 0, tzinfo=dt.timezone.utc)
PATIENT = PatientIdentity(patient_id="MRN0099001", name="Doe^Jane", birth_date="19700101", sex="F",
                          address="1 Main Street, Springfield")
KEY = Pseudonymiser(DEMO_KEY).patient_key(PATIENT.patient_id)
OTHER_KEY = Pseudonymiser(DEMO_KEY).patient_key("MRN0099002")
NEWS2 = (1, 2, 3, 5, 6, 7, 8, 8)  # one window a minute, rising into the high band
BANDS = {1: "low", 2: "low", 3: "low", 5: "medium", 6: "medium", 7: "high", 8: "high"}
ROWS, COLS = 200, 160  # non-square, so a swapped x/y would show
SOP, MISSING_SOP = "1.2.826.0.1.3680043.8.498.103", "1.2.826.0.1.3680043.8.498.199"
STUDY = StudyInfo(
    study_uid="1.2.826.0.1.3680043.8.498.101", series_uid="1.2.826.0.1.3680043.8.498.102", sop_uid=SOP,
    acquisition_time=START + dt.timedelta(minutes=5, seconds=20), device_id="XR-1", modality="DX",
    manufacturer="Simulated Imaging", model_name="DR-500", institution="Springfield General",
    station_name="XR1", accession_number="ACC1", referring_physician="Who^Doctor")


def _twin_row(key, minute, score, *, pane_index=0, is_final=True, heart_rate=None):
    start = START + dt.timedelta(minutes=minute)
    return {
        "patient_key": key, "window_start": start, "window_end": start + dt.timedelta(minutes=1),
        "pane_index": pane_index, "pane_timing": "ON_TIME" if is_final else "EARLY", "is_final": is_final,
        "sample_count": 12, "duplicates_removed": 0, "completeness": 1.0,
        "heart_rate_mean": heart_rate if heart_rate is not None else 70.0 + 5 * score,
        "spo2_mean": 97.0 - score / 2, "respiratory_rate_mean": 14.0 + score,
        "temperature_c_mean": 36.8 + score / 10, "systolic_bp_mean": 125.0 - 3 * score,
        "news2_score": score, "news2_band": BANDS[score], "news2_missing": [], "stale": False,
    }


def _alert(kind, subject_type, subject_id, minute, severity="warning"):
    onset = START + dt.timedelta(minutes=minute)
    return {"alert_id": f"{kind}:{subject_id}:{onset.isoformat()}", "kind": kind, "subject_type": subject_type,
            "subject_id": subject_id, "severity": severity, "onset_time": onset,
            "window_end": onset + dt.timedelta(minutes=1), "message": f"{kind} started", "evidence": "{}"}


def _detection(key, sop, boxes, acquired):
    return {"sop_instance_uid": sop, "study_instance_uid": STUDY.study_uid, "series_instance_uid": STUDY.series_uid,
            "patient_key": key, "device_id": "XR-1", "acquisition_time": acquired, "model_name": "tiny-detector",
            "model_version": "abc123", "boxes": boxes, "covid_probability": 0.87, "image_rows": ROWS,
            "image_columns": COLS, "inference_latency_ms": 12.0, "batch_size": 1, "quality_flag": False,
            "quality_reasons": []}


def _write_table(out, record, rows, part=0):
    """As `transforms.sinks.WriteParquetTable` lays it out: OUT/<table>/date=YYYY-MM-DD/part-*.parquet."""
    by_date = {}
    for row in rows:
        by_date.setdefault(row[record.partition_field].date().isoformat(), []).append(row)
    for date, day_rows in by_date.items():
        folder = out / record.name / f"date={date}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(day_rows, schema=arrow_schema(record)),
                       folder / f"part-000-{part:06d}.parquet")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    """Tables for two patients and the DICOM file of the first one's X-ray."""
    root = tmp_path_factory.mktemp("report")
    radiograph = synthesize_chest_xray(np.random.default_rng(5), rows=ROWS, cols=COLS, num_opacities=1)
    dicom = root / "sim" / "dicom" / STUDY.study_uid
    dicom.mkdir(parents=True)
    write_chest_radiograph(dicom / f"{SOP}.dcm", radiograph, PATIENT, STUDY)
    x1, y1, x2, y2 = radiograph.opacities[0].box
    box = {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": 0.91, "label": "opacity"}

    out = root / "out"
    twin = [_twin_row(KEY, minute, score) for minute, score in enumerate(NEWS2)]
    # Early panes the final ones replace: the report must keep one row per window, the final one.
    twin += [_twin_row(KEY, minute, NEWS2[minute], pane_index=0, is_final=False, heart_rate=150.0)
             for minute in (2, 6)]
    for row in twin[:len(NEWS2)]:
        if row["window_start"].minute in (2, 6):
            row["pane_index"] = 1
    twin += [_twin_row(OTHER_KEY, minute, 1) for minute in range(3)]
    _write_table(out, PATIENT_TWIN, twin)
    _write_table(out, ALERTS, [
        _alert("news2_band", "patient", KEY, 3), _alert("news2_band", "patient", KEY, 5, "urgent"),
        _alert("news2_band", "patient", OTHER_KEY, 1), _alert("device_failure_risk", "device", "XR-1", 2)])
    acquired = STUDY.acquisition_time
    _write_table(out, DETECTIONS, [
        _detection(KEY, SOP, [box], acquired),
        _detection(KEY, MISSING_SOP, [], acquired + dt.timedelta(minutes=1)),
        _detection(OTHER_KEY, "1.2.3.4", [], acquired)])
    return {"root": root, "out": out, "images": root / "sim" / "dicom", "box": box}


def _report(hospital, *args):
    png = hospital["root"] / "png" / "patient.png"
    code = main(["report", str(hospital["out"]), "--output", str(png), *args])
    return code, png


def test_report_pseudonymises_the_patient_id_and_writes_the_png(hospital, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, png = _report(hospital, "--patient", PATIENT.patient_id, "--demo", "--images", str(hospital["images"]))
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(r"8 windows, 2 alerts, 2 images \(1 drawn, 1 not found", printed), printed
    assert str(png) in printed and KEY in printed
    assert PATIENT.patient_id not in printed
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 1000 and image.size[1] >= 600
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # The box colour (#ff3030) appears only where a box is drawn: the X-ray made it onto the page.
    red = (pixels[..., 0] > 220) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 50


def test_report_by_pseudonym_needs_no_key(hospital, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, png = _report(hospital, "--patient_key", OTHER_KEY)
    assert code == 0
    assert "3 windows, 1 alerts, 1 images (0 drawn, 1 not found" in capsys.readouterr().out
    assert png.stat().st_size > 10_000


def test_unknown_patient_exits_2_naming_what_was_searched(hospital, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, png = _report(hospital, "--patient", "MRN-NOT-HERE", "--demo")
    error = capsys.readouterr().err
    assert code == 2
    unknown = Pseudonymiser(DEMO_KEY).patient_key("MRN-NOT-HERE")
    assert f"no patient with pseudonym {unknown}" in error
    assert "patient_twin, alerts, detections" in error and str(hospital["out"]) in error


def test_a_different_key_finds_no_one(hospital, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    code, _ = _report(hospital, "--patient", PATIENT.patient_id, "--pseudonym_key", "another-key-of-16-chars")
    assert code == 2
    assert "no patient with pseudonym" in capsys.readouterr().err


def test_missing_tables_dir_and_missing_key_exit_2(hospital, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    png = hospital["root"] / "never.png"
    assert main(["report", str(hospital["root"] / "nowhere"), "--patient_key", KEY, "--output", str(png)]) == 2
    assert "no tables directory" in capsys.readouterr().err
    assert main(["report", str(hospital["out"]), "--patient", PATIENT.patient_id, "--output", str(png)]) == 2
    assert "no pseudonymisation key" in capsys.readouterr().err
    assert not png.exists()


def test_windows_are_the_final_panes_and_only_this_patients_rows(hospital):
    record = load_patient(str(hospital["out"]), KEY)
    assert [w["news2_score"] for w in record.windows] == list(NEWS2)
    assert [w["window_start"] for w in record.windows] == [START + dt.timedelta(minutes=m) for m in range(8)]
    # The early panes said 150 bpm; the final panes of minutes 2 and 6 win.
    assert [w["heart_rate_mean"] for w in record.windows] == [70.0 + 5 * s for s in NEWS2]
    assert [(a["kind"], a["onset_time"]) for a in record.alerts] == [
        ("news2_band", START + dt.timedelta(minutes=3)), ("news2_band", START + dt.timedelta(minutes=5))]
    assert [d["sop_instance_uid"] for d in record.detections] == [SOP, MISSING_SOP]


def test_boxes_in_original_pixels_land_on_the_scaled_image(hospital):
    from matplotlib.figure import Figure

    record = load_patient(str(hospital["out"]), KEY)
    detection = record.detections[0]
    panel = load_xray(detection, index_images(str(hospital["images"])), str(hospital["images"]), display_size=100)
    scale = 100 / ROWS  # the longest side (rows) is shown at 100 pixels
    assert panel.image.shape == (100, 80) and panel.scale == pytest.approx(scale)
    ax = Figure().add_subplot()
    (rectangle,) = draw_xray(ax, panel)
    box = hospital["box"]
    assert rectangle.get_xy() == pytest.approx((box["x1"] * scale, box["y1"] * scale))
    assert rectangle.get_width() == pytest.approx((box["x2"] - box["x1"]) * scale)
    assert rectangle.get_height() == pytest.approx((box["y2"] - box["y1"]) * scale)
    # Where the corners fall on the axes, which the image fills top-down: fractions of the original size.
    to_axes = ax.transAxes.inverted().transform
    left_top = to_axes(ax.transData.transform(rectangle.get_xy()))
    right_bottom = to_axes(ax.transData.transform(
        (rectangle.get_x() + rectangle.get_width(), rectangle.get_y() + rectangle.get_height())))
    assert left_top == pytest.approx((box["x1"] / COLS, 1 - box["y1"] / ROWS), abs=1e-6)
    assert right_bottom == pytest.approx((box["x2"] / COLS, 1 - box["y2"] / ROWS), abs=1e-6)


def test_boxes_under_the_display_score_are_not_drawn(hospital):
    from matplotlib.figure import Figure

    detection = load_patient(str(hospital["out"]), KEY).detections[0]
    panel = load_xray(detection, index_images(str(hospital["images"])), str(hospital["images"]), display_size=100)
    assert len(draw_xray(Figure().add_subplot(), panel, min_score=0.9)) == 1   # the box scores 0.91
    assert draw_xray(Figure().add_subplot(), panel, min_score=0.95) == []


def test_missing_image_is_a_placeholder_panel(hospital):
    record = load_patient(str(hospital["out"]), KEY)
    panel = load_xray(record.detections[1], index_images(str(hospital["images"])), str(hospital["images"]))
    assert panel.image is None and f"{MISSING_SOP}.dcm" in panel.missing_reason
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    assert draw_xray(ax, panel) == []
    assert any("image file not found" in text.get_text() for text in ax.texts)


def test_figure_shows_the_pseudonym_and_the_warning_but_no_phi(hospital):
    from matplotlib.text import Text

    record = load_patient(str(hospital["out"]), KEY)
    images = index_images(str(hospital["images"]))
    figure = render(record, [load_xray(d, images, str(hospital["images"]), 100) for d in record.detections])
    texts = " ".join(t.get_text() for t in figure.findobj(Text))
    assert KEY in texts and NOT_FOR_CLINICAL_USE in texts
    for phi in (PATIENT.patient_id, "Doe", "Jane", PATIENT.birth_date, "1970", "Springfield", "Who^Doctor"):
        assert phi not in texts


def test_a_file_that_is_not_dicom_is_a_placeholder_panel_not_a_crash(hospital, tmp_path):
    detection = load_patient(str(hospital["out"]), KEY).detections[0]
    forged = tmp_path / f"{detection['sop_instance_uid']}.dcm"
    forged.write_bytes(b"\0" * 200)
    panel = load_xray(detection, index_images(str(tmp_path)), str(tmp_path))
    assert panel.image is None and "no 'DICM' prefix" in panel.missing_reason
