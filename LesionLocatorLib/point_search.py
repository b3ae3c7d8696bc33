"""Point search: a click answered by the box network on cubes of several sizes around it.

A weak point network (the bundled Lite model's) segments a blob of about its prompt ball's size whatever the lesion's
size, while its box network follows a box's extent. So for a click, the box network segments cubes of several sizes
centred on the click, the point network adds its own answer, and the candidate whose mask differs most from the
band just outside it (a contrast-to-noise ratio on the original image) is kept: a mask that stops at the lesion's
edge separates lesion from surroundings; one inside the lesion or spilling over it does not.

A model root asks for it in its manifest: `"point_search": {"box_sizes_mm": [8, 12, 18, 27, 40, 60]}`.
Indices are (z, y, x) voxels of the original image; sizes and spacings are in mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import CheckpointError
from .prompts import BoxPrompt, PointPrompt

MANIFEST_KEY = "point_search"
# 8-60 mm in steps of 1.5x: the bundled model's search, and what `lesionlocator train` asks for by default.
DEFAULT_BOX_SIZES_MM = (8.0, 12.0, 18.0, 27.0, 40.0, 60.0)
# The band outside a mask that stands for its surroundings, and the smoothing that keeps noise out of both means.
BAND_MM = 2.0
SMOOTHING_MM = 0.7


@dataclass(frozen=True)
class PointSearch:
    box_sizes_mm: tuple[float, ...]

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the model manifest") -> "PointSearch | None":
        """The search a model root's manifest asks for, or None when it asks for none."""
        entry = manifest.get(MANIFEST_KEY)
        if entry is None:
            return None
        sizes = entry.get("box_sizes_mm") if isinstance(entry, dict) else None
        if (not isinstance(sizes, list) or not sizes
                or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sizes)):
            raise CheckpointError(
                f"{where}: '{MANIFEST_KEY}' must be {{\"box_sizes_mm\": [positive sizes in mm, ...]}}; got {entry!r}. "
                f"Fix the entry or remove it to use the point network alone.")
        if "box" not in manifest.get("tasks", {}):
            raise CheckpointError(f"{where}: '{MANIFEST_KEY}' needs a 'box' task in 'tasks'.")
        return cls(tuple(float(s) for s in sizes))

    def manifest_entry(self) -> dict:
        return {"box_sizes_mm": list(self.box_sizes_mm)}

    def candidate_boxes(self, point: PointPrompt, spacing_zyx, shape_zyx, max_extent_zyx) -> list[BoxPrompt]:
        """Cubes of each size around the click, each at most `max_extent_zyx` voxels per axis."""
        return [cube_around_point(point.index_zyx, size, spacing_zyx, shape_zyx, max_extent_zyx)
                for size in self.box_sizes_mm]


def cube_around_point(point_zyx, size_mm: float, spacing_zyx, shape_zyx, max_extent_zyx=None) -> BoxPrompt:
    """A half-open voxel box about `size_mm` on each side, centred on the click and clipped to the image; at most
    `max_extent_zyx` voxels per axis when given (rounding adds up to 2 voxels to 2 * half)."""
    point = np.asarray(point_zyx, float)
    half = size_mm / 2 / np.asarray(spacing_zyx, float)
    if max_extent_zyx is not None:
        half = np.minimum(half, np.maximum((np.asarray(max_extent_zyx, float) - 2) / 2, 0))
    lo = np.maximum(np.round(point - half), 0)
    hi = np.minimum(np.round(point + half) + 1, shape_zyx)
    return BoxPrompt(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def boundary_contrast(image_zyx: np.ndarray, spacing_zyx, mask_zyx: np.ndarray, offset_zyx=(0, 0, 0)) -> float:
    """|mean inside - mean of a 2 mm band outside| / pooled standard deviation, on the lightly smoothed image.

    `mask_zyx` covers the image from `offset_zyx` on. An empty mask scores -inf."""
    mask = np.asarray(mask_zyx, bool)
    if not mask.any():
        return float("-inf")
    spacing = np.asarray(spacing_zyx, float)
    band = np.maximum(np.round(BAND_MM / spacing).astype(int), 1)
    margin = band + np.ceil(3 * SMOOTHING_MM / spacing).astype(int) + 1
    offset = np.asarray(offset_zyx, int)
    found = np.argwhere(mask) + offset
    lo = np.maximum(found.min(axis=0) - margin, 0)
    hi = np.minimum(found.max(axis=0) + margin + 1, image_zyx.shape)
    crop = np.zeros(tuple(hi - lo), bool)
    start, stop = np.maximum(lo, offset), np.minimum(hi, offset + mask.shape)
    crop[_slices(start - lo, stop - lo)] = mask[_slices(start - offset, stop - offset)]
    smoothed = ndimage.gaussian_filter(image_zyx[_slices(lo, hi)].astype(np.float32),
                                       SMOOTHING_MM / spacing)
    outside = ndimage.binary_dilation(crop, _ellipsoid(band)) & ~crop
    if not outside.any():
        return float("-inf")
    within, around = smoothed[crop], smoothed[outside]
    spread = np.sqrt(0.5 * (within.var() + around.var())) + 1e-6 * (np.abs(smoothed).mean() + 1e-12)
    return float(abs(within.mean() - around.mean()) / spread)


def _ellipsoid(radii_zyx: np.ndarray) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(-r, r + 1) for r in radii_zyx)]
    return (z / radii_zyx[0]) ** 2 + (y / radii_zyx[1]) ** 2 + (x / radii_zyx[2]) ** 2 <= 1.0


def _slices(lo, hi) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
