"""Does an image hold what the model expects? A model whose plans normalize the image as CT (`CTNormalization`: the
official LesionLocator models and LesionLocator-Lite) clips and scales Hounsfield units; given MR, PET or a CT
stored without its rescale slope/intercept, it still answers, with nothing to tell the user that the answer is
unreliable. This warns instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import TASK_FOLDERS, read_plans, resolve_configuration, resolve_task_folder
from .errors import CheckpointError

CT_NORMALIZATION = "CTNormalization"
# A CT in HU spans tens of HU at least (a skull-stripped brain: CSF to grey matter), and one with bone or contrast
# above 150 HU also holds fat or air below -50 HU (outside the body). MR and PET magnitudes are not negative and
# reach hundreds or thousands; SUV, z-scored and 0-1 rescaled images span a few units.
MIN_SPREAD_HU = 20.0
FAT_OR_AIR_HU = -50.0
BONE_OR_CONTRAST_HU = 150.0
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
SAMPLED_VOXELS = 1_000_000


def hu_warning(array_zyx: np.ndarray, name: str = "The image") -> str:
    """'' when the intensities look like CT in Hounsfield units; otherwise why they do not, and what to do."""
    step = max(1, round((array_zyx.size / SAMPLED_VOXELS) ** (1 / 3)))
    sample = np.asarray(array_zyx[::step, ::step, ::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return ""
    low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high - low >= MIN_SPREAD_HU and (low <= FAT_OR_AIR_HU or high <= BONE_OR_CONTRAST_HU):
        return ""
    return (f"{name}'s intensities do not look like CT in Hounsfield units ({LOW_PERCENTILE}th-{HIGH_PERCENTILE}th "
            f"percentile {low:.4g} to {high:.4g}). Models that normalize their input as CT (LesionLocator, "
            "LesionLocator-Lite) answer unreliably on MR, PET or a CT stored without its rescale slope and intercept, "
            "and learn badly from them: use a model trained for this modality, or convert the CT to HU.")


def expects_hounsfield_units(model_root: str | Path) -> bool:
    """Whether every network of a model root (official layout, manifest or single folder) normalizes its image as
    CT in every configuration of its plans. Reads plans.json only, no weights; a missing task is skipped."""
    folders = set()
    for task in TASK_FOLDERS:
        try:
            folders.add(resolve_task_folder(model_root, task))
        except CheckpointError:
            continue
    schemes = [resolve_configuration(plans, name).get("normalization_schemes", [None])[0]
               for plans in map(read_plans, folders)
               for name in plans.get("configurations", {})]
    return bool(schemes) and all(scheme == CT_NORMALIZATION for scheme in schemes)
