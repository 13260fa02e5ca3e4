"""The shared pixel preprocessing: PS3.3 C.11 order of operations, inversion, resizing."""
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from model.preprocess import PreparedImage, boxes_to_original, prepare_dicom, prepare_pixels, resize_longest_side


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _dataset(frames: np.ndarray, **attributes) -> pydicom.Dataset:
    """An in-memory MONOCHROME2 dataset holding (frames, rows, cols) uint16 pixels."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = frames.astype("<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_output_is_float_unit_range_longest_side_target():
    stored = np.random.default_rng(0).integers(0, 4096, size=(300, 200)).astype(np.uint16)
    prepared = prepare_pixels(stored, bits_stored=12, target_size=128)
    assert isinstance(prepared, PreparedImage)
    assert prepared.image.dtype == np.float32
    assert prepared.image.shape == (128, 85)  # floor(200 * 128 / 300)
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0
    assert prepared.scale == pytest.approx(128 / 300)
    assert prepared.original_shape == (300, 200)


def test_upscaling_keeps_the_aspect_ratio():
    prepared = prepare_pixels(np.arange(60, dtype=np.uint16).reshape(6, 10), bits_stored=8, target_size=25)
    assert prepared.image.shape == (15, 25)
    assert prepared.scale == 2.5


@pytest.mark.parametrize("shape, target", [((300, 199), 128), ((199, 300), 128), ((64, 48), 100)])
def test_resize_maps_coordinates_by_exactly_scale_on_both_axes(shape, target):
    rows, cols = shape
    ramp_x = np.broadcast_to(np.arange(cols, dtype=np.float32), shape)
    ramp_y = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None], shape)
    resized_x, scale = resize_longest_side(ramp_x, target)
    resized_y, _ = resize_longest_side(ramp_y, target)
    assert max(resized_x.shape) == target
    # Resampling a linear ramp gives, at resized pixel centre j, the original coordinate
    # it maps to, (j + 0.5) / scale - 0.5, up to the filter's discretisation (< 0.05 px).
    # A scale off by half a pixel over the short side would drift far beyond that.
    interior = slice(3, -3)
    expected_x = (np.arange(resized_x.shape[1]) + 0.5) / scale - 0.5
    expected_y = (np.arange(resized_y.shape[0]) + 0.5) / scale - 0.5
    np.testing.assert_allclose(resized_x[5, interior], expected_x[interior], atol=0.05)
    np.testing.assert_allclose(resized_y[interior, 5], expected_y[interior], atol=0.05)


def test_resize_antialiases_when_shrinking():
    checkerboard = (np.indices((256, 256)).sum(axis=0) % 2).astype(np.float32)
    resized, _ = resize_longest_side(checkerboard, 32)
    # Point sampling would keep the 0/1 pattern; an antialiasing filter averages it to 0.5.
    np.testing.assert_allclose(resized[2:-2, 2:-2], 0.5, atol=0.02)


def test_boxes_to_original_inverts_the_scale():
    original = np.array([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 300.0, 199.0]], dtype=np.float32)
    scale = 128 / 300
    back = boxes_to_original(original * scale, scale)
    assert back.dtype == np.float32 and back.shape == (2, 4)
    np.testing.assert_allclose(back, original, rtol=1e-6)
    assert boxes_to_original(np.zeros((0, 4)), scale).shape == (0, 4)


def test_window_is_linear_per_c_11_2_1_2():
    # C.11.2.1.2.1 with c = 20, w = 21: below c - 0.5 - (w-1)/2 = 9.5 -> 0, above
    # c - 0.5 + (w-1)/2 = 29.5 -> 1, between: (x - 9.5) / 20.
    stored = np.array([[0, 9, 10, 20, 29, 30, 40]], dtype=np.uint16)
    prepared = prepare_pixels(stored, bits_stored=8, window_center=20, window_width=21, target_size=7)
    np.testing.assert_allclose(prepared.image[0], [0, 0, 0.025, 0.525, 0.975, 1, 1], atol=1e-6)


def test_window_applies_to_rescaled_values():
    # Modality values 2x - 100 (C.11.1) are what the window sees.
    stored = np.array([[50, 55, 60, 65, 70]], dtype=np.uint16)  # modality 0, 10, 20, 30, 40
    prepared = prepare_pixels(stored, bits_stored=8, rescale_slope=2, rescale_intercept=-100,
                              window_center=20, window_width=21, target_size=5)
    np.testing.assert_allclose(prepared.image[0], [0, 0.025, 0.525, 1, 1], atol=1e-6)


def test_without_a_window_the_robust_range_fills_zero_to_one():
    stored = np.linspace(1000, 3000, 10_000).reshape(100, 100).astype(np.uint16)
    stored[0, 0], stored[-1, -1] = 0, 4095  # outliers, beyond the 0.5-99.5 percentiles
    image = prepare_pixels(stored, bits_stored=12, target_size=100).image
    assert image[0, 0] == 0 and image[-1, -1] == 1
    assert image[1:-1].min() < 0.01 and image[1:-1].max() > 0.99


def test_monochrome1_twin_prepares_identically():
    top = 4095
    mono2 = np.random.default_rng(1).integers(200, 3900, size=(90, 70)).astype(np.uint16)
    mono1 = (top - mono2).astype(np.uint16)
    plain = dict(bits_stored=12, target_size=64)
    np.testing.assert_allclose(prepare_pixels(mono1, photometric="MONOCHROME1", **plain).image,
                               prepare_pixels(mono2, **plain).image, atol=1e-6)
    # A LINEAR window mirrors from c to top + 1 - c (C.11.2.1.2.1 centres between integers).
    mirrored = prepare_pixels(mono1, photometric="MONOCHROME1", window_center=top + 1 - 1500,
                              window_width=1001, **plain)
    direct = prepare_pixels(mono2, window_center=1500, window_width=1001, **plain)
    np.testing.assert_allclose(mirrored.image, direct.image, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), bits=st.integers(8, 16),
       target=st.integers(1, 64), seed=st.integers(0, 2 ** 16))
def test_any_monochrome_image_prepares_to_unit_range(rows, cols, bits, target, seed):
    stored = np.random.default_rng(seed).integers(0, 2 ** bits, size=(rows, cols)).astype(np.uint16)
    prepared = prepare_pixels(stored, bits_stored=bits, target_size=target)
    assert max(prepared.image.shape) == target and min(prepared.image.shape) >= 1
    assert np.all((prepared.image >= 0) & (prepared.image <= 1))
    inverted = prepare_pixels((2 ** bits - 1 - stored).astype(np.uint16), bits_stored=bits,
                              photometric="MONOCHROME1", target_size=target)
    np.testing.assert_allclose(inverted.image, prepared.image, atol=1e-5)


def test_rejects_colour_and_bad_arguments():
    with pytest.raises(ValueError, match="not monochrome"):
        prepare_pixels(np.zeros((4, 4), np.uint16), bits_stored=8, photometric="RGB", target_size=4)
    with pytest.raises(ValueError, match="bits stored"):
        prepare_pixels(np.full((4, 4), 300, np.uint16), bits_stored=8, target_size=4)
    with pytest.raises(ValueError, match="together"):
        prepare_pixels(np.zeros((4, 4), np.uint16), bits_stored=8, window_center=3, target_size=4)
    with pytest.raises(ValueError, match="width"):
        prepare_pixels(np.zeros((4, 4), np.uint16), bits_stored=8, window_center=3, window_width=0.5,
                       target_size=4)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "RG3_UNCR.dcm"])
def test_prepare_dicom_reads_the_datasets_own_parameters(name):
    ds = _read(name)
    window = {}
    if "WindowCenter" in ds:
        window = dict(window_center=float(ds.WindowCenter), window_width=float(ds.WindowWidth))
    expected = prepare_pixels(ds.pixel_array, bits_stored=ds.BitsStored, photometric=ds.PhotometricInterpretation,
                              rescale_slope=float(ds.get("RescaleSlope", 1)),
                              rescale_intercept=float(ds.get("RescaleIntercept", 0)),
                              target_size=96, **window)
    prepared = prepare_dicom(ds, target_size=96)
    assert prepared.original_shape == (ds.Rows, ds.Columns)
    assert max(prepared.image.shape) == 96
    np.testing.assert_array_equal(prepared.image, expected.image)


def test_monochrome1_radiograph_is_shown_bright_where_dense():
    # RG3 is a MONOCHROME1 knee radiograph: the bone, the minimum stored values,
    # must come out brighter than the unattenuated background around it.
    ds = _read("RG3_UNCR.dcm")
    stored = ds.pixel_array
    prepared = prepare_dicom(ds, target_size=176).image
    dense = prepared[stored[::10, ::10] <= np.percentile(stored, 5)]
    open_field = prepared[stored[::10, ::10] >= np.percentile(stored, 95)]
    assert dense.mean() > open_field.mean() + 0.5


@pytest.mark.parametrize("compressed, native", [
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
])
def test_lossless_transfer_syntaxes_prepare_like_native(compressed, native):
    np.testing.assert_array_equal(prepare_dicom(_read(compressed), target_size=64).image,
                                  prepare_dicom(_read(native), target_size=64).image)


def test_voi_lut_sequence_is_used_and_scaled_by_its_output_bits():
    ds = _read("vlut_04.dcm")  # 8-bit stored, VOI LUT Sequence with 16-bit output
    expected = apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / (2 ** 16 - 1)
    expected_image, _ = resize_longest_side(expected, 128)
    np.testing.assert_allclose(prepare_dicom(ds, target_size=128).image, expected_image, atol=1e-6)


def test_modality_lut_sequence_feeds_the_robust_window():
    ds = _read("mlut_18.dcm")  # Modality LUT Sequence, no window
    modality = apply_modality_lut(ds.pixel_array, ds)
    expected = prepare_pixels(modality, bits_stored=16, target_size=128)
    np.testing.assert_allclose(prepare_dicom(ds, target_size=128).image, expected.image, atol=1e-6)


def test_multi_frame_picks_the_frame():
    ds = _read("emri_small.dcm")  # 10 frames
    frames = ds.pixel_array
    for frame in (0, 3, 9):
        expected = prepare_pixels(frames[frame], bits_stored=ds.BitsStored, target_size=32)
        np.testing.assert_array_equal(prepare_dicom(ds, target_size=32, frame=frame).image, expected.image)
    with pytest.raises(ValueError, match="frame 10"):
        prepare_dicom(ds, target_size=32, frame=10)


def test_first_of_several_windows_is_used():
    frames = np.arange(100, dtype=np.uint16).reshape(1, 10, 10)
    ds = _dataset(frames, WindowCenter=[50, 500], WindowWidth=[21, 1000])
    expected = prepare_pixels(frames[0], bits_stored=12, window_center=50, window_width=21, target_size=10)
    np.testing.assert_array_equal(prepare_dicom(ds, target_size=10).image, expected.image)


def test_linear_exact_and_sigmoid_functions_per_c_11_2_1_3():
    frames = np.array([[[0, 10, 20, 30, 40]]], dtype=np.uint16)
    exact = prepare_dicom(_dataset(frames, WindowCenter=20, WindowWidth=20, VOILUTFunction="LINEAR_EXACT"),
                          target_size=5)
    np.testing.assert_allclose(exact.image[0], [0, 0, 0.5, 1, 1], atol=1e-6)
    sigmoid = prepare_dicom(_dataset(frames, WindowCenter=20, WindowWidth=20, VOILUTFunction="SIGMOID"),
                            target_size=5)
    x = frames[0, 0].astype(float)
    np.testing.assert_allclose(sigmoid.image[0], 1 / (1 + np.exp(-4 * (x - 20) / 20)), atol=1e-6)


def test_enhanced_multi_frame_uses_each_frames_functional_groups():
    frames = np.stack([np.arange(100, dtype=np.uint16).reshape(10, 10)] * 2)
    shared, first, second = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    transformation = pydicom.Dataset()
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 2, -10, "US"
    shared.PixelValueTransformationSequence = [transformation]
    for group, (center, width) in ((first, (40, 41)), (second, (120, 61))):
        voi = pydicom.Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group.FrameVOILUTSequence = [voi]
    ds = _dataset(frames, SharedFunctionalGroupsSequence=[shared],
                  PerFrameFunctionalGroupsSequence=[first, second])
    for frame, (center, width) in enumerate(((40, 41), (120, 61))):
        expected = prepare_pixels(frames[frame], bits_stored=12, rescale_slope=2, rescale_intercept=-10,
                                  window_center=center, window_width=width, target_size=10)
        np.testing.assert_array_equal(prepare_dicom(ds, target_size=10, frame=frame).image, expected.image)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "OBXXXX1A.dcm"])
def test_colour_dicom_raises_value_error(name):
    with pytest.raises(ValueError, match="not monochrome"):
        prepare_dicom(_read(name), target_size=64)
