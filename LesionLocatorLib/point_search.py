"""Point search: a click answered by the box network on cubes of several sizes around it.

A weak point network (the bundled Lite model's) segments a blob of about its prompt ball's size whatever the lesion's
size, while its box network follows a box's extent. So for a click, the box network segments cubes of several sizes
centred on the click, the point network adds its own answer, and one candidate is kept:
- by default the one whose mask differs most from the band just outside it (a contrast-to-noise ratio on the
  original image): a mask that stops at the lesion's edge separates lesion from surroundings; one inside the lesion
  or spilling over it does not;
- with a fitted `CandidateSelector` (`lesionlocator fit-point-search`), the one that a small network scores highest
  from each candidate's contrast, size, fit to its cube, confidence and agreement with the other candidates.

A model root asks for it in its manifest: `"point_search": {"box_sizes_mm": [8, 12, 18, 27, 40, 60]}`, plus
`"selector": {...}` once fitted. Indices are (z, y, x) voxels of the original image; sizes and spacings are in mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from .errors import CheckpointError
from .point_extent import ENTRY_KEY as EXTENT_KEY, PointExtent
from .prompts import BoxPrompt, PointPrompt, Prompt
from .tanh_layer import TanhLayer

MANIFEST_KEY = "point_search"
# 8-60 mm in steps of 1.5x: the bundled model's search, and what `lesionlocator train` asks for by default.
DEFAULT_BOX_SIZES_MM = (8.0, 12.0, 18.0, 27.0, 40.0, 60.0)
# The band outside a mask that stands for its surroundings, and the smoothing that keeps noise out of both means.
BAND_MM = 2.0
SMOOTHING_MM = 0.7
# What a candidate's features are, in the order of a fitted selector's inputs (see candidate_features).
FEATURES = ("contrast", "contrast_minus_best", "contrast_rank", "is_point_network", "log_diameter_mm",
            "log_diameter_over_cube", "cube_face_fill", "mean_probability_inside", "mean_probability_band",
            "dice_next_cube", "dice_previous_cube", "dice_point_network")
# Stands for the contrast of an empty mask (-inf) among the features.
EMPTY_CONTRAST = -1.0
# Foreground-minus-background logit outside a candidate's predicted region: background (the Segmenter's value too).
OUTSIDE_LOGIT = -10.0


@dataclass
class Candidate:
    """One answer to a click: the prompt that made it (the click itself or a cube) and its foreground-minus-background
    logits on `region` of the original grid (z, y, x); outside the region is background."""

    prompt: Prompt
    score: np.ndarray
    region: tuple[slice, ...]

    @property
    def offset_zyx(self) -> np.ndarray:
        return np.asarray([r.start or 0 for r in self.region], int)

    @property
    def mask(self) -> np.ndarray:
        return self.score > 0


class CandidateSelector(TanhLayer):
    """Scores candidates from their FEATURES with one hidden tanh layer; the highest score wins. Fitted on
    synthetic lesions of training backgrounds by `lesionlocator fit-point-search` (training/point_selector.py)."""

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(..., candidates, features) -> (..., candidates)"""
        return self.outputs(features)

    def manifest_entry(self) -> dict:
        return super().manifest_entry(FEATURES)

    @classmethod
    def from_entry(cls, entry, where: str) -> "CandidateSelector":
        return super().from_entry(entry, FEATURES, f"{where}: the point search's 'selector'",
                                  "Run `lesionlocator fit-point-search` again, or remove 'selector' to choose by "
                                  "contrast alone.")


@dataclass(frozen=True)
class PointSearch:
    box_sizes_mm: tuple[float, ...]
    selector: CandidateSelector | None = None
    extent: PointExtent | None = None

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the model manifest", root: Path | None = None,
                      with_extent: bool = True) -> "PointSearch | None":
        """The search a model root's manifest asks for, or None when it asks for none. An extent network's weights
        are read from `root`; `with_extent=False` leaves it out (clicks are then answered by the cubes alone)."""
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
        selector, extent = entry.get("selector"), entry.get(EXTENT_KEY) if with_extent else None
        if extent is not None and root is None:
            raise CheckpointError(f"{where}: the point search's '{EXTENT_KEY}' needs the model root to read its "
                                  "weights from.")
        return cls(tuple(float(s) for s in sizes),
                   None if selector is None else CandidateSelector.from_entry(selector, where),
                   None if extent is None else PointExtent.from_entry(extent, root, where))

    def manifest_entry(self) -> dict:
        entry: dict = {"box_sizes_mm": list(self.box_sizes_mm)}
        if self.selector is not None:
            entry["selector"] = self.selector.manifest_entry()
        if self.extent is not None:
            entry[EXTENT_KEY] = self.extent.manifest_entry()
        return entry

    def candidate_boxes(self, point: PointPrompt, spacing_zyx, shape_zyx, max_extent_zyx) -> list[BoxPrompt]:
        """Cubes of each size around the click, each at most `max_extent_zyx` voxels per axis."""
        return [cube_around_point(point.index_zyx, size, spacing_zyx, shape_zyx, max_extent_zyx)
                for size in self.box_sizes_mm]

    def choose(self, image_zyx: np.ndarray, spacing_zyx, candidates: Sequence[Candidate]) -> int:
        """The index of the kept candidate: the selector's best, or else the highest contrast (ties: the first,
        the point network's)."""
        if self.selector is not None:
            return int(np.argmax(self.selector.scores(candidate_features(image_zyx, spacing_zyx, candidates,
                                                                         self.box_sizes_mm))))
        contrasts = [boundary_contrast(image_zyx, spacing_zyx, c.mask, c.offset_zyx) for c in candidates]
        return int(np.argmax(contrasts))


def candidate_features(image_zyx: np.ndarray, spacing_zyx, candidates: Sequence[Candidate],
                       box_sizes_mm: Sequence[float]) -> np.ndarray:
    """(candidates, FEATURES): candidates[0] is the point network's answer, the others the cubes of `box_sizes_mm`
    in that order. Sizes are in mm; the 'band' is the BAND_MM shell just outside a mask."""
    if len(candidates) != len(box_sizes_mm) + 1:
        raise ValueError(f"expected the point network's answer and {len(box_sizes_mm)} cubes, got {len(candidates)}")
    spacing = np.asarray(spacing_zyx, float)
    masks = [(c.mask, c.offset_zyx) for c in candidates]
    around = [_surroundings(m, o, spacing, image_zyx.shape) if m.any() else None for m, o in masks]
    contrasts = np.asarray([_contrast(image_zyx, spacing, a) if a is not None else -np.inf for a in around])
    contrasts = np.where(np.isfinite(contrasts), contrasts, EMPTY_CONTRAST)
    ranks = (-contrasts).argsort(kind="stable").argsort()
    rows = []
    for k, candidate in enumerate(candidates):
        mask, offset = masks[k]
        diameter = (6 * mask.sum() * np.prod(spacing) / np.pi) ** (1 / 3)
        inside, band = _mean_probabilities(candidate, around[k])
        is_cube = k > 0
        rows.append([
            contrasts[k], contrasts[k] - contrasts.max(), ranks[k], float(not is_cube), np.log1p(diameter),
            np.log((1 + diameter) / box_sizes_mm[k - 1]) if is_cube else 0.0,
            _face_fill(mask, offset, candidate.prompt) if is_cube else 0.0,
            inside, band,
            _dice(*masks[k], *masks[k + 1]) if 0 < k < len(candidates) - 1 else 0.0,
            _dice(*masks[k], *masks[k - 1]) if k > 1 else 0.0,
            _dice(*masks[k], *masks[0]) if is_cube else 1.0,
        ])
    return np.asarray(rows, float)


def _mean_probabilities(candidate: Candidate, surroundings) -> tuple[float, float]:
    """Mean foreground probability inside the mask and in the band just outside it (0, 0 for an empty mask)."""
    if surroundings is None:
        return 0.0, 0.0
    lo, hi, inside, band = surroundings
    probability = sigmoid(crop_placed(candidate.score.astype(np.float32), candidate.offset_zyx, lo, hi, OUTSIDE_LOGIT))
    return float(probability[inside].mean()), float(probability[band].mean()) if band.any() else 0.0


def _face_fill(mask: np.ndarray, offset_zyx: np.ndarray, cube: BoxPrompt) -> float:
    """The share of the cube's outermost voxel layer that the mask covers: high when the lesion is larger."""
    lo = np.floor(np.asarray(cube.lo_zyx)).astype(int)
    hi = np.ceil(np.asarray(cube.hi_zyx)).astype(int)
    inside = crop_placed(mask, offset_zyx, lo, hi)
    face = np.ones(inside.shape, bool)
    face[tuple(slice(1, -1) if n > 2 else slice(0, 0) for n in inside.shape)] = False
    return float(inside[face].mean()) if face.any() else 0.0


def _dice(mask_a: np.ndarray, offset_a: np.ndarray, mask_b: np.ndarray, offset_b: np.ndarray) -> float:
    """Dice of two masks placed at their offsets on one grid (0 when both are empty)."""
    total = int(mask_a.sum()) + int(mask_b.sum())
    if total == 0:
        return 0.0
    lo, hi = np.maximum(offset_a, offset_b), np.minimum(offset_a + mask_a.shape, offset_b + mask_b.shape)
    if np.any(hi <= lo):
        return 0.0
    both = crop_placed(mask_a, offset_a, lo, hi) & crop_placed(mask_b, offset_b, lo, hi)
    return 2.0 * int(both.sum()) / total


def crop_placed(values: np.ndarray, offset_zyx: np.ndarray, lo, hi, fill=False) -> np.ndarray:
    """The part [lo, hi) (z, y, x voxels) of the grid of an array placed at `offset_zyx`; `fill` where the array
    does not reach."""
    lo, hi = np.asarray(lo, int), np.asarray(hi, int)
    out = np.full(tuple(np.maximum(hi - lo, 0)), fill, values.dtype)
    start, stop = np.maximum(lo, offset_zyx), np.minimum(hi, offset_zyx + values.shape)
    if np.all(stop > start):
        out[slices_between(start - lo, stop - lo)] = values[slices_between(start - offset_zyx, stop - offset_zyx)]
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Foreground probability (float32) from foreground-minus-background logits."""
    return (1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))).astype(np.float32)


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
    return _contrast(image_zyx, spacing, _surroundings(mask, np.asarray(offset_zyx, int), spacing, image_zyx.shape))


def _contrast(image_zyx: np.ndarray, spacing: np.ndarray, surroundings) -> float:
    lo, hi, crop, outside = surroundings
    if not outside.any():
        return float("-inf")
    smoothed = ndimage.gaussian_filter(image_zyx[slices_between(lo, hi)].astype(np.float32), SMOOTHING_MM / spacing)
    within, around = smoothed[crop], smoothed[outside]
    spread = np.sqrt(0.5 * (within.var() + around.var())) + 1e-6 * (np.abs(smoothed).mean() + 1e-12)
    return float(abs(within.mean() - around.mean()) / spread)


def _surroundings(mask: np.ndarray, offset_zyx: np.ndarray, spacing: np.ndarray, image_shape):
    """A crop [lo, hi) of the image grid around a non-empty mask placed at `offset_zyx`, wide enough for the BAND_MM
    band just outside the mask and what smoothing the band sees (+1 voxel), within the image: the mask on it, and
    the band."""
    band = np.maximum(np.round(BAND_MM / spacing).astype(int), 1)
    margin = band + np.ceil(3 * SMOOTHING_MM / spacing).astype(int) + 1
    found = np.argwhere(mask)
    lo = np.maximum(found.min(axis=0) + offset_zyx - margin, 0)
    hi = np.minimum(found.max(axis=0) + offset_zyx + margin + 1, image_shape)
    crop = crop_placed(mask, offset_zyx, lo, hi)
    return lo, hi, crop, ndimage.binary_dilation(crop, _ellipsoid(band)) & ~crop


def _ellipsoid(radii_zyx: np.ndarray) -> np.ndarray:
    z, y, x = np.ogrid[tuple(slice(-r, r + 1) for r in radii_zyx)]
    return (z / radii_zyx[0]) ** 2 + (y / radii_zyx[1]) ** 2 + (x / radii_zyx[2]) ** 2 <= 1.0


def slices_between(lo, hi) -> tuple[slice, ...]:
    """The half-open region [lo, hi) as slices."""
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
