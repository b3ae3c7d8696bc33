"""Physical measurements of one lesion at one timepoint: volume, RECIST diameters, intensities.

Geometry is taken in physical (LPS) space, so anisotropic spacing and oblique directions are honoured.

How the diameters are measured and how accurate they are:
- The lesion surface is the marching-cubes iso-surface (level 0.5) of the binary mask, mapped to LPS mm.
  Its vertices lie half-way between inside and outside voxel centres, so every surface point is within
  half a voxel (along a voxel axis) of the true boundary of the voxelised object: a diameter is accurate
  to within one voxel (the largest spacing) of the true object, usually much better.
- RECIST 1.1 long axis: the longest diameter in the patient's axial plane (LPS z = const), not in the
  voxel grid's slice. The surface is cut with axial planes (at the voxel centres when a voxel axis is
  parallel to LPS z, so the measurement is made on an acquired slice; every half of the smallest spacing
  otherwise), and the plane whose cross-section has the longest diameter is kept.
- Short axis: the longest chord perpendicular to the long axis in that plane. Both are taken on the convex
  hull of the cross-section, as a reader's calliper would measure across a lobulated lesion.
- Largest short axis (a lymph node's RECIST diameter): over all the axial planes, the longest chord
  perpendicular to that plane's own long axis; a node is measured on the slice where it is thickest, which
  need not be the slice where it is longest.
- Parts (26-connected components of the mask) are a fragmented lesion: RECIST 1.1 adds the long axes of
  the fragments, so `parts_long_axis_sum_mm` measures each part on its own and sums them (equal to the long
  axis for a lesion in one piece). The long axis itself spans all parts, as drawn.
- Maximum 3D diameter: the farthest pair of points of the 3D convex hull of the surface.
- Volume is the voxel count times the voxel volume (exact for the mask).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cc3d
import numpy as np
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import marching_cubes

from .errors import LesionLocatorError
from .image import LPS_TO_RAS, ImageVolume

INTENSITY_UNITS = ("HU", "SUV", "unknown")
Point = tuple[float, float, float]
Segment = tuple[Point, Point]

# A vertex this close (mm) to a cutting plane belongs to the cross-section even if rounding puts its
# edges on one side only.
_PLANE_TOLERANCE_MM = 1e-6
# Long axes this close (mm) count as equally long; the longer short axis then decides.
_TIE_MM = 1e-6
# Cosine above which a voxel axis counts as parallel to LPS z (the grid's slices are then axial).
_PARALLEL_COSINE = 1.0 - 1e-6
# Rows per block when searching the farthest pair, bounding memory to block x n distances.
_PAIR_BLOCK = 512


class MeasurementError(LesionLocatorError, ValueError):
    """A lesion mask cannot be measured on the given image."""


@dataclass(frozen=True)
class LesionMeasurement:
    """One lesion at one timepoint. Lengths in mm, points in mm, volume in mL.

    `found` is False for an empty mask; all geometric values are then None and the volume 0.
    """

    found: bool
    intensity_unit: str = "unknown"
    voxel_count: int = 0
    volume_ml: float = 0.0
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    long_axis_lps: Segment | None = None
    short_axis_lps: Segment | None = None
    axial_plane_z_lps: float | None = None
    largest_short_axis_mm: float | None = None
    largest_short_axis_lps: Segment | None = None
    parts_long_axis_sum_mm: float | None = None
    max_diameter_3d_mm: float | None = None
    max_diameter_3d_lps: Segment | None = None
    centroid_lps: Point | None = None
    centroid_ras: Point | None = None
    intensity_mean: float | None = None
    intensity_min: float | None = None
    intensity_max: float | None = None
    n_components: int = 0

    @classmethod
    def not_found(cls, intensity_unit: str = "unknown") -> "LesionMeasurement":
        return cls(found=False, intensity_unit=intensity_unit)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists, None stays None)."""
        return asdict(self)


@dataclass(frozen=True)
class _AxialSection:
    plane_z_lps: float
    long_axis_mm: float
    short_axis_mm: float
    long_axis_xy: np.ndarray  # (2, 2) endpoints, LPS x and y
    short_axis_xy: np.ndarray  # (2, 2)


def measure_lesion(image: ImageVolume, mask: np.ndarray, intensity_unit: str = "unknown") -> LesionMeasurement:
    """Measure the lesion `mask` (non-zero voxels, (z, y, x) on `image`'s grid) in physical units."""
    lesion = _validated_lesion(image, mask, intensity_unit)
    voxel_count = int(np.count_nonzero(lesion))
    if voxel_count == 0:
        return LesionMeasurement.not_found(intensity_unit)

    low_zyx, high_zyx = _bounding_box(lesion)
    crop = lesion[tuple(slice(lo, hi) for lo, hi in zip(low_zyx, high_zyx))]
    surface = _surface_lps(image, crop, low_zyx)
    cuts = _axial_cuts(surface, _axial_plane_positions(image, surface.vertices_lps[:, 2]))
    section, widest = _longest_axial_section(cuts), _widest_axial_section(cuts)
    diameter_3d_mm, diameter_3d_ends = _max_diameter_3d(surface.vertices_lps)
    centroid_lps = image.index_zyx_to_lps(np.argwhere(lesion).mean(axis=0))
    values = image.array[lesion]
    parts, n_components = cc3d.connected_components(crop.astype(np.uint8), connectivity=26, return_N=True)
    parts_long_axis_sum_mm = (
        section.long_axis_mm if n_components == 1 else _parts_long_axis_sum(image, parts, low_zyx)
    )
    return LesionMeasurement(
        found=True,
        intensity_unit=intensity_unit,
        voxel_count=voxel_count,
        volume_ml=voxel_count * float(np.prod(image.spacing_xyz)) / 1000.0,
        long_axis_mm=section.long_axis_mm,
        short_axis_mm=section.short_axis_mm,
        long_axis_lps=_segment_lps(section.long_axis_xy, section.plane_z_lps),
        short_axis_lps=_segment_lps(section.short_axis_xy, section.plane_z_lps),
        axial_plane_z_lps=section.plane_z_lps,
        largest_short_axis_mm=widest.short_axis_mm,
        largest_short_axis_lps=_segment_lps(widest.short_axis_xy, widest.plane_z_lps),
        parts_long_axis_sum_mm=parts_long_axis_sum_mm,
        max_diameter_3d_mm=diameter_3d_mm,
        max_diameter_3d_lps=(_point(diameter_3d_ends[0]), _point(diameter_3d_ends[1])),
        centroid_lps=_point(centroid_lps),
        centroid_ras=_point(centroid_lps @ LPS_TO_RAS),
        intensity_mean=float(np.mean(values, dtype=np.float64)),
        intensity_min=float(values.min()),
        intensity_max=float(values.max()),
        n_components=int(n_components),
    )


def _validated_lesion(image: ImageVolume, mask: np.ndarray, intensity_unit: str) -> np.ndarray:
    if intensity_unit not in INTENSITY_UNITS:
        raise MeasurementError(
            f"Unknown intensity unit '{intensity_unit}'; use one of {', '.join(INTENSITY_UNITS)} "
            "(HU for CT, SUV for SUV-scaled PET, unknown otherwise)."
        )
    mask = np.asarray(mask)
    if mask.shape != image.shape_zyx:
        raise MeasurementError(
            f"The mask's shape {mask.shape} (z, y, x) differs from the image's {image.shape_zyx}; "
            "resample the mask onto the image grid before measuring."
        )
    return mask != 0


def _point(values) -> Point:
    return tuple(float(v) for v in values)


def _segment_lps(ends_xy: np.ndarray, plane_z_lps: float) -> Segment:
    return tuple(_point((x, y, plane_z_lps)) for x, y in ends_xy)


# --- surface -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Surface:
    """Marching-cubes surface in LPS mm; vertices and edges sorted by z so a plane cut reads only a thin band."""

    vertices_lps: np.ndarray  # (n, 3), sorted by z
    edge_low_lps: np.ndarray  # (m, 3) the lower end of each edge; edges sorted by its z
    edge_high_lps: np.ndarray  # (m, 3) the upper end
    max_edge_height: float

    def cross_section_xy(self, plane_z: float) -> np.ndarray:
        """LPS (x, y) of the points where the surface meets the plane z = plane_z."""
        low_z = self.edge_low_lps[:, 2]
        band = slice(*np.searchsorted(low_z, [plane_z - self.max_edge_height, plane_z]))
        low, high = self.edge_low_lps[band], self.edge_high_lps[band]
        low, high = low[high[:, 2] >= plane_z], high[high[:, 2] >= plane_z]  # low z < plane_z <= high z
        fraction = (plane_z - low[:, 2]) / (high[:, 2] - low[:, 2])
        crossings = low[:, :2] + fraction[:, None] * (high[:, :2] - low[:, :2])
        on_plane = slice(*np.searchsorted(self.vertices_lps[:, 2], plane_z + np.array([-1, 1]) * _PLANE_TOLERANCE_MM))
        return np.concatenate([crossings, self.vertices_lps[on_plane, :2]])


def _bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) start and stop (exclusive) of the non-zero voxels."""
    occupied = np.argwhere(mask)
    return occupied.min(axis=0), occupied.max(axis=0) + 1


def _surface_lps(image: ImageVolume, crop: np.ndarray, low_zyx: np.ndarray) -> _Surface:
    """Iso-surface (level 0.5) of a mask crop whose first voxel is `low_zyx` on `image`'s grid, in LPS mm."""
    # One empty voxel around the crop closes the surface even where the lesion touches the image border.
    padded = np.pad(crop, 1).astype(np.float32)
    vertices_zyx, faces, _, _ = marching_cubes(padded, level=0.5, allow_degenerate=False)
    vertices_lps = image.index_zyx_to_lps(vertices_zyx + low_zyx - 1)
    n = len(vertices_lps)
    pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1).astype(np.int64)
    keys = np.unique(pairs[:, 0] * n + pairs[:, 1])  # each edge is shared by two triangles: keep one
    start, end = vertices_lps[keys // n], vertices_lps[keys % n]
    start_is_low = (start[:, 2] <= end[:, 2])[:, None]
    low, high = np.where(start_is_low, start, end), np.where(start_is_low, end, start)
    order = np.argsort(low[:, 2], kind="stable")
    return _Surface(
        vertices_lps=vertices_lps[np.argsort(vertices_lps[:, 2], kind="stable")],
        edge_low_lps=low[order],
        edge_high_lps=high[order],
        max_edge_height=float((high[:, 2] - low[:, 2]).max(initial=0.0)),
    )


def _axial_plane_positions(image: ImageVolume, vertex_z_lps: np.ndarray) -> np.ndarray:
    """LPS z of the axial planes to cut: the grid's slice centres when its slices are axial."""
    z_low, z_high = float(vertex_z_lps.min()), float(vertex_z_lps.max())
    axis_xyz = _voxel_axis_along_lps_z(image.direction_lps)
    if axis_xyz is not None:
        step = image.direction_lps[2, axis_xyz] * image.spacing_xyz[axis_xyz]
        first, last = sorted(((z_low - image.origin_lps[2]) / step, (z_high - image.origin_lps[2]) / step))
        positions = image.origin_lps[2] + step * np.arange(np.ceil(first), np.floor(last) + 1)
    else:
        step = min(image.spacing_xyz) / 2.0
        positions = np.arange(z_low + step / 2.0, z_high, step)
    return positions if positions.size else np.array([(z_low + z_high) / 2.0])


def _voxel_axis_along_lps_z(direction_lps: np.ndarray) -> int | None:
    cosines = np.abs(direction_lps[2, :])
    axis = int(np.argmax(cosines))
    return axis if cosines[axis] >= _PARALLEL_COSINE else None


# --- axial (RECIST) diameters --------------------------------------------------------------------------------
_Cut = tuple[float, np.ndarray, np.ndarray, float]  # plane z, convex hull (x, y), long axis ends, long axis mm


def _axial_cuts(surface: _Surface, planes_z: np.ndarray) -> list[_Cut]:
    """The surface's cross-section with each axial plane that meets it, as a convex hull and its long axis."""
    cuts = []
    for plane_z in planes_z:
        points_xy = surface.cross_section_xy(float(plane_z))
        if len(points_xy):
            hull = _convex_polygon(points_xy)
            ends = _farthest_pair(hull)
            cuts.append((float(plane_z), hull, ends, float(np.linalg.norm(ends[1] - ends[0]))))
    return cuts


def _longest_axial_section(cuts: list[_Cut]) -> _AxialSection:
    """Among the axial cuts, the one with the longest diameter (ties: the longer short axis)."""
    longest = max(cut[3] for cut in cuts)
    # The short axis is needed only where the long axis is (or ties with) the longest one.
    sections = [_axial_section(*cut) for cut in cuts if cut[3] >= longest - _TIE_MM]
    return max(sections, key=lambda section: section.short_axis_mm)


def _widest_axial_section(cuts: list[_Cut]) -> _AxialSection:
    """Among the axial cuts, the one with the longest short axis (each perpendicular to its own long axis)."""
    widest = None
    # A cut's short axis is at most its long axis: longest cuts first, stop once no cut can be wider.
    for cut in sorted(cuts, key=lambda cut: -cut[3]):
        if widest is not None and cut[3] <= widest.short_axis_mm:
            break
        section = _axial_section(*cut)
        if widest is None or section.short_axis_mm > widest.short_axis_mm + _TIE_MM:
            widest = section
    return widest


def _parts_long_axis_sum(image: ImageVolume, parts: np.ndarray, low_zyx: np.ndarray) -> float:
    """Sum of the long axes of each labelled part (a crop starting at `low_zyx`), each measured on its own."""
    total = 0.0
    for label, box in enumerate(cc3d.statistics(parts)["bounding_boxes"]):
        if label == 0:  # the background
            continue
        part = parts[box] == label
        part_low_zyx = low_zyx + np.array([axis.start for axis in box])
        surface = _surface_lps(image, part, part_low_zyx)
        cuts = _axial_cuts(surface, _axial_plane_positions(image, surface.vertices_lps[:, 2]))
        total += _longest_axial_section(cuts).long_axis_mm
    return total


def _axial_section(plane_z: float, hull: np.ndarray, long_ends: np.ndarray, long_mm: float) -> _AxialSection:
    short_ends = _longest_perpendicular_chord(hull, long_ends) if long_mm > 0 else long_ends
    return _AxialSection(
        plane_z_lps=plane_z,
        long_axis_mm=long_mm,
        short_axis_mm=float(np.linalg.norm(short_ends[1] - short_ends[0])),
        long_axis_xy=long_ends,
        short_axis_xy=short_ends,
    )


def _convex_polygon(points_xy: np.ndarray) -> np.ndarray:
    """Convex hull vertices in counter-clockwise order; the points themselves if they are collinear."""
    try:
        return points_xy[ConvexHull(points_xy).vertices]
    except (QhullError, ValueError):  # fewer than 3 points, or all on one line
        return np.unique(points_xy, axis=0)


def _longest_perpendicular_chord(polygon: np.ndarray, long_ends: np.ndarray) -> np.ndarray:
    """Endpoints of the longest chord of the convex polygon perpendicular to the long axis.

    The chord length is a concave, piecewise linear function of the position along the long axis, so its
    maximum lies at the position of one of the polygon's vertices: only those positions are tried.
    """
    if len(polygon) < 3:
        return np.repeat(long_ends[:1], 2, axis=0)
    along = (long_ends[1] - long_ends[0]) / np.linalg.norm(long_ends[1] - long_ends[0])
    across = np.array([-along[1], along[0]])
    position = polygon @ along  # (n,)
    edge_start, edge_end = polygon, np.roll(polygon, -1, axis=0)
    pos_start, pos_end = position, np.roll(position, -1)
    best = np.repeat(long_ends[:1], 2, axis=0)
    for cut in position:
        spans = (np.minimum(pos_start, pos_end) <= cut) & (cut <= np.maximum(pos_start, pos_end))
        span_length = pos_end[spans] - pos_start[spans]
        fraction = np.divide(
            cut - pos_start[spans], span_length, out=np.zeros_like(span_length), where=span_length != 0
        )
        points = edge_start[spans] + fraction[:, None] * (edge_end[spans] - edge_start[spans])
        offsets = points @ across
        ends = points[[np.argmin(offsets), np.argmax(offsets)]]
        if np.ptp(offsets) > np.linalg.norm(best[1] - best[0]):
            best = ends
    return best


# --- 3D diameter ---------------------------------------------------------------------------------------------
def _max_diameter_3d(vertices_lps: np.ndarray) -> tuple[float, np.ndarray]:
    try:
        candidates = vertices_lps[ConvexHull(vertices_lps).vertices]
    except QhullError:  # a flat surface cannot happen for a closed one, but keep all points if it does
        candidates = vertices_lps
    ends = _farthest_pair(candidates)
    return float(np.linalg.norm(ends[1] - ends[0])), ends


def _farthest_pair(points: np.ndarray) -> np.ndarray:
    """The two points (2, d) farthest apart, searched in blocks to bound memory."""
    norms = (points**2).sum(axis=1)
    best_distance, best_pair = -1.0, (0, 0)
    for start in range(0, len(points), _PAIR_BLOCK):
        block = points[start : start + _PAIR_BLOCK]
        squared = norms[start : start + _PAIR_BLOCK, None] + norms[None, :] - 2.0 * block @ points.T
        row, col = np.unravel_index(int(np.argmax(squared)), squared.shape)
        if squared[row, col] > best_distance:
            best_distance, best_pair = float(squared[row, col]), (start + row, col)
    return points[list(best_pair)]
