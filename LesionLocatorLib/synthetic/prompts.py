"""Prompt simulation, matching what users give at inference. All indices are voxel (z, y, x) of the mask's grid.

- point: a voxel anywhere in the lesion's core (not only its centre),
- box: the mask's half-open bounding box with each face moved by a few voxels (inwards: at most 1/4 extent),
- previous mask: the lesion as registration would bring it from an earlier scan: rescaled (growth), smoothly
  deformed, shifted, eroded or dilated.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .fields import random_fourier_field

CORE_DEPTH_FRACTION = 0.5  # the core: voxels at least this fraction of the deepest voxel's depth inside


def _require_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or not np.any(mask):
        raise ValueError("Prompt simulation needs a non-empty 3D mask (z, y, x).")
    return mask


def lesion_core(mask: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), depth_fraction: float = CORE_DEPTH_FRACTION) -> np.ndarray:
    """Voxels whose distance to the lesion border (mm) is >= depth_fraction x the largest such distance."""
    mask = _require_mask(mask)
    bbox = bounding_box(mask)
    region = tuple(slice(max(lo - 1, 0), hi + 1) for lo, hi in zip(*bbox))
    depth = ndimage.distance_transform_edt(np.pad(mask[region], 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    core = np.zeros_like(mask)
    core[region] = depth >= depth_fraction * depth.max()
    return core


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Half-open bounding box (lo, hi) of a non-empty mask."""
    coords = np.argwhere(_require_mask(mask))
    return tuple(int(v) for v in coords.min(axis=0)), tuple(int(v) for v in coords.max(axis=0) + 1)


def sample_point_prompt(mask: np.ndarray, rng: np.random.Generator, spacing_zyx=(1.0, 1.0, 1.0),
                        depth_fraction: float = CORE_DEPTH_FRACTION) -> tuple[int, int, int]:
    """A random voxel of the lesion core (uniform over the core)."""
    core = np.argwhere(lesion_core(mask, spacing_zyx, depth_fraction))
    return tuple(int(v) for v in core[rng.integers(len(core))])


def jittered_box(mask: np.ndarray, rng: np.random.Generator, max_jitter_voxels: int = 3
                 ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The mask's half-open bounding box, each face moved independently by up to `max_jitter_voxels`: outwards
    freely, inwards by at most a quarter of the lesion's extent (a user's box never cuts away most of a small
    lesion). Clipped to the grid, never empty."""
    lo, hi = bounding_box(mask)
    return jitter_box_faces(lo, hi, mask.shape, rng, max_jitter_voxels)


def jitter_box_faces(lo_zyx, hi_zyx, shape_zyx, rng: np.random.Generator, max_jitter_voxels: int
                     ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """`jittered_box` for a given half-open box on a grid of `shape_zyx`."""
    lo, hi, shape = (np.asarray(v, int) for v in (lo_zyx, hi_zyx, shape_zyx))
    inward = np.minimum(max_jitter_voxels, (hi - lo - 1) // 4)
    lo = np.clip(lo + rng.integers(-max_jitter_voxels, inward + 1), 0, shape - 1)
    hi = np.clip(hi - rng.integers(-max_jitter_voxels, inward + 1), 1, shape)
    hi = np.maximum(hi, lo + 1)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def simulate_previous_mask(mask: np.ndarray, rng: np.random.Generator, spacing_zyx=(1.0, 1.0, 1.0),
                           scale_range: tuple[float, float] = (0.75, 1.3), max_shift_voxels: float = 3.0,
                           deformation_mm: float = 2.0, max_morphology_voxels: int = 1) -> np.ndarray:
    """A previous-timepoint mask after registration: the lesion rescaled about its centroid (it grew or shrank
    since), smoothly deformed by at most `deformation_mm`, shifted (registration error) and eroded/dilated.
    Never empty: if erosion wipes it out, the mask before erosion is returned."""
    mask = _require_mask(mask)
    spacing = np.asarray(spacing_zyx, float)
    scale = rng.uniform(*scale_range)
    shift = rng.uniform(-max_shift_voxels, max_shift_voxels, size=3)
    lo, hi = (np.asarray(b) for b in bounding_box(mask))
    reach = np.ceil((hi - lo) * max(scale, 1.0) / 2 + max_shift_voxels + deformation_mm / spacing + 2).astype(int)
    centroid = np.argwhere(mask).mean(axis=0)
    start = np.maximum(np.floor(centroid - reach).astype(int), 0)
    stop = np.minimum(np.ceil(centroid + reach).astype(int) + 1, mask.shape)
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=float) for a, b in zip(start, stop)], indexing="ij"), axis=-1)
    # output voxel -> source voxel: undo the shift and the scaling, then a smooth wobble (in mm -> voxels)
    source = centroid + (grid - shift - centroid) / scale
    wobble = random_fourier_field(rng, 1.0, (10.0, 40.0), modes=6, channels=3)
    wobble = wobble.scaled(deformation_mm / wobble.amplitude_bound())  # |wobble| <= deformation_mm everywhere
    source = source + wobble(grid * spacing) / spacing
    warped = ndimage.map_coordinates(mask.astype(np.float32), source.reshape(-1, 3).T, order=1, cval=0.0)
    rescaled = warped.reshape(grid.shape[:3]) >= 0.5
    steps = int(rng.integers(-max_morphology_voxels, max_morphology_voxels + 1))
    if steps > 0:
        morphed = ndimage.binary_dilation(rescaled, iterations=steps)
    elif steps < 0:
        morphed = ndimage.binary_erosion(rescaled, iterations=-steps)
    else:
        morphed = rescaled
    previous = np.zeros_like(mask)
    for candidate in (morphed, rescaled):
        if np.any(candidate):
            previous[tuple(slice(a, b) for a, b in zip(start, stop))] = candidate
            return previous
    return mask.copy()  # a lesion of a voxel or two can vanish when shrunk: keep it as it is
