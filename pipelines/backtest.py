"""`medtwin backtest`: every early-warning source scored against the simulator's truth on held-out seeds.

    medtwin backtest --input runs/ --seeds 201-203 --models risk/ --report backtest --simulate

For each test seed (``INPUT/seed-N/hospital``, made by ``--simulate`` when missing) the batch pipeline
is replayed with the learned early warning added (`pipelines.graph.build_pipeline(learned=...)`, the
features artifact and models of ``--models``), into ``INPUT/seed-N/backtest``. Its alerts are then
scored, per source:

  NEWS2 >= low-medium / medium / high   news2_band alerts of that band or above (patients)
  device rule                           device_failure_risk alerts (devices)
  learned deterioration / device model  the models' alerts at their threshold, and the twin rows'
                                        risk columns at other thresholds (same onset rule as the
                                        pipeline: one alert per hour-long episode)

Truth and scoring follow bench/device_alerts.py: an event is a device failure or a patient's
deterioration onset; it is *flagged* when a source's alert on that subject starts at most `horizon`
before it (devices: ``--device_horizon``, 3 h as the bench; patients: ``--patient_horizon``) and
before it ends (failure; full effect of the deterioration). Lead time = event time - first such
alert (negative: after the onset). Alerts on a subject with no event, or earlier than the horizon
before its event, are false alarms; alerts after the event are not counted. PPV = true alerts /
counted alerts. Bootstrap intervals resample the test seeds (1,000 draws).

Writes OUT.md (table), OUT.png (lead time against alert burden) and OUT.json (``sources``). The test
seeds must not overlap the models' training or validation seeds (their metadata names them).
These are simulator results, not clinical evidence.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

import numpy as np

NEWS2_RULES = {"NEWS2 >= low-medium": ("low-medium", "medium", "high"), "NEWS2 >= medium (5)": ("medium", "high"),
               "NEWS2 high (7)": ("high",)}
LEARNED_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def offline_alerts(subject: str, rows: list[dict], risks, threshold: float) -> list[tuple[str, dt.datetime]]:
    """Scored final rows -> (subject id, onset) alerts with the pipeline's rule (model.risk._RiskAlertsFn):
    risk >= threshold, no other alert on the subject within the refractory period."""
    from model.risk import ALERT_REFRACTORY_SECONDS
    from transforms.features import KEYS
    key, alerts, last = KEYS[subject], [], {}
    for row, risk in sorted(zip(rows, risks), key=lambda pair: pair[0]["window_start"]):
        if risk is None or risk < threshold:
            continue
        at = row["window_start"]
        before = last.get(row[key])
        if before is not None and (at - before).total_seconds() < ALERT_REFRACTORY_SECONDS:
            continue
        last[row[key]] = at
        alerts.append((row[key], at))
    return alerts


def _events(subject: str, facts: dict) -> dict:
    """{subject id: (event time, end of event)}."""
    if subject == "device":
        return {d: (t, t) for d, t in facts["failures"].items()}
    return dict(facts["deterioration"])


def judge(subject: str, alerts, facts: dict, horizon: dt.timedelta) -> dict:
    """One seed's alerts -> {"leads": [s], "events", "true", "false"} (see the module docstring)."""
    events = _events(subject, facts)
    leads, true_alerts, false_alarms = [], 0, 0
    for sid, (at, end) in events.items():
        onsets = [onset for s, onset in alerts if s == sid and at - horizon <= onset <= end]
        if onsets:
            leads.append((at - min(onsets)).total_seconds())
    for sid, onset in alerts:
        event = events.get(sid)
        if event is None or onset < event[0] - horizon:
            false_alarms += 1
        elif onset <= event[1]:
            true_alerts += 1
    subjects = len(facts["devices"] if subject == "device" else facts["patients"])
    return {"leads": leads, "events": len(events), "true": true_alerts, "false": false_alarms,
            "days": subjects * facts["hours"] / 24}


def _summary(judged: list[dict]) -> dict:
    leads = [x for j in judged for x in j["leads"]]
    events = sum(j["events"] for j in judged)
    true, false = sum(j["true"] for j in judged), sum(j["false"] for j in judged)
    days = sum(j["days"] for j in judged)
    q = np.percentile(leads, [25, 50, 75]).tolist() if leads else [None] * 3
    return {"events": events, "flagged": len(leads), "flagged_share": len(leads) / events if events else None,
            "lead_time_median_s": q[1], "lead_time_q1_s": q[0], "lead_time_q3_s": q[2],
            "ppv": true / (true + false) if true + false else None,
            "alerts_per_day": (true + false) / days if days else None,
            "false_alarms_per_day": false / days if days else None}


def score(subject: str, seeds: list[tuple[list, dict]], horizon_hours: float) -> dict:
    """[(alerts, truth) per seed] -> the summary (events, flagged, lead times, PPV, burdens)."""
    horizon = dt.timedelta(hours=horizon_hours)
    return _summary([judge(subject, alerts, facts, horizon) for alerts, facts in seeds])


def bootstrap(subject: str, seeds: list[tuple[list, dict]], horizon_hours: float, draws: int = 1000,
              seed: int = 0) -> dict:
    """95% intervals of flagged share, median lead, PPV and alerts per day, resampling seeds."""
    horizon = dt.timedelta(hours=horizon_hours)
    judged = [judge(subject, alerts, facts, horizon) for alerts, facts in seeds]
    rng = np.random.default_rng(seed)
    samples = {k: [] for k in ("flagged_share", "lead_time_median_s", "ppv", "alerts_per_day")}
    for _ in range(draws):
        drawn = _summary([judged[i] for i in rng.integers(0, len(judged), len(judged))])
        for k in samples:
            if drawn[k] is not None:
                samples[k].append(drawn[k])
    return {f"{k}_ci": (np.percentile(v, [2.5, 97.5]).tolist() if v else None) for k, v in samples.items()}


def _alerts_of(out: str, kinds: tuple[str, ...], bands: tuple[str, ...] | None = None):
    from pipelines.query import connect
    rows = connect(out).execute(
        f"select subject_id, onset_time, alert_id from alerts where kind in ({', '.join('?' * len(kinds))})",
        list(kinds)).fetchall()
    return [(sid, onset.astimezone(dt.timezone.utc)) for sid, onset, alert_id in rows
            if bands is None or alert_id.rsplit(":", 1)[-1] in bands]


def run_seed(hospital: str, out: str, models_folder: str) -> None:
    """The batch pipeline over `hospital` with the learned early warning of `models_folder`, into `out`."""
    import apache_beam as beam

    from pipelines.config import add_job_arguments
    from pipelines.graph import build_pipeline
    from pipelines.run import job_config_or_exit, pipeline_options

    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    config = job_config_or_exit(parser.parse_args(["--input", hospital, "--output", out, "--demo",
                                                   "--no_imaging", "--risk_models", models_folder]), "backtest")
    with beam.Pipeline(options=pipeline_options([], streaming=False)) as pipeline:
        build_pipeline(pipeline, config)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from pipelines.train_risk import add_history_arguments, parse_seeds
    parser = subparsers.add_parser("backtest", help="score every alert source against the simulator's truth",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of seed-N/hospital (test seeds)")
    parser.add_argument("--seeds", type=parse_seeds, required=True, help="test seeds, e.g. 201-203")
    parser.add_argument("--models", required=True, help="folder written by medtwin train-risk")
    parser.add_argument("--report", required=True, help="OUT: writes OUT.md, OUT.json, OUT.png")
    parser.add_argument("--patient_horizon", type=float, default=2.0, help="hours [%(default)s]")
    parser.add_argument("--device_horizon", type=float, default=3.0, help="hours, as the bench [%(default)s]")
    add_history_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from model.risk import RISK_COLUMNS, TRAINING_REPORT, read_metadata, read_models_folder
    from pipelines.train_risk import ensure_history, final_rows, seed_dirs, truth

    with open(os.path.join(args.models, TRAINING_REPORT)) as f:
        training = json.load(f)
    used = set(training["train_seeds"]) | set(training["validation_seeds"])
    if used & set(args.seeds):
        print(f"medtwin backtest: test seeds {sorted(used & set(args.seeds))} were used to train or validate",
              file=sys.stderr)
        return 2
    try:
        learned = read_models_folder(args.models)
    except ValueError as error:
        print(f"medtwin backtest: {error}", file=sys.stderr)
        return 2
    models = learned.models
    metadata = {s: read_metadata(path) for s, path in models.items()}
    ensure_history(args.input, args.seeds, args)
    per_seed = []
    for seed in args.seeds:
        hospital = seed_dirs(args.input, seed)[0]
        out = os.path.join(args.input, f"seed-{seed}", "backtest")
        if not os.path.isdir(os.path.join(out, "alerts")):
            run_seed(hospital, out, args.models)
        per_seed.append((out, truth(hospital), {s: final_rows(out, f"{s}_twin") for s in models}))

    horizons = {"patient": args.patient_horizon, "device": args.device_horizon}
    sources = []

    def add(name, subject, threshold, seeds):
        result = {"name": name, "subject": subject, "threshold": threshold,
                  **score(subject, seeds, horizons[subject]), **bootstrap(subject, seeds, horizons[subject])}
        sources.append(result)

    for name, bands in NEWS2_RULES.items():
        add(name, "patient", None, [(_alerts_of(out, ("news2_band",), bands), facts) for out, facts, _ in per_seed])
    add("device rule (failure_risk)", "device", None,
        [(_alerts_of(out, ("device_failure_risk",)), facts) for out, facts, _ in per_seed])
    for subject, kind, label in (("patient", "deterioration_risk", "learned deterioration"),
                                 ("device", "device_failure_model", "learned device failure")):
        own = metadata[subject]["threshold"]
        add(f"{label} (pipeline alerts)", subject, own,
            [(_alerts_of(out, (kind,)), facts) for out, facts, _ in per_seed])
        for threshold in LEARNED_THRESHOLDS:
            column = RISK_COLUMNS[subject]
            add(f"{label} @ {threshold:.1f}", subject, threshold,
                [(offline_alerts(subject, [r for r in rows[subject] if r.get(column) is not None],
                                 [r[column] for r in rows[subject] if r.get(column) is not None], threshold), facts)
                 for _, facts, rows in per_seed])
    report = {"test_seeds": args.seeds, "train_seeds": training["train_seeds"],
              "validation_seeds": training["validation_seeds"], "features_version": training["features_version"],
              "models": {s: m["model_version"] for s, m in metadata.items()}, "horizons_hours": horizons,
              "sources": sources}
    with open(args.report + ".json", "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    with open(args.report + ".md", "w") as f:
        f.write(markdown(report))
    plot(report, args.report + ".png")
    print(markdown(report))
    return 0


def _fmt(value, scale=1.0, digits=2):
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _ci(interval, scale=1.0, digits=2):
    return "" if not interval else f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"


def markdown(report: dict) -> str:
    lines = [f"Simulator backtest (not clinical evidence). Test seeds {report['test_seeds']}; models trained on "
             f"seeds {report['train_seeds']}, thresholds chosen on {report['validation_seeds']}; features "
             f"{report['features_version']}, models {report['models']}; horizons (h) {report['horizons_hours']}. "
             "Brackets: 95% bootstrap over test seeds.", "",
             "| source | subject | events | flagged | lead median (min) | lead IQR (min) | PPV | alerts/day "
             "| false alarms/day |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["sources"]:
        lines.append(
            f"| {s['name']} | {s['subject']} | {s['events']} | {s['flagged']} | "
            f"{_fmt(s['lead_time_median_s'], 1 / 60, 0)}{_ci(s['lead_time_median_s_ci'], 1 / 60, 0)} | "
            f"{_fmt(s['lead_time_q1_s'], 1 / 60, 0)}–{_fmt(s['lead_time_q3_s'], 1 / 60, 0)} | "
            f"{_fmt(s['ppv'])}{_ci(s['ppv_ci'])} | {_fmt(s['alerts_per_day'])}{_ci(s['alerts_per_day_ci'])} | "
            f"{_fmt(s['false_alarms_per_day'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """Lead time (median, minutes) against alerts per subject-day, one point per source and threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for axis, subject in zip(axes, ("patient", "device")):
        for s in report["sources"]:
            if s["subject"] != subject or s["lead_time_median_s"] is None:
                continue
            axis.scatter(s["alerts_per_day"], s["lead_time_median_s"] / 60,
                         marker="o" if "learned" in s["name"] else "s")
            axis.annotate(s["name"], (s["alerts_per_day"], s["lead_time_median_s"] / 60), fontsize=7)
        axis.set_xlabel(f"alerts per {subject}-day")
        axis.set_ylabel("median lead time, min (negative: after onset)")
        axis.set_title(f"{subject}s (simulator, not clinical evidence)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
