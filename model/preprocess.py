"""The one pixel-preprocessing path from stored DICOM values to model input.

The pipeline's DICOM decode (`prepare_dicom`) and the detector's training on
synthetic radiographs (`prepare_pixels`) both end in `_prepare`, so the model
sees the same transform in training and in production.

Order of operations, as a display would do it (PS3.3 C.11 and C.7.6.3):

1. Modality LUT (C.11.1): Rescale Slope/Intercept or a Modality LUT Sequence
   turns stored values into modality values.
2. VOI LUT (C.11.2): a VOI LUT Sequence, or Window Center/Width through the
   function named by VOI LUT Function (C.11.2.1.2 LINEAR by default,
   C.11.2.1.3 LINEAR_EXACT and SIGMOID).  The first window is used when there
   are several.  Without any, a robust window spans the 0.5-99.5 percentiles
   of the modality values.  The output range is [0, 1].
3. MONOCHROME1 (C.7.6.3.1.2: minimum value is white) is inverted, so the
   result always has MONOCHROME2 sense: higher = brighter = more attenuation.
4. The longest side is resized to `target_size` with antialiased bilinear
   resampling, aspect ratio kept.

Colour images (RGB, YBR_*, PALETTE COLOR) raise ValueError: a chest X-ray
model has no right answer for them, and the pipeline dead-letters the error.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
ROBUST_PERCENTILES = (0.5, 99.5)
ROBUST_SAMPLES = 250_000

VoiTransform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """Model input for one image.

    image: (H, W) float32 in [0, 1], MONOCHROME2 sense, max(H, W) == target_size.
    scale: resized pixel coordinate = original pixel coordinate * scale, on both axes.
    original_shape: (rows, cols) of the stored image.
    """

    image: np.ndarray
    scale: float
    original_shape: tuple[int, int]


def prepare_pixels(stored: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
                   rescale_slope: float = 1.0, rescale_intercept: float = 0.0,
                   window_center: float | None = None, window_width: float | None = None,
                   target_size: int) -> PreparedImage:
    """Prepare a (rows, cols) array of stored values, e.g. a synthetic radiograph.

    stored: (rows, cols) integer stored values (PS3.3 C.7.6.3), at most `bits_stored` bits.
    Rescale (C.11.1) maps them to modality values; the window (C.11.2.1.2 LINEAR) is
    given in modality values.  Returns the image described in the module docstring.
    """
    _check_monochrome(photometric)
    stored = np.asarray(stored)
    if stored.ndim != 2:
        raise ValueError(f"expected a (rows, cols) array, got shape {stored.shape}")
    if stored.size and int(np.max(stored)) >= 2 ** bits_stored:
        raise ValueError(f"stored values exceed {bits_stored} bits stored")
    modality = stored.astype(np.float64) * rescale_slope + rescale_intercept
    if (window_center is None) != (window_width is None):
        raise ValueError("window_center and window_width go together")
    if window_center is None:
        voi = _robust_window(modality)
    else:
        voi = _window(window_center, window_width, "LINEAR")
    return _prepare(modality, voi=voi, photometric=photometric, target_size=target_size)


def prepare_dicom(ds: pydicom.Dataset, *, target_size: int, frame: int = 0) -> PreparedImage:
    """Prepare frame `frame` of a monochrome DICOM image for the model.

    ds: a dataset with Pixel Data in any transfer syntax pydicom can decode.
    Enhanced multi-frame objects keep rescale and window per frame in functional
    groups (PS3.3 C.7.6.16.2.9 Pixel Value Transformation, C.7.6.16.2.10 Frame VOI
    LUT); those of the chosen frame win over the top-level attributes.
    Raises ValueError for colour images and for frames that do not exist.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    _check_monochrome(photometric)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{photometric} image with {ds.SamplesPerPixel} samples per pixel")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise ValueError(f"frame {frame} requested from an image with {frames} frame(s)")
    stored, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=frame)
    view = _frame_view(ds, frame)
    modality = apply_modality_lut(stored, view)
    return _prepare(modality, voi=_dataset_voi(view, modality), photometric=photometric,
                    target_size=target_size)


def resize_longest_side(image: np.ndarray, target_size: int) -> tuple[np.ndarray, float]:
    """Resize a (rows, cols) image so that its longest side is `target_size`.

    Returns the float32 (H, W) image and `scale`, with resized = original * scale
    exactly on both axes: the short side gets floor(side * scale) pixels and
    the resampling box is set from `scale`, so a sliver narrower than one
    output pixel at the far end of the short side is left out rather than
    stretched.  Bilinear with PIL's support widened by the reduction factor,
    which is the antialiasing.
    """
    if target_size < 1:
        raise ValueError(f"target_size must be positive, got {target_size}")
    rows, cols = image.shape
    scale = target_size / max(rows, cols)
    out_rows = _resized_length(rows, scale, target_size)
    out_cols = _resized_length(cols, scale, target_size)
    box = (0.0, 0.0, min(cols, out_cols / scale), min(rows, out_rows / scale))
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (out_cols, out_rows), Image.Resampling.BILINEAR, box=box)
    return np.array(resized, dtype=np.float32), scale


def boxes_to_original(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Map (N, 4) xyxy boxes in resized pixels back to original pixels, (N, 4) float32."""
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / np.float32(scale)).astype(np.float32)


def _prepare(modality: np.ndarray, *, voi: VoiTransform, photometric: str,
             target_size: int) -> PreparedImage:
    """The shared tail: VOI to [0, 1], MONOCHROME1 inversion, resize."""
    display = voi(modality)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    resized, scale = resize_longest_side(display.astype(np.float32), target_size)
    np.clip(resized, 0.0, 1.0, out=resized)
    return PreparedImage(image=resized, scale=scale, original_shape=tuple(modality.shape))


def _check_monochrome(photometric: str) -> None:
    if photometric not in MONOCHROME:
        raise ValueError(f"Photometric Interpretation {photometric!r} is not monochrome; "
                         f"only {' and '.join(MONOCHROME)} images can be prepared")


def _window(center: float, width: float, function: str) -> VoiTransform:
    """Window Center/Width to [0, 1] by the VOI LUT Function (PS3.3 C.11.2.1.2-3)."""
    center, width = float(center), float(width)
    if function == "LINEAR":
        # C.11.2.1.2.1: the -0.5 and width - 1 place the window between integer values.
        if width < 1:
            raise ValueError(f"LINEAR window width must be >= 1, got {width}")
        low, span = center - 0.5 - (width - 1) / 2, max(width - 1, 1e-12)
        return lambda x: np.clip((x - low) / span, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"LINEAR_EXACT window width must be > 0, got {width}")
        return lambda x: np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"SIGMOID window width must be > 0, got {width}")
        return lambda x: 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ValueError(f"unknown VOI LUT Function {function!r}")


def _robust_window(modality: np.ndarray) -> VoiTransform:
    """A LINEAR_EXACT window over the 0.5-99.5 percentiles, for images without one.

    Large images are sampled on a regular grid of about ROBUST_SAMPLES pixels: the
    percentiles barely move and a 5-megapixel image is ranged in milliseconds.
    """
    step = max(1, math.isqrt(modality.size // ROBUST_SAMPLES))
    low, high = np.percentile(modality[::step, ::step], ROBUST_PERCENTILES)
    width = max(float(high - low), 1e-6)
    return _window((low + high) / 2, width, "LINEAR_EXACT")


def _dataset_voi(view: pydicom.Dataset, modality: np.ndarray) -> VoiTransform:
    """The VOI transform a dataset asks for: LUT Sequence, first window, or robust."""
    if view.get("VOILUTSequence"):
        # C.11.2.1.1: LUT output runs from 0 to 2**n - 1, n the 3rd LUT Descriptor value.
        output_bits = int(view.VOILUTSequence[0].LUTDescriptor[2])
        return lambda x: apply_voi(np.rint(x).astype(np.int64), view) / (2.0 ** output_bits - 1)
    centers, widths = view.get("WindowCenter"), view.get("WindowWidth")
    if centers is None or widths is None:
        return _robust_window(modality)
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").strip()
    return _window(_first(centers), _first(widths), function)


def _frame_view(ds: pydicom.Dataset, frame: int) -> pydicom.Dataset:
    """`ds`, or for enhanced multi-frame objects a copy overlaid with the frame's
    functional-group values, per-frame groups winning over shared ones (PS3.3 C.7.6.16).

    The copy shares file_meta with `ds` so pydicom reads OW LUT data in the right byte order.
    """
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    groups = [*shared[:1], *per_frame[frame:frame + 1]]
    if not groups:
        return ds
    view = pydicom.Dataset()
    view.update(ds)
    view.file_meta = ds.file_meta
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if group.get(macro):
                view.update(group[macro][0])
    return view


def _first(value) -> float:
    """The first of a multi-valued DS (C.11.2: several windows are alternatives)."""
    if isinstance(value, Sequence):
        return float(value[0])
    return float(value)


def _resized_length(length: int, scale: float, target_size: int) -> int:
    # Guard float round-off: 49 * (512 / 49) must give 512, not 511.
    exact = length * scale
    return max(1, min(target_size, math.floor(exact + 1e-6)))
