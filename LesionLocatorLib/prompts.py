"""Prompts: what the user gives (point, box, mask) and the dense prompt channel the network sees.

User prompts are in voxel indices of the ORIGINAL image, (z, y, x) order (the official JSON convention), or are made
from physical points with `from_physical`. In preprocessed space, a point becomes a ball of radius 5 voxels
(skimage `ball(5, strict_radius=False)`, 739 voxels) and a box a filled box widened by one voxel on each side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import cc3d
import numpy as np
import SimpleITK as sitk
from skimage.morphology import ball

from .errors import PromptError
from .image import ImageVolume, resampled_onto

POINT_BALL_RADIUS = 5
BOX_MARGIN_VOXELS = 1


@dataclass(frozen=True)
class PointPrompt:
    """A click at continuous voxel indices (z, y, x) of the original image."""

    index_zyx: tuple[float, float, float]

    @classmethod
    def from_physical(cls, image: ImageVolume, point, space: str = "LPS") -> "PointPrompt":
        return cls(tuple(float(v) for v in _physical_to_index_zyx(image, [point], space)[0]))


@dataclass(frozen=True)
class BoxPrompt:
    """A half-open voxel box [lo, hi) per axis, (z, y, x) order, of the original image."""

    lo_zyx: tuple[float, float, float]
    hi_zyx: tuple[float, float, float]

    @classmethod
    def from_physical(cls, image: ImageVolume, corner_a, corner_b, space: str = "LPS") -> "BoxPrompt":
        """The voxel box covering an axis-aligned physical box (any direction matrix): all 8 corners mapped."""
        a, b = np.asarray(corner_a, float), np.asarray(corner_b, float)
        corners = np.array([[(a, b)[i][0], (a, b)[j][1], (a, b)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        index = _physical_to_index_zyx(image, corners, space)
        # the voxels whose centres lie inside the physical box (tolerance for corners placed on centres)
        lo = np.ceil(index.min(axis=0) - 1e-4)
        hi = np.floor(index.max(axis=0) + 1e-4) + 1
        return cls(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


@dataclass(frozen=True, eq=False)
class MaskPrompt:
    """A binary mask of one lesion on the original image grid (z, y, x)."""

    mask: np.ndarray
    from_instance_map: bool = False  # one id of a lesion instance map (the official tracker treats those differently)


Prompt = Union[PointPrompt, BoxPrompt, MaskPrompt]


def prompt_kind(prompt: Prompt) -> str:
    """'point', 'box' or 'mask': the prompt kinds of the official JSON and of `-t`."""
    if isinstance(prompt, PointPrompt):
        return "point"
    return "box" if isinstance(prompt, BoxPrompt) else "mask"


def _physical_to_index_zyx(image: ImageVolume, points, space: str) -> np.ndarray:
    space = space.upper()
    if space == "LPS":
        return image.lps_to_index_zyx(points)
    if space == "RAS":
        return image.ras_to_index_zyx(points)
    raise PromptError(f"Unknown coordinate space '{space}'; use 'LPS' or 'RAS'.")


# --- validation -----------------------------------------------------------------------------------------------
AXES_ZYX = ("z", "y", "x")


def plain_numbers(values) -> str:
    """Coordinates as a reader writes them, e.g. (5, 10.5, 3): not NumPy's reprs (np.float64(5.0))."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def validate_prompt(prompt: Prompt, shape_zyx: tuple[int, int, int]) -> Prompt:
    """Check a prompt against the image; a box partly outside is clipped. Raises PromptError."""
    shape = np.asarray(shape_zyx, float)
    if isinstance(prompt, PointPrompt):
        index = np.asarray(prompt.index_zyx, float)
        if index.shape != (3,) or not np.all(np.isfinite(index)):
            raise PromptError(f"A point needs 3 finite coordinates (z, y, x); got {plain_numbers(np.ravel(index))}.")
        if np.any(index < -0.5) or np.any(index > shape - 0.5):
            raise PromptError(
                f"Point (z, y, x) = {plain_numbers(index)} lies outside the image "
                f"(shape {tuple(shape_zyx)}). Place the point on the lesion inside the scan."
            )
        return prompt
    if isinstance(prompt, BoxPrompt):
        lo, hi = np.asarray(prompt.lo_zyx, float), np.asarray(prompt.hi_zyx, float)
        if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise PromptError(f"A box needs 3 finite lower and 3 upper bounds (z, y, x); got {plain_numbers(np.ravel(lo))}, "
                              f"{plain_numbers(np.ravel(hi))}.")
        box = f"Box (z, y, x) {plain_numbers(lo)}..{plain_numbers(hi)}"
        if np.any(hi < lo):
            axes = ", ".join(a for a, inverted in zip(AXES_ZYX, hi < lo) if inverted)
            raise PromptError(f"{box} is inverted on {axes}: its lower bound is above its upper bound. "
                              "Give [zmin, zmax, ymin, ymax, xmin, xmax] with min < max.")
        if np.any(hi == lo):
            axes = ", ".join(a for a, empty in zip(AXES_ZYX, hi == lo) if empty)
            raise PromptError(f"{box} has zero width on {axes} (boxes are half-open: max is one past the last "
                              "voxel). Make max larger than min.")
        clipped_lo, clipped_hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
        if np.any(clipped_hi <= clipped_lo):
            raise PromptError(f"{box} lies outside the image (shape {tuple(shape_zyx)}). Draw the box on the lesion "
                              "inside the scan.")
        return BoxPrompt(tuple(clipped_lo), tuple(clipped_hi))
    if isinstance(prompt, MaskPrompt):
        if tuple(prompt.mask.shape) != tuple(shape_zyx):
            raise PromptError(f"Mask prompt shape {prompt.mask.shape} differs from the image shape {tuple(shape_zyx)}.")
        if not np.any(prompt.mask):
            raise PromptError("The mask prompt is empty: draw or select at least one voxel of the lesion.")
        return prompt
    raise PromptError(f"Unsupported prompt type {type(prompt).__name__}; use PointPrompt, BoxPrompt or MaskPrompt.")


# --- reading prompts --------------------------------------------------------------------------------------------
def _numbers(values, count: int, what: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise PromptError(f"A {what} needs {count} values; got {values!r}.")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise PromptError(f"A {what} needs numbers (or numeric strings); got {values!r}.") from error


def parse_prompt_entry(entry) -> Prompt:
    """One lesion of the official JSON: {"point": [z, y, x]} or {"box": [z0, z1, y0, y1, x0, x1]}."""
    if not isinstance(entry, dict) or not ({"point", "box"} & set(entry)):
        raise PromptError(f"Each lesion needs a 'point' or a 'box' entry; got {entry!r}.")
    if {"point", "box"} <= set(entry):
        raise PromptError("The entry has both a 'point' and a 'box': keep one, or give the other its own lesion id.")
    if "point" in entry:
        return PointPrompt(tuple(_numbers(entry["point"], 3, "point [z, y, x]")))
    z0, z1, y0, y1, x0, x1 = _numbers(entry["box"], 6, "box [zmin, zmax, ymin, ymax, xmin, xmax]")
    return BoxPrompt((z0, y0, x0), (z1, y1, x1))


def _unique_keys(pairs: list) -> dict:
    """JSON object hook: json.loads keeps only the last of two equal keys, and two entries for one lesion must not
    lose one silently."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise PromptError(f"the key(s) {', '.join(repeated)} appear more than once")
    return dict(pairs)


def _lesion_id(path: Path, key: str) -> int:
    try:
        lesion_id = int(key)
    except ValueError as error:
        raise PromptError(f"{path}: lesion ids must be integers; got '{key}'.") from error
    if lesion_id < 1:
        raise PromptError(f"{path}: lesion ids must be 1 or more (0 is the background); got '{key}'.")
    return lesion_id


def load_prompt_json(path: str | Path) -> tuple[dict[int, Prompt], dict[int, str]]:
    """Prompts of the official JSON format, several lesions; unusable lesions go to the error dict. A file whose ids
    are not positive integers, or name one lesion twice ("1" and "01"), is refused."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except FileNotFoundError as error:
        raise PromptError(f"Prompt file not found: {path}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PromptError(f"Prompt file {path} is not valid JSON ({error}).") from error
    except PromptError as error:
        raise PromptError(f"{path}: {error}; give each lesion one entry.") from error
    if not isinstance(content, dict):
        raise PromptError(f'{path}: expected {{"<lesion id>": {{"point": [z, y, x]}}, ...}}.')
    prompts: dict[int, Prompt] = {}
    errors: dict[int, str] = {}
    keys: dict[int, str] = {}
    for key, entry in content.items():
        lesion_id = _lesion_id(path, key)
        if lesion_id in keys:
            raise PromptError(f"{path}: the ids '{keys[lesion_id]}' and '{key}' both name lesion {lesion_id}; give "
                              "each lesion one entry.")
        keys[lesion_id] = key
        try:
            prompts[lesion_id] = parse_prompt_entry(entry)
        except PromptError as error:
            errors[lesion_id] = str(error)
    return prompts, errors


def lesion_ids_in_mask(labels_zyx: np.ndarray) -> np.ndarray:
    ids = np.unique(labels_zyx)
    return ids[ids > 0]


def _integer_labels(labels_zyx: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels_zyx)
    if labels.dtype.kind == "f":
        if not np.all(np.mod(labels, 1) == 0):
            raise PromptError("A lesion mask must hold integer ids, not fractional values.")
        labels = labels.astype(np.int64)
    if np.any(labels < 0):
        raise PromptError("A lesion mask must not hold negative ids.")
    return labels


def split_instance_mask(labels_zyx: np.ndarray, binary: bool | None = None) -> dict[int, np.ndarray]:
    """Lesion masks from an instance map: one lesion per id (gaps and ids > 255 kept). A binary mask (a single
    non-zero value: 0/1, 0/255...; `binary` None decides from the labels) is split into its connected components,
    numbered 1..N."""
    labels = _integer_labels(labels_zyx)
    ids = lesion_ids_in_mask(labels)
    if ids.size == 0:
        raise PromptError("The lesion mask is empty: it labels no lesion.")
    if (ids.size == 1) if binary is None else binary:
        components = cc3d.connected_components(labels > 0, connectivity=26)
        return {int(i): components == i for i in lesion_ids_in_mask(components)}
    return {int(i): labels == i for i in ids}


def resample_labels(labels: ImageVolume, image: ImageVolume) -> np.ndarray:
    """A label image's values on `image`'s voxel grid: nearest neighbour in physical space, 0 outside it."""
    return resampled_onto(labels.to_sitk(), image, sitk.sitkNearestNeighbor)


def grid_difference(labels: ImageVolume, image: ImageVolume) -> str:
    """What differs between two grids, as a reader checks it (the mask's value first)."""
    checks = (("shape (z, y, x)", labels.shape_zyx, image.shape_zyx), ("spacing (x, y, z)", labels.spacing_xyz,
              image.spacing_xyz), ("origin (LPS)", labels.origin_lps, image.origin_lps),
              ("direction", labels.direction_lps.ravel(), image.direction_lps.ravel()))
    return ", ".join(f"{name} {plain_numbers(mine)} vs {plain_numbers(theirs)}" for name, mine, theirs in checks
                     if not np.allclose(mine, theirs, rtol=0, atol=1e-4)) or "geometry within rounding"


def lesions_from_label_image(labels: ImageVolume, image: ImageVolume,
                             name: str) -> tuple[dict[int, np.ndarray], dict[int, str], str]:
    """Lesion masks on `image`'s grid from an instance map or binary mask file, errors for lesions of an instance
    map that lie wholly outside the image, and a note when the file was on another grid. Such a file is resampled
    (never read voxel by voxel: a mask of the same shape but another spacing, origin or direction lies elsewhere);
    one that labels nothing inside the image is refused."""
    if labels.same_grid(image):
        return split_instance_mask(labels.array), {}, ""
    labels = labels.with_array(_integer_labels(labels.array))
    ids = lesion_ids_in_mask(labels.array)
    if ids.size == 0:
        raise PromptError(f"The lesion mask {name} is empty: it labels no lesion.")
    resampled = resample_labels(labels, image)
    if not resampled.any():
        raise PromptError(f"The lesion mask {name} does not overlap the image: none of its lesion voxels lies inside "
                          f"it ({grid_difference(labels, image)}). Give a mask drawn on this image.")
    masks = split_instance_mask(resampled, binary=ids.size == 1)
    lost = [int(i) for i in ids if ids.size > 1 and i not in masks]
    errors = {i: f"lesion {i} of {name} lies outside the image" for i in lost}
    note = (f"{name} is not on the image's grid ({grid_difference(labels, image)}): resampled onto it (nearest "
            "neighbour, in physical space).")
    return masks, errors, note


# --- dense prompts in preprocessed space ----------------------------------------------------------------------
def point_to_preprocessed(index_zyx, crop_start_zyx, crop_shape_zyx, scale_zyx, preprocessed_shape) -> np.ndarray:
    """Original (z, y, x) -> preprocessed voxel: crop offset subtracted once, scaled by the shape ratio, rounded
    and clipped (as upstream LesionLocator after its fix a6dd658)."""
    shifted = np.minimum(np.asarray(crop_shape_zyx), np.maximum(0, np.asarray(index_zyx, float) - crop_start_zyx))
    return np.clip(np.round(shifted * scale_zyx), 0, np.asarray(preprocessed_shape) - 1).astype(int)


def box_to_preprocessed(lo_zyx, hi_zyx, crop_start_zyx, scale_zyx, preprocessed_shape) -> tuple[np.ndarray, np.ndarray]:
    """Half-open original box -> half-open preprocessed box: floor/ceil after scaling, one voxel of margin."""
    lo = np.floor((np.asarray(lo_zyx, float) - crop_start_zyx) * scale_zyx) - BOX_MARGIN_VOXELS
    hi = np.ceil((np.asarray(hi_zyx, float) - crop_start_zyx) * scale_zyx) + BOX_MARGIN_VOXELS
    shape = np.asarray(preprocessed_shape)
    return np.clip(lo, 0, shape).astype(int), np.clip(hi, 0, shape).astype(int)


def dense_point(center_zyx, shape_zyx) -> np.ndarray:
    """A ball of radius 5 voxels around `center_zyx`, clipped at the image border."""
    dense = np.zeros(shape_zyx, dtype=np.float32)
    kernel = ball(POINT_BALL_RADIUS, strict_radius=False).astype(np.float32)
    center = np.asarray(center_zyx, int)
    lo = center - POINT_BALL_RADIUS
    hi = center + POINT_BALL_RADIUS + 1
    target = tuple(slice(max(l, 0), min(h, s)) for l, h, s in zip(lo, hi, shape_zyx))
    source = tuple(slice(t.start - l, t.stop - l) for t, l in zip(target, lo))
    dense[target] = kernel[source]
    return dense


def dense_box(lo_zyx, hi_zyx, shape_zyx) -> np.ndarray:
    dense = np.zeros(shape_zyx, dtype=np.float32)
    dense[tuple(slice(int(l), int(h)) for l, h in zip(lo_zyx, hi_zyx))] = 1
    return dense


def mask_statistics(labels_zyx: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per id: (bbox lo, bbox hi half-open, centroid) in (z, y, x) voxels, from cc3d statistics."""
    stats = cc3d.statistics(np.ascontiguousarray(labels_zyx.astype(np.uint32)))
    result = {}
    for label, (boxes, centroid, count) in enumerate(zip(stats["bounding_boxes"], stats["centroids"], stats["voxel_counts"])):
        if label == 0 or count == 0:
            continue
        lo = np.array([b.start for b in boxes])
        hi = np.array([b.stop for b in boxes])
        result[label] = (lo, hi, np.asarray(centroid, float))
    return result

