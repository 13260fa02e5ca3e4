"""`medtwin report`: one PNG of one patient's twin, for a ward round or a demo.

The figure has the patient's vital-sign window means over time (heart rate,
SpO2, respiratory rate, temperature, systolic BP), the NEWS2 score with its
clinical risk bands shaded, the onsets of the patient's alerts, and each chest
X-ray with the detector's boxes drawn on it.

    medtwin report --demo --patient MRN0001234 --images demo/sim/dicom --output p.png demo/out
    medtwin report --patient_key 3f0c... --output p.png demo/out

Privacy: ``--patient`` takes the hospital id and pseudonymises it with the
pipeline's key (`transforms.pseudonymise`), so the tables never need raw ids;
the figure shows only the pseudonym. The DICOM files carry PHI (PatientName,
PatientBirthDate, ...): only their pixels are read, no text attribute is
rendered. Detections are AI output and the figure says so.

Windows come from the query module's ``latest_patient_twin`` view (the final
pane of each window, else the latest), so the report sees what an analyst's
query sees.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

NOT_FOR_CLINICAL_USE = "AI findings: not for clinical use"
VITALS = (  # (column in latest_patient_twin, axis label)
    ("heart_rate_mean", "Heart rate\n(bpm)"),
    ("spo2_mean", "SpO2\n(%)"),
    ("respiratory_rate_mean", "Resp. rate\n(/min)"),
    ("temperature_c_mean", "Temperature\n(°C)"),
    ("systolic_bp_mean", "Systolic BP\n(mmHg)"),
)
# NEWS2 aggregate-score bands (RCP 2017 clinical response table): 0-4 low, 5-6 medium, 7+ high.
# "low-medium" (a single red score with an aggregate under 5) is a property of the window, not of
# the score, so it colours the window's marker rather than a band of the axis.
NEWS2_SCORE_BANDS = ((0, 4, "low", "#d9f0d3"), (5, 6, "medium", "#fde0b2"), (7, 20, "high", "#f8c5c0"))
BAND_COLOURS = {"low": "#1b7837", "low-medium": "#e08214", "medium": "#e08214", "high": "#b2182b"}
MAX_IMAGES = 4          # most recent X-rays shown; older ones are counted, not drawn
DISPLAY_SIZE = 1024     # longest side of a shown X-ray, pixels (smaller images keep their size)
MAX_IMAGE_BYTES = 128 * 1024 * 1024  # largest DICOM file read, as the pipeline's default fetch cap


class ReportError(Exception):
    """A report that cannot be made, with the message for the user."""


@dataclasses.dataclass(frozen=True)
class PatientRecord:
    """What the tables hold for one patient, oldest first.

    windows: latest_patient_twin rows (window_start, vital means, news2_score, news2_band).
    alerts: patient alerts (onset_time, kind, severity).
    detections: one row per SOP instance (sop_instance_uid, acquisition_time, boxes, ...).
    """

    patient_key: str
    windows: list[dict]
    alerts: list[dict]
    detections: list[dict]


@dataclasses.dataclass(frozen=True)
class XrayPanel:
    """One X-ray to draw: the display image, or why there is none.

    image: (H, W) float32 in [0, 1] or None; scale: display pixel = original pixel * scale.
    """

    detection: dict
    image: object | None
    scale: float
    missing_reason: str | None = None


# ---------------------------------------------------------------- data


def load_patient(tables_dir: str, patient_key: str) -> PatientRecord:
    """The patient's rows from the Parquet tables under `tables_dir`.

    Raises ReportError when the directory is missing or no table mentions the patient.
    """
    from pipelines.query import QueryRefused, connect

    if not os.path.isdir(tables_dir):
        raise ReportError(f"no tables directory {tables_dir}")
    try:
        connection = connect(tables_dir, timezone="UTC")
    except QueryRefused as error:
        raise ReportError(str(error)) from None
    views = {row[0] for row in connection.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    searched = [t for t in ("patient_twin", "alerts", "detections") if t in views]
    if not searched:
        raise ReportError(f"no patient_twin, alerts or detections tables under {tables_dir}")

    def rows(table: str, sql: str) -> list[dict]:
        if table not in views:
            return []
        result = connection.execute(sql, [patient_key])
        names = [d[0] for d in result.description]
        return [dict(zip(names, values)) for values in result.fetchall()]

    vitals = ", ".join(column for column, _ in VITALS)
    windows = rows("patient_twin", f"""
        SELECT window_start, window_end, {vitals}, news2_score, news2_band
        FROM latest_patient_twin WHERE patient_key = ? ORDER BY window_start""")
    alerts = rows("alerts", """
        SELECT DISTINCT alert_id, onset_time, kind, severity FROM alerts
        WHERE subject_type = 'patient' AND subject_id = ? ORDER BY onset_time, kind""")
    # A retried bundle may write a detection twice: one row per image.
    detections = rows("detections", """
        SELECT sop_instance_uid, acquisition_time, boxes, covid_probability, image_rows, image_columns,
               model_name, model_version, quality_flag
        FROM detections WHERE patient_key = ?
        QUALIFY row_number() OVER (PARTITION BY sop_instance_uid ORDER BY model_version DESC) = 1
        ORDER BY acquisition_time, sop_instance_uid""")
    if not (windows or alerts or detections):
        raise ReportError(f"no patient with pseudonym {patient_key} in {', '.join(searched)} under {tables_dir}")
    return PatientRecord(patient_key, windows, alerts, detections)


def index_images(images_dir: str | None) -> dict[str, str]:
    """SOP Instance UID -> path, from the simulator's ``<study uid>/<sop uid>.dcm`` names."""
    if not images_dir:
        return {}
    found = {}
    for folder, _, names in os.walk(images_dir):
        for name in names:
            if name.endswith(".dcm"):
                found.setdefault(name[:-len(".dcm")], os.path.join(folder, name))
    return found


def load_xray(detection: dict, images: dict[str, str], images_dir: str | None,
              display_size: int = DISPLAY_SIZE) -> XrayPanel:
    """The display image of one detection's X-ray, or a panel that says why there is none.

    The file is read as the pipeline's fetch reads one (`transforms.dicom_fetch.read_regular_file`):
    a regular file with one name, not a symbolic link, inside `images_dir`, at most
    MAX_IMAGE_BYTES; a FIFO, a device or a link out is a panel saying so, never a hang or an
    unbounded read.  It then passes the pipeline's own header and codestream checks before any
    pixel is decoded.  Only the pixels are read: no DICOM text attribute, and no text of an
    error (which could quote one), leaves this function; a panel names the pipeline's own rejection
    reason (which withholds header values) or only the type of any other error.
    """
    from model.preprocess import prepare_dicom
    from transforms.dicom_decode import DicomReadConfig, DicomRejected, check_header, read_dataset
    from transforms.dicom_fetch import FetchRejected, read_regular_file

    sop = detection["sop_instance_uid"]
    if not images_dir:
        return XrayPanel(detection, None, 1.0, "no --images directory given")
    path = images.get(sop)
    if path is None:
        return XrayPanel(detection, None, 1.0, f"image file not found:\n{sop}.dcm\nunder {images_dir}")
    name = os.path.basename(path)
    try:
        checks = DicomReadConfig(allowed_prefixes=(images_dir,), target_size=display_size,
                                 max_file_bytes=MAX_IMAGE_BYTES)
        data = read_regular_file(path, checks.max_file_bytes, within=[os.path.realpath(images_dir)])
        ds = read_dataset(data, checks)
        check_header(ds, checks, data)
        if str(ds.get("SOPInstanceUID", "")) != sop:
            return XrayPanel(detection, None, 1.0, f"{name}\nholds another SOP Instance UID")
        rows, cols = int(ds.Rows), int(ds.Columns)
        prepared = prepare_dicom(ds, target_size=min(max(rows, cols), display_size))
    except FetchRejected as error:  # its reasons quote no path
        return XrayPanel(detection, None, 1.0, f"cannot read {name}:\n{error}")
    except DicomRejected as error:  # its reasons quote no header value (value withheld)
        return XrayPanel(detection, None, 1.0, f"cannot read {name}:\n{error}"[:200])
    except Exception as error:  # an unreadable image is a panel, not a failed report
        return XrayPanel(detection, None, 1.0, f"cannot read {name}:\n{type(error).__name__}")
    return XrayPanel(detection, prepared.image, prepared.scale)


# ---------------------------------------------------------------- drawing


def draw_xray(ax, panel: XrayPanel, min_score: float = 0.0) -> list:
    """Draw one X-ray and its boxes scoring at least `min_score` on `ax`; returns the box Rectangles
    (display-pixel data coordinates).

    The image is shown with extent (0, W, H, 0), so data coordinates are display pixels with
    pixel edges on integers; a box (x1, y1, x2, y2) in original pixels (x2, y2 exclusive)
    becomes the rectangle from (x1, y1) * scale to (x2, y2) * scale.
    """
    from matplotlib.patches import Rectangle

    detection = panel.detection
    when = detection["acquisition_time"]
    title = f"{when:%Y-%m-%d %H:%M} UTC  p(COVID-like)={detection['covid_probability']:.2f}"
    if min_score > 0:
        title += f"  boxes >= {min_score:.2f}"
    if detection.get("quality_flag"):
        title += "  [device degraded]"
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.image is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, panel.missing_reason, ha="center", va="center", fontsize=8, wrap=True,
                transform=ax.transAxes)
        return []
    height, width = panel.image.shape
    ax.imshow(panel.image, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, width, height, 0),
              interpolation="antialiased")
    rectangles = []
    for box in [b for b in detection["boxes"] or [] if b["score"] >= min_score]:
        x1, y1 = box["x1"] * panel.scale, box["y1"] * panel.scale
        rectangle = Rectangle((x1, y1), (box["x2"] - box["x1"]) * panel.scale, (box["y2"] - box["y1"]) * panel.scale,
                              fill=False, edgecolor="#ff3030", linewidth=1.5)
        ax.add_patch(rectangle)
        ax.text(x1, max(y1 - 3, 0), f"{box['label']} {box['score']:.2f}", color="#ff3030", fontsize=7,
                va="bottom", ha="left", clip_on=True)
        rectangles.append(rectangle)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return rectangles


def _draw_vitals(axes, record: PatientRecord) -> None:
    times = [w["window_start"] for w in record.windows]
    for ax, (column, label) in zip(axes, VITALS):
        values = [float("nan") if w[column] is None else w[column] for w in record.windows]
        ax.plot(times, values, marker=".", markersize=4, linewidth=1, color="#2166ac")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)


def _draw_news2(ax, record: PatientRecord) -> None:
    for low, high, band, colour in NEWS2_SCORE_BANDS:
        ax.axhspan(low - 0.5, high + 0.5, color=colour, zorder=0, label=f"{band} ({low}-{high})"
                   if high < 20 else f"{band} ({low}+)")
    scored = [w for w in record.windows if w["news2_score"] is not None]
    times = [w["window_start"] for w in scored]
    scores = [w["news2_score"] for w in scored]
    ax.step(times, scores, where="post", color="#333333", linewidth=1)
    ax.scatter(times, scores, s=12, zorder=3,
               c=[BAND_COLOURS.get(w["news2_band"], "#333333") for w in scored])
    ax.set_ylim(-0.5, max([9, *scores]) + 1.5)
    ax.set_ylabel("NEWS2", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(loc="upper left", fontsize=6, ncol=3, framealpha=0.8)


def _mark_events(axes, record: PatientRecord) -> None:
    """Alert onsets as red dashed lines, X-ray acquisitions as grey dotted lines, on every time axis."""
    for ax in axes:
        for alert in record.alerts:
            ax.axvline(alert["onset_time"], color="#b2182b", linestyle="--", linewidth=0.9, zorder=2)
        for detection in record.detections:
            ax.axvline(detection["acquisition_time"], color="#777777", linestyle=":", linewidth=0.9, zorder=2)
    top = axes[0]
    for alert in record.alerts:
        top.annotate(f"{alert['kind']} ({alert['severity']})", (alert["onset_time"], 1.0),
                     xycoords=("data", "axes fraction"), rotation=90, fontsize=6, color="#b2182b",
                     va="top", ha="right")


def render(record: PatientRecord, panels: list[XrayPanel], *, hidden_images: int = 0, min_score: float = 0.0):
    """The report figure (matplotlib Figure on an Agg canvas)."""
    import matplotlib.dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 10), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    outer = figure.add_gridspec(1, 2, width_ratios=(3, 2))
    left = outer[0].subgridspec(len(VITALS) + 1, 1, height_ratios=(1,) * len(VITALS) + (1.6,))
    time_axes = [figure.add_subplot(left[0])]
    time_axes += [figure.add_subplot(left[i], sharex=time_axes[0]) for i in range(1, len(VITALS) + 1)]
    _draw_vitals(time_axes[:len(VITALS)], record)
    _draw_news2(time_axes[-1], record)
    _mark_events(time_axes, record)
    if not record.windows:
        time_axes[0].text(0.5, 0.5, "no twin windows for this patient", transform=time_axes[0].transAxes,
                          ha="center", va="center")
    for ax in time_axes[:-1]:
        ax.tick_params(labelbottom=False)
    time_axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(time_axes[-1].xaxis.get_major_locator()))
    time_axes[-1].set_xlabel("window start (UTC); red dashes: alert onsets, grey dots: chest X-rays", fontsize=8)

    shown = panels or [None]
    right = outer[1].subgridspec(len(shown), 1)
    for i, panel in enumerate(shown):
        ax = figure.add_subplot(right[i])
        if panel is None:
            ax.axis("off")
            ax.text(0.5, 0.5, "no chest X-ray detections for this patient", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            draw_xray(ax, panel, min_score)
    title = f"Patient {record.patient_key} (pseudonym)"
    if hidden_images:
        title += f"  ({hidden_images} older X-ray(s) not shown)"
    figure.suptitle(f"{title}\n{NOT_FOR_CLINICAL_USE}", fontsize=11)
    return figure


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report", help="one PNG of one patient: vitals, NEWS2, alerts, X-rays with AI boxes", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", help="the pipeline's Parquet output directory")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", help="hospital patient id, pseudonymised with the pipeline's key")
    who.add_argument("--patient_key", help="the patient's pseudonym, as in the tables")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--images", help="folder searched for <sop instance uid>.dcm (e.g. the simulator's OUT/dicom)")
    parser.add_argument("--min_score", type=float, default=0.3,
                        help="draw boxes scoring at least this (the tables keep every box) [%(default)s]")
    parser.add_argument("--display_size", type=int, default=DISPLAY_SIZE,
                        help="longest side of a shown X-ray, pixels [%(default)s]")
    privacy = parser.add_argument_group("privacy (for --patient)")
    privacy.add_argument("--pseudonym_key", help="HMAC key the pipeline ran with (or env MEDTWIN_PSEUDONYM_KEY)")
    privacy.add_argument("--demo", action="store_true", help="synthetic data: the public demo pseudonym key")
    parser.set_defaults(func=run)
    return parser


def patient_key_from_args(args: argparse.Namespace) -> str:
    """The pseudonym to look up: --patient_key as given, or --patient through the pipeline's HMAC."""
    from transforms.pseudonymise import MissingKeyError, Pseudonymiser, resolve_key

    if args.patient_key:
        return args.patient_key
    try:
        return Pseudonymiser(resolve_key(args.pseudonym_key, demo=args.demo)).patient_key(args.patient)
    except MissingKeyError as error:
        raise ReportError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    try:
        record = load_patient(args.tables, patient_key_from_args(args))
    except ReportError as error:
        print(f"medtwin report: {error}", file=sys.stderr)
        return 2
    images = index_images(args.images)
    if args.images and not os.path.isdir(args.images):
        print(f"medtwin report: warning: no images directory {args.images}", file=sys.stderr)
    recent = record.detections[-MAX_IMAGES:]
    panels = [load_xray(d, images, args.images, args.display_size) for d in recent]
    figure = render(record, panels, hidden_images=len(record.detections) - len(recent), min_score=args.min_score)
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(args.output, format="png")
    missing = sum(panel.image is None for panel in panels)
    print(f"wrote {args.output}: patient {record.patient_key}: {len(record.windows)} windows, "
          f"{len(record.alerts)} alerts, {len(record.detections)} images "
          f"({len(panels) - missing} drawn, {missing} not found or unreadable)")
    return 0

