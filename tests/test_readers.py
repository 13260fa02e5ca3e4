"""Readers: tiny COCO, SIIM and RSNA layouts built in tmp dirs parse into shared items."""

import csv
import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from model.preprocess import prepare_dicom, prepare_pixels
from model.readers import FORMATS, AnnotatedImage, AnnotatedImageDataset, AnnotationError, load_dataset

DIGITAL_XRAY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def gradient(rows, cols, bits):
    """A (rows, cols) ramp using the full stored range, so the robust window is not degenerate."""
    ramp = np.add.outer(np.arange(rows), np.arange(cols)).astype(np.float64)
    return np.round(ramp / ramp.max() * (2**bits - 1)).astype(np.uint16 if bits > 8 else np.uint8)


def write_dicom(path, pixels, *, bits_stored, photometric="MONOCHROME2"):
    """Writes a minimal Digital X-Ray DICOM (explicit VR little endian) of
    ``pixels``: (rows, cols), or (rows, cols, 3) colour-by-pixel."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    if ds.SamplesPerPixel > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- COCO

@pytest.fixture
def coco_layout(tmp_path):
    """Two PNGs (80 rows x 60 cols; one 16-bit in a subfolder) and a COCO JSON."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    Image.fromarray(gradient(80, 60, 8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(gradient(80, 60, 16)).save(tmp_path / "images" / "sub" / "b.png")
    document = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 60, "height": 80},
            {"id": 9, "file_name": "sub/b.png"},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [6, 8, 12, 16], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 60, 80], "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 4, "bbox": [1, 1, 5, 5]},
        ],
        "categories": [{"id": 3, "name": "Opacity"}, {"id": 4, "name": "tube"}],
    }
    annotation_file = tmp_path / "annotations.json"
    annotation_file.write_text(json.dumps(document))
    return annotation_file, document


def test_coco_boxes_scaled_crowd_and_other_categories_ignored(coco_layout):
    annotation_file, _ = coco_layout
    dataset = load_dataset(annotation_file, "coco", image_size=40, image_root=annotation_file.parent / "images")

    assert len(dataset) == 2
    image, target = dataset[0]
    # 80 rows -> 40: scale 0.5; bbox [6, 8, 12, 16] is xyxy [6, 8, 18, 24] -> [3, 4, 9, 12].
    assert image.shape == (1, 40, 30) and image.dtype == torch.float32
    assert target["scale"] == 0.5 and target["orig_size"] == (80, 60) and target["image_id"] == 7
    torch.testing.assert_close(target["boxes"], torch.tensor([[3.0, 4.0, 9.0, 12.0]]))
    assert target["labels"].tolist() == [1]
    # Same pixels as the shared preprocessing gives the raw 8-bit array.
    expected = prepare_pixels(gradient(80, 60, 8), bits_stored=8, target_size=40).image
    assert torch.equal(image[0], torch.from_numpy(expected))

    image, target = dataset[1]  # a negative: only a "tube" annotation
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["image_id"] == 9
    expected = prepare_pixels(gradient(80, 60, 16), bits_stored=16, target_size=40).image
    assert torch.equal(image[0], torch.from_numpy(expected))


def test_coco_reads_dicom_files(tmp_path):
    write_dicom(tmp_path / "x.dcm", gradient(64, 48, 12), bits_stored=12, photometric="MONOCHROME1")
    document = {
        "images": [{"id": 1, "file_name": "x.dcm"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10]}],
        "categories": [{"id": 1, "name": "lesion"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(document))

    image, target = load_dataset(tmp_path / "a.json", "coco", image_size=32)[0]

    expected = prepare_dicom(pydicom.dcmread(tmp_path / "x.dcm"), target_size=32).image
    assert torch.equal(image[0], torch.from_numpy(expected))
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 2.0, 12.0, 7.0]]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\]: image_id 99 is not in 'images'"),
        (lambda d: d["annotations"][0].update(bbox=[6, 8, -1, 16]), r"annotations\[0\]: .*non-positive width"),
        (lambda d: d["annotations"][0].update(bbox=[6, 8, 12]), r"annotations\[0\]: bbox must be"),
        (lambda d: d["images"][1].update(file_name="missing.png"), r"images\[1\]: image file .*missing.png not found"),
        (lambda d: d["images"][1].update(id=7), r"images\[1\]: duplicate image id 7"),
        (lambda d: d["categories"][0].update(name="nodule"), r"exactly one named 'opacity'"),
        (lambda d: d.pop("annotations"), r"needs lists 'images', 'annotations' and 'categories'"),
    ],
)
def test_coco_bad_entries_are_named(coco_layout, edit, message):
    annotation_file, document = coco_layout
    edit(document)
    annotation_file.write_text(json.dumps(document))
    with pytest.raises(AnnotationError, match=message) as error:
        load_dataset(annotation_file, "coco", image_size=40, image_root=annotation_file.parent / "images")
    assert "annotations.json" in str(error.value)


def test_coco_size_mismatch_and_out_of_image_boxes_fail_on_load(coco_layout):
    annotation_file, document = coco_layout
    document["images"][0]["height"] = 81
    document["images"][1]["file_name"] = "a.png"
    document["annotations"][2]["category_id"] = 3
    document["annotations"][2]["bbox"] = [50, 70, 30, 30]  # reaches x=80, y=100 in a 60x80 image
    annotation_file.write_text(json.dumps(document))
    dataset = load_dataset(annotation_file, "coco", image_size=40, image_root=annotation_file.parent / "images")

    with pytest.raises(AnnotationError, match=r"image id 7: annotations give \(rows, cols\) \(81, 60\)"):
        dataset[0]
    with pytest.raises(AnnotationError, match=r"image id 9: box \[50.0, 70.0, 80.0, 100.0\].*outside the 60x80"):
        dataset[1]


def test_boxes_slightly_past_the_edge_are_clipped_and_slivers_rejected(tmp_path):
    Image.fromarray(gradient(80, 60, 8)).save(tmp_path / "a.png")

    def target_for(boxes):
        record = AnnotatedImage(image_id=0, path=tmp_path / "a.png", boxes=np.array(boxes, np.float32), source="rec")
        return AnnotatedImageDataset([record], image_size=40)[0][1]

    torch.testing.assert_close(target_for([[-1.5, 10, 61, 20]])["boxes"], torch.tensor([[0.0, 5.0, 30.0, 10.0]]))
    with pytest.raises(AnnotationError, match=r"rec: box \[60.5, 10.0, 61.5, 20.0\] has no area inside the 60x80"):
        target_for([[60.5, 10, 61.5, 20]])


def test_unreadable_and_colour_images_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.dcm").write_bytes(b"not a dicom")
    write_dicom(tmp_path / "rgb.dcm", np.zeros((64, 48, 3), np.uint8), bits_stored=8, photometric="RGB")
    names = ["broken.png", "broken.dcm", "rgb.dcm"]
    document = {
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [],
        "categories": [{"id": 1, "name": "opacity"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(document))
    dataset = load_dataset(tmp_path / "a.json", "coco", image_size=32)

    reasons = ["cannot read image", "cannot prepare DICOM", "'RGB' is not monochrome"]
    for index, (name, reason) in enumerate(zip(names, reasons)):
        with pytest.raises(AnnotationError, match=reason) as error:
            dataset[index]
        assert name in str(error.value)


# ---------------------------------------------------------------- SIIM

SIIM_HEADER = ["id", "boxes", "label", "StudyInstanceUID"]
SIIM_POSITIVE = [
    "aaa111_image",
    "[{'x': 4.5, 'y': 8.0, 'width': 10.0, 'height': 20.0}, {'x': 30.0, 'y': 2.0, 'width': 12.25, 'height': 6.0}]",
    "opacity 1 4.5 8.0 14.5 28.0 opacity 1 30.0 2.0 42.25 8.0",
    "study-1",
]
SIIM_NEGATIVE = ["bbb222_image", "", "none 1 0 0 1 1", "study-2"]


@pytest.fixture
def siim_root(tmp_path):
    """train/<study>/<series>/<image>.dcm for two 64x48 DICOMs, one MONOCHROME1."""
    write_dicom(tmp_path / "train" / "study-1" / "series-x" / "aaa111.dcm", gradient(64, 48, 14), bits_stored=14)
    write_dicom(tmp_path / "train" / "study-2" / "series-y" / "bbb222.dcm", gradient(64, 48, 12),
                bits_stored=12, photometric="MONOCHROME1")
    write_csv(tmp_path / "train_image_level.csv", SIIM_HEADER, [SIIM_POSITIVE, SIIM_NEGATIVE])
    return tmp_path


def test_siim_layout_parses_boxes_and_negatives(siim_root):
    dataset = load_dataset(siim_root, "siim", image_size=32)

    assert len(dataset) == 2
    image, target = dataset[0]
    assert image.shape == (1, 32, 24) and target["scale"] == 0.5 and target["orig_size"] == (64, 48)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.25, 4.0, 7.25, 14.0], [15.0, 1.0, 21.125, 4.0]]))
    assert target["labels"].tolist() == [1, 1] and target["image_id"] == 0

    image, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["image_id"] == 1
    dicom = pydicom.dcmread(siim_root / "train" / "study-2" / "series-y" / "bbb222.dcm")
    assert torch.equal(image[0], torch.from_numpy(prepare_dicom(dicom, target_size=32).image))


def test_siim_accepts_the_csv_path_and_nan_boxes(siim_root):
    write_csv(siim_root / "train_image_level.csv", SIIM_HEADER, [[*SIIM_NEGATIVE[:1], "nan", *SIIM_NEGATIVE[2:]]])
    dataset = load_dataset(siim_root / "train_image_level.csv", "siim", image_size=32)
    assert len(dataset) == 1 and dataset[0][1]["boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    "row, message",
    [
        ([SIIM_POSITIVE[0], SIIM_POSITIVE[1], "opacity 1 4.5 8.0 14.5 28.0", "study-1"],
         r"row 3: label has 1 opacity boxes but boxes has 2"),
        ([SIIM_POSITIVE[0], SIIM_POSITIVE[1], "opacity 1 4.5 8.0 14.5 29.0 opacity 1 30.0 2.0 42.25 8.0", "study-1"],
         r"row 3: label box \[4.5, 8.0, 14.5, 29.0\] disagrees"),
        ([SIIM_POSITIVE[0], "[{'x': 4.5, 'y': 8.0, 'width': 10.0", SIIM_POSITIVE[2], "study-1"],
         r"row 3: cannot parse boxes"),
        ([SIIM_POSITIVE[0], "[{'x': 4.5, 'y': 8.0}]", SIIM_POSITIVE[2], "study-1"],
         r"row 3: boxes must be a list of"),
        (["aaa111", *SIIM_POSITIVE[1:]], r"row 3: id 'aaa111' should look like"),
        ([*SIIM_POSITIVE[:3], "study-2"], r"row 3: found no aaa111.dcm under .*study-2"),
        (SIIM_NEGATIVE, r"row 3: duplicate id 'bbb222_image'"),
    ],
)
def test_siim_bad_rows_are_named(siim_root, row, message):
    write_csv(siim_root / "train_image_level.csv", SIIM_HEADER, [SIIM_NEGATIVE, row])
    with pytest.raises(AnnotationError, match=message) as error:
        load_dataset(siim_root, "siim", image_size=32)
    assert "train_image_level.csv" in str(error.value)


# ---------------------------------------------------------------- RSNA

RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]


@pytest.fixture
def rsna_root(tmp_path):
    """Two 8-bit 64x64 DICOMs: p1 negative, p2 with two boxes (one row each)."""
    for patient in ("p1", "p2"):
        write_dicom(tmp_path / "stage_2_train_images" / f"{patient}.dcm", gradient(64, 64, 8), bits_stored=8)
    write_csv(tmp_path / "stage_2_train_labels.csv", RSNA_HEADER,
              [["p1", "", "", "", "", "0"], ["p2", "10", "12", "20", "16", "1"], ["p2", "30", "5", "8", "8", "1"]])
    return tmp_path


def test_rsna_layout_groups_rows_per_patient(rsna_root):
    dataset = load_dataset(rsna_root, "rsna", image_size=32)

    assert len(dataset) == 2
    _, negative = dataset[0]
    assert negative["boxes"].shape == (0, 4) and negative["image_id"] == 0
    image, positive = dataset[1]
    assert image.shape == (1, 32, 32) and positive["image_id"] == 1
    torch.testing.assert_close(positive["boxes"], torch.tensor([[5.0, 6.0, 15.0, 14.0], [15.0, 2.5, 19.0, 6.5]]))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["p1", "3", "", "", "", "0"]], r"row 2: Target 0 row should have empty coordinates"),
        ([["p2", "", "", "", "", "1"]], r"row 2: Target 1 row needs numeric"),
        ([["p2", "1", "1", "4", "4", "2"]], r"row 2: Target must be 0 or 1"),
        ([["p2", "1", "1", "4", "4", "1"], ["p2", "", "", "", "", "0"]],
         r"row 3: patient p2 already has rows from row 2"),
        ([["p3", "1", "1", "4", "4", "1"]], r"row 2: DICOM .*p3.dcm not found"),
        ([["p2", "1", "1", "4", "4", "1", "extra"]], r"row 2: wrong number of fields"),
    ],
)
def test_rsna_bad_rows_are_named(rsna_root, rows, message):
    write_csv(rsna_root / "stage_2_train_labels.csv", RSNA_HEADER, rows)
    with pytest.raises(AnnotationError, match=message) as error:
        load_dataset(rsna_root, "rsna", image_size=32)
    assert "stage_2_train_labels.csv" in str(error.value)


def test_missing_columns_and_unknown_format(rsna_root):
    write_csv(rsna_root / "stage_2_train_labels.csv", ["patientId", "x", "y", "Target"], [["p1", "", "", "0"]])
    with pytest.raises(AnnotationError, match=r"missing columns \['width', 'height'\]"):
        load_dataset(rsna_root, "rsna", image_size=32)
    with pytest.raises(ValueError, match="unknown format 'voc'"):
        load_dataset(rsna_root, "voc", image_size=32)
    assert FORMATS == ("coco", "siim", "rsna")
