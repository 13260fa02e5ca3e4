"""Reading a TID 1500 SR back, independently of how transforms/structured_report.py builds one.

`findings_of` gives the same comparable summary for an SR (parsed with highdicom's own accessors and
a walk of the content tree) and for a detections row, so a test can check one against the other.
"""

from __future__ import annotations

import highdicom as hd
import pydicom

ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"  # DCM codes of TID 4019


def _texts(items, code: str) -> set[str]:
    """Every TEXT value under concept `code` anywhere in the content tree."""
    found = set()
    for item in items or []:
        names = item.get("ConceptNameCodeSequence") or []
        if item.get("ValueType") == "TEXT" and names and names[0].CodeValue == code:
            found.add(str(item.TextValue))
        found |= _texts(item.get("ContentSequence"), code)
    return found


def findings_of(source) -> dict:
    """{model, source image, sorted boxes (x1, y1, x2, y2, score), image probability} of an SR or a row."""
    if isinstance(source, dict):
        return {"model": {(source["model_name"], source["model_version"])},
                "source_sop_instance_uid": source["sop_instance_uid"],
                "boxes": sorted((round(b["x1"], 2), round(b["y1"], 2), round(b["x2"], 2), round(b["y2"], 2),
                                 round(b["score"], 4)) for b in source["boxes"]),
                "covid_probability": round(source["covid_probability"], 4)}
    report = hd.sr.ComprehensiveSR.from_dataset(pydicom.Dataset(source))
    assert str(report.SeriesDescription).endswith("NOT FOR CLINICAL USE")
    assert report.VerificationFlag == "UNVERIFIED"
    boxes, sources = [], set()
    for group in report.content.get_planar_roi_measurement_groups():
        points = group.roi.value
        (score,) = [m.value for m in group.get_measurements()]
        xs, ys = points[:, 0], points[:, 1]
        assert len(points) == 5 and (points[0] == points[-1]).all(), "a closed polyline"
        boxes.append((round(float(xs.min()), 2), round(float(ys.min()), 2), round(float(xs.max()), 2),
                      round(float(ys.max()), 2), round(float(score), 4)))
        sources |= {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    for item in group.roi.ContentSequence}
    (image_group,) = report.content.get_image_measurement_groups()
    (probability,) = [m.value for m in image_group.get_measurements()]
    evidence = {str(item.ReferencedSOPInstanceUID) for study in report.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    sources |= evidence
    assert len(sources) == 1, "every region and the evidence name one source image"
    names, versions = _texts(source.ContentSequence, ALGORITHM_NAME), _texts(source.ContentSequence, ALGORITHM_VERSION)
    assert len(names) == 1 and len(versions) == 1
    return {"model": {(names.pop(), versions.pop())}, "source_sop_instance_uid": sources.pop(),
            "boxes": sorted(boxes), "covid_probability": round(float(probability), 4)}
