"""Readers for the annotated chest X-ray collections real users have.

Each reader parses and validates one layout's annotations into a list of
``AnnotatedImage`` records (boxes x1, y1, x2, y2 in the stored image's pixels),
and ``AnnotatedImageDataset`` turns the records into the items every detection
dataset shares (see ``model.datasets``). ``load_dataset`` does both by format:

    coco  a COCO JSON file: ``images`` (``id``, ``file_name`` relative to an
          image root, optional ``width``/``height``), ``annotations``
          (``bbox`` [x, y, w, h]; ``iscrowd`` ones are ignored: they mark
          regions, not instances), ``categories`` (one, or one named "opacity")
    siim  the SIIM-FISABIO-RSNA COVID-19 challenge: ``train_image_level.csv``
          and DICOMs at ``train/<StudyInstanceUID>/<SeriesInstanceUID>/<id>.dcm``
    rsna  the RSNA Pneumonia Detection challenge: ``stage_2_train_labels.csv``
          and DICOMs at ``stage_2_train_images/<patientId>.dcm``

DICOM goes through ``prepare_dicom``, PNG/JPEG through Pillow and
``prepare_pixels`` as MONOCHROME2, so pixels match the streaming pipeline's.
Bad input raises ``AnnotationError`` naming the file and the row or entry.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.errors import InvalidDicomError
from torch.utils.data import Dataset

from model.datasets import detection_item
from model.preprocess import PreparedImage, prepare_dicom, prepare_pixels

DICOM_SUFFIXES = (".dcm", ".dicom")
SIIM_LABELS_FILE = "train_image_level.csv"
SIIM_IMAGES_DIR = "train"
RSNA_LABELS_FILE = "stage_2_train_labels.csv"
RSNA_IMAGES_DIR = "stage_2_train_images"
# SIIM gives each box twice (``boxes`` as x, y, w, h and ``label`` as x1 y1 x2 y2);
# the two are printed to 5 decimals, so they agree far inside this.
SIIM_BOX_AGREEMENT_PX = 0.5
# Annotators drag boxes a little past the image edge; clip those, but a box
# further out than this is a wrong image or a wrong coordinate system.
BOX_EDGE_TOLERANCE_PX = 2.0


class AnnotationError(ValueError):
    """Annotations or images that cannot be used, with the file and row at fault."""


@dataclass(frozen=True)
class AnnotatedImage:
    """One image and its opacity boxes, as an annotation file describes them.

    ``boxes`` is float32 (N, 4) x1, y1, x2, y2 in the stored image's pixels,
    (0, 4) for a negative image. ``expected_shape`` is (rows, cols) when the
    annotations state it. ``source`` names where the record came from, for errors.
    """

    image_id: int
    path: Path
    boxes: np.ndarray
    source: str
    expected_shape: tuple[int, int] | None = None


class AnnotatedImageDataset(Dataset):
    """Loads and prepares annotated images into the shared detection items.

    Item ``i`` is ``(image (1, H, W) float32 in [0, 1], target)`` for
    ``images[i]``, with max(H, W) == ``image_size`` (see ``model.datasets``).
    Boxes are checked against the loaded image's size and clipped to it.
    """

    def __init__(self, images: Sequence[AnnotatedImage], *, image_size: int):
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.images = list(images)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.images[index]
        prepared = prepare_image_file(record.path, target_size=self.image_size)
        rows, cols = prepared.original_shape
        if record.expected_shape is not None and tuple(record.expected_shape) != (rows, cols):
            raise AnnotationError(
                f"{record.source}: annotations give (rows, cols) {record.expected_shape} "
                f"but {record.path} is {(rows, cols)}"
            )
        return detection_item(prepared, _boxes_inside(record, rows, cols), record.image_id)


def prepare_image_file(path: Path, *, target_size: int) -> PreparedImage:
    """Reads a DICOM (by suffix), PNG or JPEG file and prepares its pixels.

    Raster images are taken as MONOCHROME2 grayscale: 16-bit grayscale PNGs
    keep 16 bits stored, anything else is converted to 8-bit luma by Pillow.
    Unreadable files and DICOM that cannot be prepared (colour, undecodable
    pixel data) raise ``AnnotationError`` naming the file.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        try:
            return prepare_dicom(pydicom.dcmread(path), target_size=target_size)
        except (OSError, InvalidDicomError, ValueError, NotImplementedError, RuntimeError) as error:
            raise AnnotationError(f"cannot prepare DICOM {path}: {error}") from error
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):
                stored, bits_stored = np.array(image, dtype=np.uint16), 16
            else:
                stored, bits_stored = np.array(image.convert("L"), dtype=np.uint8), 8
    except OSError as error:
        raise AnnotationError(f"cannot read image {path}: {error}") from error
    return prepare_pixels(stored, bits_stored=bits_stored, photometric="MONOCHROME2", target_size=target_size)


def _boxes_inside(record: AnnotatedImage, rows: int, cols: int) -> np.ndarray:
    """Clips ``record.boxes`` (N, 4) to the image, rejecting boxes well outside it
    or left without area by the clipping."""
    boxes = record.boxes
    limits = np.array([cols, rows, cols, rows], dtype=np.float32)
    outside = (boxes < -BOX_EDGE_TOLERANCE_PX) | (boxes > limits + BOX_EDGE_TOLERANCE_PX)
    if outside.any():
        bad = boxes[outside.any(axis=1)][0].tolist()
        raise AnnotationError(
            f"{record.source}: box {bad} (x1, y1, x2, y2) lies outside the {cols}x{rows} image {record.path}"
        )
    clipped = np.clip(boxes, 0, limits)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        raise AnnotationError(
            f"{record.source}: box {boxes[empty][0].tolist()} has no area inside the {cols}x{rows} image {record.path}"
        )
    return clipped


def _box_array(boxes: list[list[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _xywh_to_xyxy(x: float, y: float, width: float, height: float, where: str) -> list[float]:
    values = (x, y, width, height)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise AnnotationError(f"{where}: box {list(values)} must be four finite numbers")
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{where}: box {list(values)} has non-positive width or height")
    return [float(x), float(y), float(x + width), float(y + height)]


# ---------------------------------------------------------------- COCO JSON

def read_coco(annotation_file: Path, *, image_root: Path | None = None) -> list[AnnotatedImage]:
    """Parses a COCO detection JSON into records, in the order of ``images``.

    Args:
        annotation_file: the JSON file.
        image_root: the folder ``file_name`` is relative to; defaults to the
            JSON file's folder.

    Returns:
        One record per image, keeping the COCO image ids; boxes converted from
        [x, y, w, h] to x1, y1, x2, y2. Crowd annotations and annotations of
        other categories are skipped.
    """
    annotation_file = Path(annotation_file)
    image_root = annotation_file.parent if image_root is None else Path(image_root)
    try:
        document = json.loads(annotation_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AnnotationError(f"cannot read COCO JSON {annotation_file}: {error}") from error
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), list) for key in ("images", "annotations", "categories")
    ):
        raise AnnotationError(f"{annotation_file}: needs lists 'images', 'annotations' and 'categories'")

    category_id = _coco_opacity_category(document["categories"], annotation_file)
    images = _coco_images(document["images"], annotation_file, image_root)
    boxes_by_image: dict[int, list[list[float]]] = {image_id: [] for image_id in images}
    for index, annotation in enumerate(document["annotations"]):
        where = f"{annotation_file}: annotations[{index}]"
        if not isinstance(annotation, dict) or not {"image_id", "bbox", "category_id"} <= annotation.keys():
            raise AnnotationError(f"{where}: needs 'image_id', 'bbox' and 'category_id'")
        if annotation.get("iscrowd", 0) or annotation["category_id"] != category_id:
            continue
        if annotation["image_id"] not in images:
            raise AnnotationError(f"{where}: image_id {annotation['image_id']!r} is not in 'images'")
        bbox = annotation["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AnnotationError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        boxes_by_image[annotation["image_id"]].append(_xywh_to_xyxy(*bbox, where))
    return [
        AnnotatedImage(
            image_id=image_id,
            path=path,
            boxes=_box_array(boxes_by_image[image_id]),
            source=f"{annotation_file}: image id {image_id}",
            expected_shape=expected_shape,
        )
        for image_id, (path, expected_shape) in images.items()
    ]


def _coco_opacity_category(categories: list, annotation_file: Path) -> int:
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) for c in categories):
        raise AnnotationError(f"{annotation_file}: every category needs an integer 'id'")
    if len(categories) == 1:
        return categories[0]["id"]
    opacity = [c["id"] for c in categories if str(c.get("name", "")).lower() == "opacity"]
    if len(opacity) != 1:
        names = [c.get("name") for c in categories]
        raise AnnotationError(
            f"{annotation_file}: the detector has one class; give one category or exactly one "
            f"named 'opacity' (found {names})"
        )
    return opacity[0]


def _coco_images(
    images: list, annotation_file: Path, image_root: Path
) -> dict[int, tuple[Path, tuple[int, int] | None]]:
    """Maps image id -> (file path, (rows, cols) if stated), checking files exist."""
    parsed: dict[int, tuple[Path, tuple[int, int] | None]] = {}
    for index, image in enumerate(images):
        where = f"{annotation_file}: images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("id"), int) or not isinstance(
            image.get("file_name"), str
        ):
            raise AnnotationError(f"{where}: needs an integer 'id' and a string 'file_name'")
        if image["id"] in parsed:
            raise AnnotationError(f"{where}: duplicate image id {image['id']}")
        path = image_root / image["file_name"]
        if not path.is_file():
            raise AnnotationError(f"{where}: image file {path} not found")
        has_shape = isinstance(image.get("height"), int) and isinstance(image.get("width"), int)
        parsed[image["id"]] = (path, (image["height"], image["width"]) if has_shape else None)
    return parsed


# ---------------------------------------------------- SIIM-FISABIO-RSNA COVID-19

def read_siim(root: Path) -> list[AnnotatedImage]:
    """Parses the SIIM-FISABIO-RSNA COVID-19 image-level labels under ``root``.

    ``train_image_level.csv`` rows give ``id`` ("<image uid>_image"),
    ``boxes`` (a Python-literal list of {'x', 'y', 'width', 'height'} dicts, or
    empty/NaN for a negative image), ``label`` ("opacity 1 x1 y1 x2 y2 ..." or
    "none 1 0 0 1 1") and ``StudyInstanceUID``. Both box columns must agree.
    The DICOM is found by walking ``train/<StudyInstanceUID>/`` for
    ``<image uid>.dcm``, since the series folder is not in the CSV.

    Returns:
        One record per row, ``image_id`` the row's position (0-based).
    """
    labels_file = Path(root) / SIIM_LABELS_FILE
    records = []
    seen: set[str] = set()
    for row_number, row in _csv_rows(labels_file, ("id", "boxes", "label", "StudyInstanceUID")):
        where = f"{labels_file} row {row_number}"
        image_name = row["id"].strip()
        if not image_name.endswith("_image") or len(image_name) == len("_image"):
            raise AnnotationError(f"{where}: id {image_name!r} should look like '<image uid>_image'")
        if image_name in seen:
            raise AnnotationError(f"{where}: duplicate id {image_name!r}")
        seen.add(image_name)
        boxes = _siim_boxes(row["boxes"], where)
        _check_siim_label_agrees(row["label"], boxes, where)
        study_dir = Path(root) / SIIM_IMAGES_DIR / row["StudyInstanceUID"].strip()
        dicom_name = image_name.removesuffix("_image") + ".dcm"
        matches = sorted(study_dir.rglob(dicom_name)) if study_dir.is_dir() else []
        if len(matches) != 1:
            found = "no" if not matches else f"{len(matches)}"
            raise AnnotationError(f"{where}: found {found} {dicom_name} under {study_dir}")
        records.append(AnnotatedImage(image_id=len(records), path=matches[0], boxes=_box_array(boxes), source=where))
    return records


def _siim_boxes(field: str, where: str) -> list[list[float]]:
    """Parses the ``boxes`` column: "" or "nan" is no boxes; else a list of dicts."""
    text = field.strip()
    if text == "" or text.lower() == "nan":
        return []
    try:
        # The file writes Python literals (single quotes), not JSON.
        entries = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise AnnotationError(f"{where}: cannot parse boxes {text!r}: {error}") from error
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"x", "y", "width", "height"} <= e.keys() for e in entries
    ):
        raise AnnotationError(f"{where}: boxes must be a list of {{'x', 'y', 'width', 'height'}} dicts, got {text!r}")
    return [_xywh_to_xyxy(e["x"], e["y"], e["width"], e["height"], where) for e in entries]


def _check_siim_label_agrees(label: str, boxes: list[list[float]], where: str) -> None:
    """The ``label`` column repeats the boxes as "<class> <confidence> x1 y1 x2 y2"."""
    tokens = label.split()
    if not tokens or len(tokens) % 6:
        raise AnnotationError(f"{where}: label {label!r} should be groups of '<class> 1 x1 y1 x2 y2'")
    groups = [tokens[i:i + 6] for i in range(0, len(tokens), 6)]
    classes = {group[0] for group in groups}
    if len(classes) > 1 or not classes <= {"opacity", "none"}:
        raise AnnotationError(f"{where}: label {label!r} mixes or misnames classes (expected 'opacity' or 'none')")
    label_boxes = [] if classes == {"none"} else groups
    if len(label_boxes) != len(boxes):
        raise AnnotationError(f"{where}: label has {len(label_boxes)} opacity boxes but boxes has {len(boxes)}")
    for group, box in zip(label_boxes, boxes):
        try:
            coordinates = [float(value) for value in group[2:]]
        except ValueError as error:
            raise AnnotationError(f"{where}: label {label!r} has a non-numeric coordinate") from error
        if max(abs(a - b) for a, b in zip(coordinates, box)) > SIIM_BOX_AGREEMENT_PX:
            raise AnnotationError(f"{where}: label box {coordinates} disagrees with boxes entry {box} (x1, y1, x2, y2)")


# ------------------------------------------------------ RSNA Pneumonia Detection

def read_rsna(root: Path) -> list[AnnotatedImage]:
    """Parses the RSNA Pneumonia Detection labels under ``root``.

    ``stage_2_train_labels.csv`` has one row per box (``patientId,x,y,width,
    height,Target``); a Target 0 row marks a negative patient and has empty
    coordinates. A patient's rows must all be Target 1, or be one Target 0 row.

    Returns:
        One record per patient in first-appearance order, ``image_id`` that order.
    """
    labels_file = Path(root) / RSNA_LABELS_FILE
    boxes_by_patient: dict[str, list[list[float]]] = {}
    negative_patients: set[str] = set()
    first_row: dict[str, int] = {}
    for row_number, row in _csv_rows(labels_file, ("patientId", "x", "y", "width", "height", "Target")):
        where = f"{labels_file} row {row_number}"
        patient = row["patientId"].strip()
        if not patient:
            raise AnnotationError(f"{where}: empty patientId")
        target = row["Target"].strip()
        coordinates = [row[key].strip() for key in ("x", "y", "width", "height")]
        if patient in negative_patients or (target == "0" and patient in boxes_by_patient):
            raise AnnotationError(
                f"{where}: patient {patient} already has rows from row {first_row[patient]}; "
                "a negative patient has exactly one Target 0 row"
            )
        first_row.setdefault(patient, row_number)
        if target == "0":
            if any(coordinates):
                raise AnnotationError(f"{where}: Target 0 row should have empty coordinates, got {coordinates}")
            negative_patients.add(patient)
            boxes_by_patient[patient] = []
        elif target == "1":
            try:
                x, y, width, height = (float(value) for value in coordinates)
            except ValueError as error:
                raise AnnotationError(
                    f"{where}: Target 1 row needs numeric x, y, width, height, got {coordinates}"
                ) from error
            boxes_by_patient.setdefault(patient, []).append(_xywh_to_xyxy(x, y, width, height, where))
        else:
            raise AnnotationError(f"{where}: Target must be 0 or 1, got {target!r}")

    images_dir = Path(root) / RSNA_IMAGES_DIR
    records = []
    for patient, boxes in boxes_by_patient.items():
        path = images_dir / f"{patient}.dcm"
        where = f"{labels_file} row {first_row[patient]}"
        if not path.is_file():
            raise AnnotationError(f"{where}: DICOM {path} not found")
        records.append(AnnotatedImage(image_id=len(records), path=path, boxes=_box_array(boxes), source=where))
    return records


def _csv_rows(labels_file: Path, required_columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, row dict) of a CSV after checking its header."""
    try:
        handle = labels_file.open(newline="")
    except OSError as error:
        raise AnnotationError(f"cannot read {labels_file}: {error}") from error
    with handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required_columns if column not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{labels_file}: missing columns {missing} (header {reader.fieldnames})")
        for row in reader:
            if None in row.values() or None in row:
                raise AnnotationError(f"{labels_file} row {reader.line_num}: wrong number of fields")
            yield reader.line_num, row


# ------------------------------------------------------------------ dispatch

FORMATS = ("coco", "siim", "rsna")


def load_dataset(
    path: Path, format: str, *, image_size: int, image_root: Path | None = None
) -> AnnotatedImageDataset:
    """Reads annotations in ``format`` and returns their detection dataset.

    Args:
        path: the COCO JSON file; for siim and rsna the dataset root (the
            folder holding the labels CSV) or the labels CSV itself.
        format: one of ``FORMATS`` ("coco", "siim", "rsna").
        image_size: longest side of the prepared images.
        image_root: coco only: the folder ``file_name`` is relative to
            (default: the JSON file's folder).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    path = Path(path)
    if format == "coco":
        records = read_coco(path, image_root=image_root)
    elif image_root is not None:
        raise ValueError(f"image_root applies to coco only; {format} fixes its own layout")
    else:
        root = path.parent if path.is_file() else path
        records = read_siim(root) if format == "siim" else read_rsna(root)
    return AnnotatedImageDataset(records, image_size=image_size)
