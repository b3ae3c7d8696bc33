"""Read a report's inputs from files: the tracking result JSON, or images plus a folder of lesion masks."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..image import ImageReadError, ImageVolume, image_stem, read_image
from .build import ReportError

TRACKING_FORMAT = "lesionlocator-tracking/1"


@dataclass
class ReportInputs:
    """Keyword arguments of `build_report` besides the images and masks."""

    images: list[ImageVolume]
    masks: dict[int, list[np.ndarray | None]]
    timepoint_names: list[str]
    study_dates: list[str | None]
    lesion_names: dict[int, str] = field(default_factory=dict)
    lymph_nodes: set[int] = field(default_factory=set)
    first_timepoints: dict[int, int] = field(default_factory=dict)
    confirmed_absent: dict[int, set[int]] = field(default_factory=dict)


def load_tracking_result(path: str | os.PathLike) -> ReportInputs:
    """Read `lesions.json` written by `lesionlocator track` (paths in it are relative to its folder).

    A timepoint missing from a lesion's list means it was not segmented there; an entry with `found: false`
    and no mask means an empty segmentation; `confirmed_absent: true` marks a reader-confirmed disappearance.
    """
    path = Path(path)
    document = _read_json(path)
    folder = path.parent
    try:
        timepoints = sorted(document["timepoints"], key=lambda entry: int(entry["index"]))
        images = [_read(folder / entry["image"], "timepoint image") for entry in timepoints]
        inputs = ReportInputs(
            images=images,
            masks={},
            timepoint_names=[str(entry.get("name") or image.name) for entry, image in zip(timepoints, images)],
            study_dates=[_study_date(entry.get("study_date")) for entry in timepoints],
        )
        for key, lesion in _mapping(document["lesions"], "'lesions' must map lesion ids to lesions", path).items():
            _add_tracked_lesion(inputs, int(key), _mapping(lesion, f"lesion {key} must be an object", path), folder)
    except ReportError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ReportError(
            f"{path} does not follow the {TRACKING_FORMAT} layout ({type(error).__name__}: {error}); "
            "give the lesions.json written by `lesionlocator track`."
        ) from error
    return inputs


def load_images_and_masks(image_paths: list[str | os.PathLike], masks_dir: str | os.PathLike) -> ReportInputs:
    """Timepoint images (baseline first) and masks named `<image stem>_lesion_<id>.nii.gz` in `masks_dir`.

    Masks in `masks_dir/prompts/` count too (where `lesionlocator track -t prev_mask` keeps the baseline masks it
    was given); one in `masks_dir` itself wins. A lesion starts at the first timepoint that has its mask; a later
    missing mask means not segmented.
    """
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise ReportError(f"Mask folder not found: {masks_dir}; give the folder holding <image>_lesion_<id>.nii.gz.")
    images = [_read(Path(p), "timepoint image") for p in image_paths]
    stems = [image_stem(p) for p in image_paths]
    if len(set(stems)) != len(stems):
        raise ReportError(f"Timepoint images need distinct file names to find their masks; got {stems}.")
    mask_files = {t: _lesion_mask_files(masks_dir, stem) for t, stem in enumerate(stems)}
    lesion_ids = sorted({lesion_id for files in mask_files.values() for lesion_id in files})
    if not lesion_ids:
        raise ReportError(
            f"No masks named <image stem>_lesion_<id>.nii.gz for {', '.join(stems)} in {masks_dir}; "
            "give the output folder of `lesionlocator segment` or `track`."
        )
    masks = {
        lesion_id: [
            _read_mask(mask_files[t][lesion_id], images[t]) if lesion_id in mask_files[t] else None
            for t in range(len(images))
        ]
        for lesion_id in lesion_ids
    }
    return ReportInputs(images=images, masks=masks, timepoint_names=stems, study_dates=[None] * len(images))


def _study_date(value: object) -> str | None:
    """A date as the user wrote it (a number such as 20240102 too)."""
    return None if value is None else str(value)


def _mapping(value: object, rule: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ReportError(
            f"In {path}, {rule} ({{...}}), not a {type(value).__name__}; give the lesions.json written by "
            "`lesionlocator track`."
        )
    return value


def _add_tracked_lesion(inputs: ReportInputs, lesion_id: int, lesion: dict, folder: Path) -> None:
    first_timepoint = int(lesion.get("first_timepoint", 0))
    masks: list[np.ndarray | None] = [None] * len(inputs.images)
    for entry in lesion["timepoints"]:
        t = int(entry["timepoint"])
        if not 0 <= t < len(inputs.images):
            raise ReportError(f"Lesion {lesion_id} refers to timepoint {t}, which is not in the timepoint list.")
        if t < first_timepoint:
            continue  # before a new lesion appeared
        if entry.get("mask"):
            masks[t] = _read_mask(folder / entry["mask"], inputs.images[t])
        elif not entry.get("found", True):
            # An empty segmentation; a read-only broadcast zero costs no memory however large the image.
            masks[t] = np.broadcast_to(np.uint8(0), inputs.images[t].shape_zyx)
        if entry.get("confirmed_absent"):
            inputs.confirmed_absent.setdefault(lesion_id, set()).add(t)
    inputs.masks[lesion_id] = masks
    inputs.lesion_names[lesion_id] = str(lesion.get("name") or f"Lesion {lesion_id}")
    inputs.first_timepoints[lesion_id] = first_timepoint
    if lesion.get("is_lymph_node"):
        inputs.lymph_nodes.add(lesion_id)


def _lesion_mask_files(masks_dir: Path, stem: str) -> dict[int, Path]:
    pattern = re.compile(re.escape(stem) + r"_lesion_(\d+)\.nii\.gz$")
    files = {}
    for folder in (masks_dir / "prompts", masks_dir):  # the later folder wins
        if folder.is_dir():
            files.update({int(match.group(1)): p for p in folder.iterdir() if (match := pattern.match(p.name))})
    return files


def _read_json(path: Path) -> dict:
    if path.is_dir():
        raise ReportError(f"{path} is a folder; give the lesions.json inside it ({path / 'lesions.json'}).")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ReportError(f"Tracking result not found: {path}; run `lesionlocator track` first.") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(
            f"{path} is not valid JSON ({error}); give the lesions.json written by the tracker."
        ) from error
    if not isinstance(document, dict) or document.get("format") != TRACKING_FORMAT:
        raise ReportError(f"{path} is not a LesionLocator tracking result (expected format '{TRACKING_FORMAT}').")
    return document


def _read(path: Path, what: str) -> ImageVolume:
    try:
        return read_image(path)
    except ImageReadError as error:
        raise ReportError(f"Cannot read the {what}: {error}") from error


def _read_mask(path: Path, image: ImageVolume) -> np.ndarray:
    mask = _read(path, "lesion mask")
    if not mask.same_grid(image):
        raise ReportError(
            f"The mask {path.name} is not on the grid of its timepoint image '{image.name}' "
            f"(mask {mask.shape_zyx} voxels, image {image.shape_zyx}); resample it onto the image first."
        )
    return (mask.array != 0).astype(np.uint8)
