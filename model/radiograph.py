"""Synthetic PA chest radiographs with labelled COVID-19-like opacities.

The hospital simulator stores these as DICOM and the detector trains on them,
so they must look like chest X-rays and be cheap (tens of ms at 512 x 512).

The image is built the way a radiograph forms:

1. Anatomy is drawn as an attenuation map A (line integral of mu, unitless):
   soft-tissue body with neck and shoulders, air-filled lungs (which lower A),
   mediastinum and heart, hemidiaphragm domes, spine, trachea, posterior and
   anterior ribs, clavicles, hila and branching vessel trees, a gastric bubble.
   Shapes live in normalised coordinates (x in image widths, y in image
   heights), so any rows x cols works; per-image draws vary size, position,
   tilt, heart size, rib spacing, exposure and contrast.
2. Opacities add attenuation inside the lungs, in proportion to the air they
   replace: ground glass is faint and patchy, consolidation dense and sharp.
3. Exposure: photon counts N0 * exp(-A) times a smooth exposure field, plus
   scatter, with Poisson-like quantum noise and electronic noise, taken back
   to the log domain (as CR/DX processing does), blurred slightly by the
   detector, ranged from the image's own histogram and mapped through a
   per-image tone curve to stored values.

Stored values are MONOCHROME2: higher = brighter = more attenuation.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OPACITY_KINDS = ("ground_glass", "consolidation")
BOX_THRESHOLD = 0.25  # an opacity's box bounds where its added density exceeds this fraction of its peak
MIN_OPACITY_WIDTH, MAX_OPACITY_WIDTH = 0.08, 0.36  # drawn width, fraction of image width; the visible box is smaller


@dataclasses.dataclass(frozen=True)
class Opacity:
    """One labelled opacity: box = (x1, y1, x2, y2) image pixels, x2/y2 exclusive."""

    box: tuple[float, float, float, float]
    kind: str


@dataclasses.dataclass(frozen=True)
class SyntheticRadiograph:
    """pixels: (rows, cols) uint16 stored values in [0, 2**bits_stored - 1], MONOCHROME2 sense."""

    pixels: np.ndarray
    bits_stored: int
    opacities: tuple[Opacity, ...]

    @property
    def boxes(self) -> np.ndarray:
        """(N, 4) float32 xyxy pixel boxes of the opacities; (0, 4) when there are none."""
        return np.array([o.box for o in self.opacities], dtype=np.float32).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """Per-image anatomy and exposure draws.  Lateral sizes are in image widths
    measured from the midline, heights in image heights from the top edge."""

    midline: float           # x of the spine at mid-height
    tilt: float              # midline shift per unit of y: a slightly rotated patient
    neck: float              # half-width of the neck
    shoulders: float         # half-width across the shoulders
    trunk: float             # half-width of the lower chest
    shoulder_y: float        # where the neck widens into the shoulders
    apex_y: float            # top of the lungs
    apex_x: float            # lateral position of each lung apex
    cage: float              # inner chest wall at its widest
    mediastinum: float       # upper mediastinum half-width
    aortic_knob: tuple[float, float]     # y, bulge
    heart: tuple[float, float, float]    # right border reach, left border (apex) reach, top y
    dome_y: tuple[float, float]          # hemidiaphragm peaks: (image left = patient right, image right)
    costophrenic_drop: float             # how far the domes fall to the lateral recesses
    rib_start_y: float
    rib_spacing: float
    rib_thickness: float                 # fraction of the spacing a posterior rib covers
    clavicle_y: float
    chest_wall: float        # extra soft tissue over the lower zones
    hilum: tuple[float, float]           # lateral offset, y
    vessels: np.ndarray                  # (n, 5) segments: x0, y0, x1, y1, diameter (see _draw_vessel_tree)
    stomach: tuple[float, float, float]  # lateral offset, depth below left dome, radius (0 = none)
    exposure: tuple[float, float, float]  # gradient along x, gradient along y, vignetting
    photons: float           # N0: counts per pixel behind no attenuation
    electronic_noise: float  # detector read noise, counts
    scatter: float           # scatter fluence as a fraction of the mean primary fluence
    display: tuple[float, float, float]  # black and white offsets (fractions of the signal range), tone curvature
    levels: tuple[float, float]          # fractions of the stored range for black and white


def synthesize_chest_xray(rng: np.random.Generator, *, rows: int = 512, cols: int = 512,
                          bits_stored: int = 12, num_opacities: int = 0) -> SyntheticRadiograph:
    """Draw one PA chest radiograph and its opacity labels.

    rng: consumed in a fixed order (anatomy, noise, then opacities), so one state
    gives one image, and one seed with a different `num_opacities` gives the same
    anatomy and noise with opacities added.
    Returns (rows, cols) uint16 pixels in [0, 2**bits_stored - 1] and one Opacity per
    requested opacity, its box tight around where the added attenuation exceeds
    BOX_THRESHOLD of its peak.
    """
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, got {bits_stored}")
    if rows < 64 or cols < 64:
        raise ValueError(f"image must be at least 64 x 64, got {rows} x {cols}")
    anatomy = _draw_anatomy(rng)
    noise = rng.standard_normal((rows, cols), dtype=np.float32)
    grid = _Grid.make(anatomy, rows, cols)
    lung = _lung_depth(anatomy, grid)
    attenuation = _attenuation(anatomy, grid, lung)
    opacities = []
    for _ in range(num_opacities):
        kind = OPACITY_KINDS[int(rng.integers(len(OPACITY_KINDS)))]
        opacity, window, density = _place_opacity(rng, kind, anatomy, grid, lung)
        attenuation[window] += density
        opacities.append(opacity)
    pixels = _expose(anatomy, grid, attenuation, noise, bits_stored)
    return SyntheticRadiograph(pixels=pixels, bits_stored=bits_stored, opacities=tuple(opacities))


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    sx, sy = rng.uniform(0.92, 1.05), rng.uniform(0.92, 1.05)
    apex = rng.uniform(0.09, 0.15)
    cage = rng.uniform(0.36, 0.41) * sx
    dome_right = apex + rng.uniform(0.52, 0.6) * sy
    dome_left = dome_right + rng.uniform(0.01, 0.04)
    mediastinum = rng.uniform(0.045, 0.06) * sx
    hilum = (rng.uniform(0.08, 0.1) * sx, apex + rng.uniform(0.24, 0.29) * sy)
    trunk = cage + rng.uniform(0.05, 0.08)
    heart_right = rng.uniform(0.1, 0.13) * sx
    cardiothoracic_ratio = rng.uniform(0.38, 0.52)
    return _Anatomy(
        midline=0.5 + rng.normal(0, 0.012),
        tilt=rng.uniform(-0.04, 0.04),
        neck=rng.uniform(0.07, 0.09) * sx,
        shoulders=trunk + rng.uniform(0.03, 0.08),
        trunk=trunk,
        shoulder_y=apex - rng.uniform(0.08, 0.11),
        apex_y=apex,
        apex_x=rng.uniform(0.11, 0.14) * sx,
        cage=cage,
        mediastinum=mediastinum,
        aortic_knob=(apex + rng.uniform(0.15, 0.2) * sy, rng.uniform(0.025, 0.045)),
        heart=(heart_right, cardiothoracic_ratio * 2 * cage - heart_right, hilum[1] + rng.uniform(0.0, 0.04)),
        dome_y=(dome_right, dome_left),
        costophrenic_drop=rng.uniform(0.09, 0.14),
        rib_start_y=apex - 0.02,
        rib_spacing=rng.uniform(0.046, 0.054) * sy,
        rib_thickness=rng.uniform(0.42, 0.5),
        clavicle_y=apex + rng.uniform(0.02, 0.045),
        chest_wall=rng.uniform(0.1, 0.4),
        hilum=hilum,
        vessels=_draw_vessel_tree(rng, hilum),
        stomach=(rng.uniform(0.1, 0.2), rng.uniform(0.02, 0.05),
                 rng.uniform(0.03, 0.06) * (rng.random() < 0.7)),
        exposure=(rng.uniform(-0.15, 0.15), rng.uniform(-0.2, 0.1), rng.uniform(0.2, 0.6)),
        photons=rng.uniform(1500, 5000),
        electronic_noise=rng.uniform(2, 6),
        scatter=rng.uniform(0.05, 0.2),
        display=(rng.uniform(-0.05, 0.1), rng.uniform(-0.05, 0.1), rng.uniform(0.0, 0.5)),
        levels=(rng.uniform(0.0, 0.06), rng.uniform(0.88, 1.0)),
    )


def _draw_vessel_tree(rng: np.random.Generator, hilum: tuple[float, float],
                      trunks: int = 8, generations: int = 6) -> np.ndarray:
    """Pulmonary vessels as binary trees growing out of each hilum.

    Returns (n, 5) float32 segments: x0, y0, x1, y1 as offsets from the midline (widths)
    and heights, then the vessel diameter in widths.  Branches taper and shorten each
    generation; they may leave the lungs, the lung mask hides them there.
    """
    segments = []
    for side in (-1.0, 1.0):  # image left (patient right), image right
        # Angles in image axes (y down, mirrored per side): 70 = down and a little medial,
        # 180 = lateral, 250 = up and a little lateral.
        angles = np.deg2rad(rng.uniform(70, 250, size=trunks))
        x = np.full(trunks, side * hilum[0]) + rng.normal(0, 0.008, trunks)
        y = np.full(trunks, hilum[1]) + rng.normal(0, 0.015, trunks)
        length, width = rng.uniform(0.05, 0.07, trunks), rng.uniform(0.01, 0.016, trunks)
        for _ in range(generations):
            x1 = x - side * length * np.cos(angles)
            y1 = y + length * np.sin(angles)
            segments.append(np.stack([x, y, x1, y1, width], axis=1))
            spread = np.deg2rad(rng.uniform(12, 35, size=(len(x), 2))) * np.array([1, -1])
            angles = (angles[:, None] + spread + rng.normal(0, 0.1, (len(x), 2))).ravel()
            x, y = np.repeat(x1, 2), np.repeat(y1, 2)
            length = np.repeat(length, 2) * rng.uniform(0.65, 0.85, len(angles))
            width = np.repeat(width, 2) * rng.uniform(0.65, 0.8, len(angles))
    return np.concatenate(segments).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates and the per-row outlines the layers share.

    x: (cols,) in widths; y: (rows,) in heights; u: (rows, cols) signed offset from the
    tilted midline in widths, negative on the image left (patient right); au = |u|.
    Per-row (rows,) outlines, as |u| reached: body, lateral lung border, medial lung
    border and heart border on each side.
    """

    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    au: np.ndarray
    image_left: np.ndarray   # (rows, cols) bool, u < 0
    body: np.ndarray
    lateral: np.ndarray
    medial: tuple[np.ndarray, np.ndarray]  # (image left, image right)
    heart: tuple[np.ndarray, np.ndarray]

    @classmethod
    def make(cls, an: _Anatomy, rows: int, cols: int) -> _Grid:
        x = (np.arange(cols, dtype=np.float32) + 0.5) / cols
        y = (np.arange(rows, dtype=np.float32) + 0.5) / rows
        u = x[None, :] - (an.midline + an.tilt * (y - 0.5))[:, None]
        # Trapezius slope from neck to shoulders, then the chest wall narrows slightly.
        shoulder = _smoothstep((y - an.shoulder_y) / 0.14)
        width_below = an.trunk + (an.shoulders - an.trunk) * np.exp(-((y - an.apex_y) / 0.12) ** 2)
        body = an.neck + (width_below - an.neck) * shoulder
        # Lung outline: a quarter ellipse out from the apex, the apex itself a dome.
        t = np.clip((y - an.apex_y) / 0.36, 0, 1)
        lateral = an.apex_x + (an.cage - an.apex_x) * np.sqrt(1 - (1 - t) ** 2)
        lateral *= 1 - 0.06 * np.clip((y - an.apex_y - 0.36) / 0.25, 0, 1)
        t = np.clip((y - an.apex_y) / 0.1, 0, 1)
        apex_medial = an.apex_x * (1 - np.sqrt(1 - (1 - t) ** 2))
        knob_y, knob = an.aortic_knob
        upper = an.mediastinum * (1 + 0.25 * np.clip((y - an.apex_y) / 0.4, 0, 1))
        medial_left = np.maximum(apex_medial, upper)
        medial_right = np.maximum(apex_medial, upper + knob * np.exp(-((y - knob_y) / 0.028) ** 2))
        # Outline pairs are (image left, image right): the patient's right comes first.
        right_reach, left_reach, heart_top = an.heart
        t = np.clip((y - heart_top) / (an.dome_y[0] - heart_top), 0, 1)
        heart_left = upper + (right_reach - upper) * np.sin(np.pi / 2 * np.minimum(t / 0.75, 1.25))
        t = np.clip((y - heart_top + 0.03) / (an.dome_y[1] - heart_top + 0.01), 0, 1)
        heart_right = upper + (left_reach - upper) * np.sin(np.pi / 2 * np.minimum(t / 0.85, 1.3))
        return cls(x=x, y=y, u=u, au=np.abs(u), image_left=u < 0, body=body, lateral=lateral,
                   medial=(medial_left, medial_right), heart=(heart_left, heart_right))

    def side(self, pair: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """(rows, cols) per-row outline pair (image left, image right), each pixel its side's."""
        return np.where(self.image_left, pair[0][:, None], pair[1][:, None])

    def row_slice(self, top: float, bottom: float) -> slice:
        """Rows whose centres lie in [top, bottom] (heights)."""
        return slice(*np.searchsorted(self.y, [top, bottom]))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def _ramp(distance: np.ndarray, width: float) -> np.ndarray:
    return np.clip(distance * (1 / width), 0, 1)


def _lung_depth(an: _Anatomy, g: _Grid) -> np.ndarray:
    """(rows, cols) float32 in [0, 1]: air path length through the lungs, relative.

    Zero outside the lungs.  Falls off sharply at the mediastinum and diaphragm,
    gradually towards the chest wall where the lung thins, is shallower at the
    apices, and keeps a little depth behind the heart (the retrocardiac lung).
    """
    depth = _ramp(g.au - g.side(g.medial), 0.01)
    depth *= np.sqrt(_ramp(g.lateral[:, None] - g.au, 0.12))
    depth *= _ramp(_diaphragm(an, g) - g.y[:, None], 0.01)
    depth *= 1 - 0.85 * _ramp(g.side(g.heart) - g.au, 0.01)
    depth *= np.sqrt(_ramp(g.y - an.apex_y, 0.15))[:, None]
    return depth.astype(np.float32, copy=False)


def _diaphragm(an: _Anatomy, g: _Grid) -> np.ndarray:
    """(rows, cols) y of the hemidiaphragm under each pixel: a dome peaking mid-lung,
    falling steeply into the lateral costophrenic recess and gently to the heart."""
    peak = np.where(g.image_left, np.float32(an.dome_y[0]), np.float32(an.dome_y[1]))
    across = (g.au - 0.5 * an.cage) * (2 / an.cage)  # -1 at the midline, 1 at the widest cage
    drop = np.where(across > 0, np.float32(an.costophrenic_drop), np.float32(0.04))
    return peak + drop * across * across


def _attenuation(an: _Anatomy, g: _Grid, lung: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 attenuation of the anatomy, before opacities and noise."""
    body = np.clip(1 - (g.u * (1 / g.body)[:, None]) ** 2, 0, 1)
    attenuation = 2.2 * np.sqrt(body)
    attenuation -= 1.1 * lung
    # Pectoral and breast soft tissue over the lower zones.
    attenuation += an.chest_wall * _smoothstep((g.y - an.apex_y - 0.25) / 0.3)[:, None] * body
    _add_spine_and_trachea(attenuation, an, g)
    _add_ribs(attenuation, an, g)
    _add_clavicles(attenuation, an, g)
    _add_vessels(attenuation, an, g, lung)
    _add_stomach_bubble(attenuation, an, g)
    return attenuation


def _bone(d: np.ndarray) -> np.ndarray:
    """Path length through a tube of unit radius, less dense in the marrow, at offset d."""
    d2 = d * d
    return np.sqrt(np.clip(1 - d2, 0, 1)) - 0.5 * np.sqrt(np.clip(0.55 - d2, 0, 1))


def _add_spine_and_trachea(a: np.ndarray, an: _Anatomy, g: _Grid) -> None:
    reach = 0.05 + abs(an.tilt) / 2
    cols = slice(*np.searchsorted(g.x, [an.midline - reach, an.midline + reach]))
    u, y = g.u[:, cols], g.y[:, None]
    # One vertebral body per rib level, the disc spaces darker gaps between them.
    level = (y - an.rib_start_y) * (1 / an.rib_spacing)
    vertebrae = 0.7 + 0.3 * _smoothstep(4 * np.abs(np.sin(np.pi * level)) - 0.5)
    half_width = 0.024 + 0.02 * np.clip(y - an.apex_y, 0, 0.6)
    a[:, cols] += 0.25 * np.sqrt(np.clip(1 - (u / half_width) ** 2, 0, 1)) * vertebrae
    carina = an.hilum[1] - 0.03
    trachea = np.clip(1 - (u * (1 / 0.018)) ** 2, 0, 1) * _smoothstep((carina - y) / 0.05)
    a[:, cols] -= 0.3 * trachea


def _add_ribs(a: np.ndarray, an: _Anatomy, g: _Grid) -> None:
    """Posterior ribs rise a little from the spine, then curve down along the chest wall;
    the fainter anterior ribs, seen only laterally, run down towards the sternum."""
    rows = g.row_slice(an.rib_start_y - 0.03, max(an.dome_y) + 0.12)
    au, y = g.au[rows], g.y[rows, None]
    s = au * (1 / np.maximum(g.lateral[rows], 0.05))[:, None]
    lateral_fade = np.clip((1.12 - s) * 15, 0, 1) * _ramp(max(an.dome_y) + 0.12 - y, 0.08)

    # Lower ribs sit further apart and slope more steeply; all widen laterally.
    t = y - an.rib_start_y + 0.1 * s - (0.2 + 0.3 * (y - an.apex_y)) * s * s
    phase = t * (1 - 0.3 * t) * (1 / an.rib_spacing)
    posterior = _rib_band(phase, an.rib_thickness * (0.75 + 0.35 * s), count=10)
    # Over the mediastinum, scatter and noise all but hide them.
    posterior *= lateral_fade * (0.3 + 0.7 * _smoothstep((s - 0.1) * 3))

    spacing = 1.4 * an.rib_spacing
    phase = (y - an.rib_start_y - 0.06 + 0.2 * s) * (1 / spacing)
    anterior = _rib_band(phase, 0.5, count=6)
    anterior *= lateral_fade * _smoothstep((s - 0.35) * 4)
    a[rows] += 0.26 * posterior + 0.2 * anterior


def _rib_band(phase: np.ndarray, thickness: float | np.ndarray, count: int) -> np.ndarray:
    """Bone profile of ribs 0..count-1, rib n covering phase [n, n + thickness)."""
    level = np.floor(phase)
    bone = _bone((phase - level) * (2 / thickness) - 1)
    bone[(level < 0) | (level >= count)] = 0
    return bone


def _add_clavicles(a: np.ndarray, an: _Anatomy, g: _Grid) -> None:
    rows = g.row_slice(an.clavicle_y - 0.08, an.clavicle_y + 0.03)
    c = g.au[rows] - 0.025  # along the clavicle from its sternal end
    centre = an.clavicle_y - 0.25 * c + 0.2 * c * c
    bone = _bone((g.y[rows, None] - centre) * (1 / 0.018))
    bone *= np.clip(c * 40, 0, 1) * np.clip((0.38 - c) * 25, 0, 1)
    a[rows] += 0.45 * bone


def _add_vessels(a: np.ndarray, an: _Anatomy, g: _Grid, lung: np.ndarray) -> None:
    """Draw the vessel trees, blur them round, and show them only where there is lung."""
    rows, cols = a.shape
    canvas = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(canvas)
    midline = an.midline + an.tilt * (an.hilum[1] - 0.5)
    ends = (an.vessels[:, :4] + np.float32([midline, 0, midline, 0])) * np.float32([cols, rows, cols, rows])
    widths = an.vessels[:, 4] * cols
    fills = np.minimum(255, 60 + 40 * widths).astype(int).tolist()
    for (x0, y0, x1, y1), fill, width in zip(ends.tolist(), fills, np.maximum(1, np.rint(widths)).astype(int).tolist()):
        draw.line((x0, y0, x1, y1), fill=fill, width=width)
    for side in (-1, 1):  # the hila: pulmonary arteries and veins bunched at the lung roots
        cx, cy, rx, ry = (midline + side * an.hilum[0]) * cols, an.hilum[1] * rows, 0.025 * cols, 0.05 * rows
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=110)
    canvas = canvas.filter(ImageFilter.BoxBlur(max(1, round(cols / 400))))
    a += np.asarray(canvas, dtype=np.float32) * (0.26 / 255) * np.sqrt(lung)


def _add_stomach_bubble(a: np.ndarray, an: _Anatomy, g: _Grid) -> None:
    x_offset, below_dome, radius = an.stomach
    if radius == 0:
        return
    cy = an.dome_y[1] + below_dome + radius
    rows = g.row_slice(cy - radius, cy + radius)
    d2 = ((g.u[rows] - x_offset) * (1 / radius)) ** 2 + ((g.y[rows, None] - cy) * (1 / (0.8 * radius))) ** 2
    # Air rises: the bubble is flat-bottomed at its fluid level.
    a[rows] -= 0.5 * np.sqrt(np.clip(1 - d2, 0, 1)) * (g.y[rows, None] < cy + 0.3 * radius)


def _place_opacity(rng: np.random.Generator, kind: str, an: _Anatomy, g: _Grid,
                   lung: np.ndarray) -> tuple[Opacity, tuple[slice, slice], np.ndarray]:
    """Draw one opacity of `kind` inside the lungs, favouring peripheral and lower zones.

    Returns the labelled Opacity, the (rows, cols) window it touches and the float32
    attenuation to add there.
    """
    rows, cols = lung.shape
    lung_rows, lung_cols = np.nonzero(lung.any(axis=1))[0], np.nonzero(lung.any(axis=0))[0]
    for _ in range(1000):
        row = int(rng.integers(lung_rows[0], lung_rows[-1] + 1))
        col = int(rng.integers(lung_cols[0], lung_cols[-1] + 1))
        if lung[row, col] < 0.5 or rng.random() > _zone_weight(an, g, row, col):
            continue
        half_width = rng.uniform(MIN_OPACITY_WIDTH, MAX_OPACITY_WIDTH) * cols / 2
        axes = (half_width, half_width * rng.uniform(0.7, 1.4))
        window, shape = _opacity_shape(rng, kind, (row, col), axes, (rows, cols))
        # Density grows with the air it replaces; none outside the lungs.
        density = shape * np.minimum(1.5 * lung[window], 1)
        box = _tight_box(density, window, (rows, cols))
        mostly_in_lung = density.max() >= 0.7 * shape.max()
        if mostly_in_lung and box[2] - box[0] >= 0.05 * cols and box[3] - box[1] >= 0.04 * rows:
            return Opacity(box=box, kind=kind), window, density
    raise RuntimeError("no room for an opacity in these lungs")


def _zone_weight(an: _Anatomy, g: _Grid, row: int, col: int) -> float:
    """Acceptance weight in (0, 1]: COVID-19 opacities are mostly peripheral and basal."""
    u, y = float(g.u[row, col]), float(g.y[row])
    side = 0 if u < 0 else 1
    medial = g.medial[side][row]
    # Measured against the widest cage, so the narrow apices do not count as periphery.
    peripheral = np.clip((abs(u) - medial) / max(an.cage - medial, 1e-3), 0, 1)
    lower = np.clip((y - an.apex_y) / (an.dome_y[side] - an.apex_y), 0, 1)
    return float((0.15 + 0.85 * lower * lower) * (0.25 + 0.75 * peripheral))


def _opacity_shape(rng: np.random.Generator, kind: str, centre: tuple[int, int],
                   axes: tuple[float, float], shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Added attenuation of one opacity, before lung masking, on a window around `centre`.

    axes: ellipse half-axes in pixels.  Ground glass: a faint cluster of soft blobs.
    Consolidation: dense, lobulated, with a sharp edge.
    """
    reach = 1.6 * max(axes)
    window = tuple(slice(max(0, int(c - reach)), min(n, int(c + reach) + 1)) for c, n in zip(centre, shape))
    dy = (np.arange(window[0].start, window[0].stop, dtype=np.float32) - centre[0])[:, None]
    dx = (np.arange(window[1].start, window[1].stop, dtype=np.float32) - centre[1])[None, :]
    angle = rng.uniform(0, np.pi)
    xn = (dx * math.cos(angle) + dy * math.sin(angle)) / axes[0]
    yn = (dy * math.cos(angle) - dx * math.sin(angle)) / axes[1]
    if kind == "ground_glass":
        return window, rng.uniform(0.25, 0.4) * _blob_cluster(rng, xn, yn, count=int(rng.integers(3, 7)))
    # Consolidation: a sharp-edged contour of a lumpy density, so the outline is irregular
    # and lobulated, slightly mottled inside.
    lumps = _blob_cluster(rng, xn, yn, count=int(rng.integers(6, 11)), sigma=(0.18, 0.32), spread=0.55)
    filled = _smoothstep((lumps - 0.1) / 0.2)
    mottle = 0.8 + 0.2 * _blob_cluster(rng, 2.5 * xn, 2.5 * yn, count=5)
    return window, rng.uniform(0.55, 0.9) * filled * mottle


def _blob_cluster(rng: np.random.Generator, xn: np.ndarray, yn: np.ndarray, count: int,
                  sigma: tuple[float, float] = (0.28, 0.45), spread: float = 0.35) -> np.ndarray:
    """Peak-normalised sum of `count` Gaussian blobs (widths drawn from `sigma`) centred
    within `spread` of the origin, in the opacity's unit-ellipse coordinates."""
    total = np.zeros_like(xn)
    for _ in range(count):
        ox, oy = rng.uniform(-spread, spread, size=2)
        sigma_i = rng.uniform(*sigma)
        total += rng.uniform(0.6, 1.0) * np.exp(-((xn - ox) ** 2 + (yn - oy) ** 2) * (0.5 / sigma_i ** 2))
    return total / total.max()


def _tight_box(density: np.ndarray, window: tuple[slice, slice],
               shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """xyxy image-pixel box (x2, y2 exclusive) around density > BOX_THRESHOLD * peak.

    density: the opacity on `window` of an image of `shape`; its thresholded region must
    end inside the window unless the window ends at the image edge (then it is clipped).
    """
    peak = float(density.max())
    assert peak > 0, "an opacity centred in the lung has density"
    inside = density > BOX_THRESHOLD * peak
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    for index, (axis, length) in enumerate(zip(window, shape)):
        hits = rows if index == 0 else cols
        cut_early = hits[0] == 0 and axis.start > 0
        cut_late = hits[-1] == axis.stop - axis.start - 1 and axis.stop < length
        assert not (cut_early or cut_late), "opacity window too small for its box"
    return (float(window[1].start + cols[0]), float(window[0].start + rows[0]),
            float(window[1].start + cols[-1] + 1), float(window[0].start + rows[-1] + 1))


def _expose(an: _Anatomy, g: _Grid, attenuation: np.ndarray, noise: np.ndarray,
            bits_stored: int) -> np.ndarray:
    """Attenuation -> noisy detector counts -> log -> detector blur -> tone curve -> uint16.

    Scatter adds a flat share of the mean primary fluence, which greys dense regions
    the way it does on real films.  The display range comes from the image's own
    log-signal percentiles, as CR/DX histogram analysis does, then per-image offsets.
    """
    gradient_x, gradient_y, vignetting = an.exposure
    fx, fy = g.x - 0.5, g.y - 0.5
    field = (1 + gradient_x * fx - vignetting * fx * fx)[None, :] + (gradient_y * fy - vignetting * fy * fy)[:, None]
    primary = field * np.exp(-attenuation)
    counts = an.photons * (primary + an.scatter * float(primary[::8, ::8].mean()))
    counts += np.sqrt(counts + an.electronic_noise ** 2) * noise
    log_signal = _blur(-np.log(np.maximum(counts, 0.5) * (1 / an.photons)))
    low, high = np.percentile(log_signal[::4, ::4], (1.0, 99.5))
    black_offset, white_offset, curvature = an.display
    black, white = low + black_offset * (high - low), high + white_offset * (high - low)
    shade = np.clip((log_signal - black) * (1 / (white - black)), 0, 1)
    shade += curvature * shade * (1 - shade)
    top = 2 ** bits_stored - 1
    lowest, highest = an.levels
    return np.rint((lowest + (highest - lowest) * shade) * top).astype(np.uint16)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (detector MTF), edges replicated."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) * (1 / 16)
