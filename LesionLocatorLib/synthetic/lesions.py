"""Synthetic lesions: an analytic shape and appearance, rendered with partial volume onto any image grid.

A lesion is a star-shaped body around its centre. Its radius in each direction is a mean radius perturbed by
broad lobes (von Mises-Fisher bumps on the sphere), optional spicules (very narrow bumps) and, for irregular
margins, a smooth random field. The *depth* of a point is (radius in its direction - its distance), in mm, positive
inside. The blend weight is a linear ramp of the depth, `w = clip(0.5 + depth / (2 h), 0, 1)` with half-width `h`,
averaged over sub-voxel samples (partial volume of thick voxels).

Ground truth, exactly: **the lesion mask is the set of voxels whose blended weight is >= 0.5**, and the image holds
`background * (1 - w) + values * w` there (plus the background-like noise added inside the lesion).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..image import ImageVolume
from .fields import FourierField, random_directions, random_fourier_field

SHAPE_KINDS = ("sphere", "ellipsoid", "lobulated", "spiculated", "irregular")
APPEARANCE_KINDS = ("solid", "rim", "necrotic")
SITES = ("lung", "liver", "soft_tissue", "brain", "bone")
MIN_RADIUS_FRACTION = 0.2  # lobes never pull the surface closer than this fraction of the mean radius
SUBSAMPLE_TARGET_MM = 1.5  # sub-voxel sample spacing used for partial volume
MAX_SUBSAMPLES_PER_AXIS = 3
_EVALUATION_CHUNK = 400_000  # sample points evaluated at once

Region = tuple[slice, slice, slice]
PointMap = Callable[[np.ndarray], np.ndarray]


@dataclass
class LesionShape:
    """Geometry of one lesion in physical LPS space (mm)."""

    center_lps: np.ndarray
    radius_mm: float
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: the lesion's axes in LPS
    axis_scales: np.ndarray = field(default_factory=lambda: np.ones(3))  # anisotropy, geometric mean 1
    lobe_directions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    lobe_amplitudes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # relative radius change
    lobe_concentrations: np.ndarray = field(default_factory=lambda: np.zeros(0))  # vMF kappa: small = broad
    spicule_directions: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    spicule_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))  # relative to the mean radius
    spicule_concentration: float = 250.0
    roughness: FourierField | None = None  # mm added to the depth (irregular margins)
    edge_half_width_mm: float = 0.5

    def __post_init__(self) -> None:
        self.center_lps = np.asarray(self.center_lps, dtype=float).reshape(3)
        if not self.radius_mm > 0:
            raise ValueError(f"A lesion needs a positive radius; got {self.radius_mm} mm.")
        if not self.edge_half_width_mm > 0:
            raise ValueError(f"The edge half-width must be positive; got {self.edge_half_width_mm} mm.")

    def _radius_in_direction(self, directions: np.ndarray) -> np.ndarray:
        relative = np.ones(directions.shape[0])
        if len(self.lobe_amplitudes):
            bumps = np.exp(self.lobe_concentrations * (directions @ self.lobe_directions.T - 1.0))
            relative += bumps @ self.lobe_amplitudes
        if len(self.spicule_lengths):
            spikes = np.exp(self.spicule_concentration * (directions @ self.spicule_directions.T - 1.0))
            relative += spikes @ self.spicule_lengths
        return self.radius_mm * np.maximum(relative, MIN_RADIUS_FRACTION)

    def depth_mm(self, points_lps: np.ndarray) -> np.ndarray:
        """Signed depth (mm, > 0 inside, 0 on the surface) of points (..., 3)."""
        points = np.asarray(points_lps, dtype=float)
        flat = points.reshape(-1, 3)
        offsets = flat - self.center_lps
        local = (offsets @ self.rotation) / self.axis_scales
        distance = np.linalg.norm(local, axis=1)
        directions = np.divide(local, distance[:, None], out=np.tile([1.0, 0.0, 0.0], (len(local), 1)),
                               where=distance[:, None] > 0)
        depth = self._radius_in_direction(directions) - distance
        if self.roughness is not None:
            depth += self.roughness(offsets)
        return depth.reshape(points.shape[:-1])

    def weight(self, points_lps: np.ndarray) -> np.ndarray:
        return weight_from_depth(self.depth_mm(points_lps), self.edge_half_width_mm)

    @property
    def extent_mm(self) -> float:
        """No point farther than this from the centre has a non-zero weight."""
        relative = 1.0 + np.sum(np.maximum(self.lobe_amplitudes, 0)) + np.sum(self.spicule_lengths)
        rough = self.roughness.amplitude_bound() if self.roughness is not None else 0.0
        return float(np.max(self.axis_scales) * (self.radius_mm * relative + rough + self.edge_half_width_mm))


def weight_from_depth(depth_mm: np.ndarray, half_width_mm: float) -> np.ndarray:
    """Linear edge ramp: 0.5 exactly on the surface, 1 deeper than `half_width_mm`, 0 farther outside."""
    return np.clip(0.5 + depth_mm / (2.0 * half_width_mm), 0.0, 1.0)


@dataclass
class LesionAppearance:
    """Intensity inside a lesion as a function of its depth, plus a smooth texture."""

    kind: str = "solid"
    core_value: float = 0.0
    rim_value: float = 0.0  # kind 'rim': value at the surface, decaying inwards to core_value
    rim_width_mm: float = 2.0
    necrotic_value: float = 0.0  # kind 'necrotic': value deeper than necrotic_depth_mm
    necrotic_depth_mm: float = 0.0
    texture: FourierField | None = None

    def __post_init__(self) -> None:
        if self.kind not in APPEARANCE_KINDS:
            raise ValueError(f"Unknown lesion appearance '{self.kind}'; use one of {APPEARANCE_KINDS}.")

    def values(self, depth_mm: np.ndarray, offsets_mm: np.ndarray) -> np.ndarray:
        """Intensity at points with the given depth and offset from the lesion centre (..., 3)."""
        inside = np.maximum(depth_mm, 0.0)
        values = np.full(depth_mm.shape, self.core_value, dtype=float)
        if self.kind == "rim":
            values += (self.rim_value - self.core_value) * np.exp(-inside / self.rim_width_mm)
        elif self.kind == "necrotic":
            necrotic = 1.0 / (1.0 + np.exp(-(inside - self.necrotic_depth_mm)))  # ~1 mm transition
            values = values * (1 - necrotic) + self.necrotic_value * necrotic
        if self.texture is not None:
            values += self.texture(offsets_mm)
        return values


@dataclass
class SyntheticLesion:
    lesion_id: int
    site: str
    shape: LesionShape
    appearance: LesionAppearance
    diameter_mm: float  # nominal: twice the mean radius
    shape_kind: str = "sphere"

    @property
    def center_lps(self) -> np.ndarray:
        return self.shape.center_lps


@dataclass
class LesionRender:
    """A lesion on one grid: its support region, the blend weight and the (weight-averaged) lesion intensity."""

    region: Region
    weight: np.ndarray  # float32, partial-volume fraction in [0, 1]
    values: np.ndarray  # float32, lesion intensity where weight > 0

    @property
    def mask(self) -> np.ndarray:
        """The ground truth: voxels whose blended weight is >= 0.5."""
        return self.weight >= 0.5


# --- rendering -------------------------------------------------------------------------------------------------
def subsample_counts(spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """Sub-voxel samples per axis so that samples are <= 1.5 mm apart (at most 3 per axis)."""
    return tuple(int(np.clip(np.ceil(s / SUBSAMPLE_TARGET_MM), 1, MAX_SUBSAMPLES_PER_AXIS)) for s in spacing_zyx)


def _subvoxel_offsets(counts_zyx: tuple[int, int, int]) -> np.ndarray:
    """(samples, 3) offsets in voxel units, centred in equal sub-cells of the voxel."""
    axes = [(np.arange(n) + 0.5) / n - 0.5 for n in counts_zyx]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def lesion_region(grid: ImageVolume, center_lps: np.ndarray, extent_mm: float, margin_voxels: int = 1) -> Region | None:
    """Voxels of `grid` whose centres may lie within `extent_mm` of `center_lps` (None if outside the grid)."""
    corners = np.array([[dx, dy, dz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)], float) * extent_mm
    index = grid.lps_to_index_zyx(center_lps + corners)
    return region_from_indices(index, grid.shape_zyx, margin_voxels)


def region_from_indices(index_zyx: np.ndarray, shape_zyx, margin_voxels: int = 1) -> Region | None:
    lo = np.floor(index_zyx.min(axis=0)).astype(int) - margin_voxels
    hi = np.ceil(index_zyx.max(axis=0)).astype(int) + 1 + margin_voxels
    lo, hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(shape_zyx))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _evaluate(lesion: SyntheticLesion, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Depth, weight and intensity of the lesion at points (N, 3)."""
    extent = lesion.shape.extent_mm
    depth = np.full(len(points), -extent)  # beyond the extent: outside, weight 0
    reachable = np.sum((points - lesion.center_lps) ** 2, axis=1) <= extent ** 2
    depth[reachable] = lesion.shape.depth_mm(points[reachable])
    weight = weight_from_depth(depth, lesion.shape.edge_half_width_mm)
    values = np.zeros_like(weight)
    inside = weight > 0
    if np.any(inside):
        values[inside] = lesion.appearance.values(depth[inside], points[inside] - lesion.center_lps)
    return depth, weight, values


def render_lesion(lesion: SyntheticLesion, grid: ImageVolume, region: Region | None = None,
                  pull: PointMap | None = None, supersample: bool = True) -> LesionRender | None:
    """Weight and intensity of `lesion` on `grid` within `region` (default: around its extent).

    `pull` maps the grid's physical points into the lesion's space (a follow-up's deformation); None = identity.
    Voxels near the surface are averaged over sub-voxel samples (partial volume); the others are evaluated at
    their centre. Returns None when the lesion misses the grid.
    """
    if region is None:
        region = lesion_region(grid, lesion.center_lps, lesion.shape.extent_mm)
        if region is None:
            return None
    to_lesion_space = (lambda points: points) if pull is None else pull
    starts = np.array([s.start for s in region], float)
    shape = tuple(s.stop - s.start for s in region)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    index += starts
    depth, weight, values = (np.empty(len(index)) for _ in range(3))
    for start in range(0, len(index), _EVALUATION_CHUNK):
        chunk = slice(start, start + _EVALUATION_CHUNK)
        points = to_lesion_space(grid.index_zyx_to_lps(index[chunk]))
        depth[chunk], weight[chunk], values[chunk] = _evaluate(lesion, points)
    counts = subsample_counts(grid.spacing_zyx) if supersample else (1, 1, 1)
    if max(counts) > 1:
        # partial volume only matters within a few voxel diagonals of the surface (3: margin for deformations)
        reach = lesion.shape.edge_half_width_mm + 3.0 * float(np.linalg.norm(grid.spacing_zyx))
        near = np.flatnonzero(np.abs(depth) < reach)
        offsets = _subvoxel_offsets(counts)
        per_chunk = max(1, _EVALUATION_CHUNK // len(offsets))
        for start in range(0, len(near), per_chunk):
            voxels = near[start:start + per_chunk]
            samples = (index[voxels][:, None, :] + offsets[None]).reshape(-1, 3)
            _, w, v = _evaluate(lesion, to_lesion_space(grid.index_zyx_to_lps(samples)))
            w, v = w.reshape(-1, len(offsets)), v.reshape(-1, len(offsets))
            weight[voxels] = w.mean(axis=1)
            values[voxels] = np.divide((w * v).sum(axis=1), w.sum(axis=1), out=np.zeros(len(voxels)),
                                       where=w.sum(axis=1) > 0)
    return LesionRender(region, weight.reshape(shape).astype(np.float32), values.reshape(shape).astype(np.float32))


def correlated_noise(rng: np.random.Generator, shape_zyx, std: float, smoothing_voxels: float = 0.7) -> np.ndarray:
    """Gaussian noise with a short correlation length (like reconstructed CT/MR noise), standard deviation `std`."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape_zyx), smoothing_voxels)
    return (noise * (std / max(float(noise.std()), 1e-12))).astype(np.float32)


def blend_lesion(array: np.ndarray, render: LesionRender, noise: np.ndarray | None = None) -> None:
    """In place: array = array * (1 - w) + (values + noise) * w inside the render's region."""
    local = array[render.region].astype(np.float32)
    values = render.values if noise is None else render.values + noise
    array[render.region] = local * (1 - render.weight) + values * render.weight


# --- random lesions --------------------------------------------------------------------------------------------
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_lesion_shape(rng: np.random.Generator, center_lps, diameter_mm: float, kind: str | None = None,
                        voxel_size_mm: float = 1.0) -> tuple[LesionShape, str]:
    """A random shape of the given kind (random kind if None) and nominal diameter."""
    kind = kind or str(rng.choice(SHAPE_KINDS, p=[0.15, 0.2, 0.3, 0.15, 0.2]))
    if kind not in SHAPE_KINDS:
        raise ValueError(f"Unknown lesion shape '{kind}'; use one of {SHAPE_KINDS}.")
    if kind == "spiculated" and diameter_mm < 10:
        kind = "lobulated"  # spicules are not resolvable on small lesions
    radius = diameter_mm / 2.0
    scales = np.ones(3)
    if kind != "sphere":
        scales = np.exp(rng.uniform(-0.25, 0.25, size=3)) if kind == "ellipsoid" else np.exp(rng.uniform(-0.12, 0.12, 3))
        scales /= np.prod(scales) ** (1 / 3)
    shape = LesionShape(
        center_lps=np.asarray(center_lps, float),
        radius_mm=radius,
        rotation=random_rotation(rng),
        axis_scales=scales,
        edge_half_width_mm=float(0.25 * voxel_size_mm + rng.uniform(0.2, 1.2)),
    )
    if kind in ("lobulated", "spiculated", "irregular"):
        lobes = int(rng.integers(3, 9))
        shape.lobe_directions = random_directions(rng, lobes)
        shape.lobe_amplitudes = rng.uniform(-0.2, 0.3, size=lobes)
        shape.lobe_concentrations = rng.uniform(2.0, 8.0, size=lobes)
    if kind == "spiculated":
        spicules = int(rng.integers(4, 13))
        shape.spicule_directions = random_directions(rng, spicules)
        shape.spicule_lengths = rng.uniform(0.3, 0.9, size=spicules)
        shape.spicule_concentration = float(rng.uniform(150, 400))
    if kind == "irregular":
        shape.roughness = random_fourier_field(rng, std=0.1 * radius, wavelength_range_mm=(0.6 * radius, 1.6 * radius))
    return shape, kind


def _ct_core_value(rng: np.random.Generator, site: str, background_value: float) -> float:
    if site == "lung":
        return float(rng.uniform(-20, 60))
    if site == "bone":
        return float(rng.uniform(20, 150)) if rng.random() < 0.6 else float(background_value + rng.uniform(300, 800))
    hypo_range, hyper_range = {"brain": ((10, 25), (20, 45))}.get(site, ((25, 80), (30, 100)))
    if rng.random() < 0.6:
        return float(background_value - rng.uniform(*hypo_range))
    return float(background_value + rng.uniform(*hyper_range))


def random_appearance(rng: np.random.Generator, site: str, modality: str, background_value: float,
                      radius_mm: float, kind: str | None = None) -> LesionAppearance:
    """Intensities by site (CT, in HU) or relative to the local background (MR)."""
    kind = kind or str(rng.choice(APPEARANCE_KINDS, p=[0.6, 0.2, 0.2]))
    if radius_mm < 4:
        kind = "solid"  # a rim or necrotic core needs room
    ct = modality.upper() == "CT"
    if ct:
        core = _ct_core_value(rng, site, background_value)
        texture_std = float(rng.uniform(3, 15))
    else:
        core = float(background_value * (rng.uniform(1.3, 2.2) if rng.random() < 0.7 else rng.uniform(0.3, 0.7)))
        texture_std = 0.05 * abs(background_value)
    appearance = LesionAppearance(kind=kind, core_value=core)
    if kind == "rim":
        base = background_value if not (ct and site == "lung") else 20.0
        appearance.rim_value = float(base + rng.uniform(25, 80)) if ct else float(background_value * rng.uniform(1.5, 2.5))
        appearance.core_value = float(base - rng.uniform(10, 40)) if ct else float(background_value * rng.uniform(0.6, 1.0))
        appearance.rim_width_mm = float(rng.uniform(1.0, 0.3 * radius_mm + 1.0))
    elif kind == "necrotic":
        if ct:
            appearance.necrotic_value = float(rng.uniform(-900, -600)) if site == "lung" else float(rng.uniform(0, 20))
        else:
            appearance.necrotic_value = float(background_value * rng.uniform(0.2, 0.6))
        appearance.necrotic_depth_mm = float(rng.uniform(0.3, 0.6) * radius_mm)
    appearance.texture = random_fourier_field(rng, texture_std, (max(2.0, 0.3 * radius_mm), max(4.0, radius_mm)))
    return appearance
