"""Small boxes on a finer grid: the box network answers a box smaller than `below_mm` on a grid whose spacing is
`spacing_factor` times its plans' spacing.

A small network segments small lesions worse than larger ones: seen on its own grid, a lesion of 5-15 mm spans only
a few network voxels. On a finer grid the same lesion spans more network voxels, as the larger lesions it segments
well do; the answer is resampled back onto the image's grid as always, and refined as every box answer is
(box_refinement.py). It costs no time: the network's patch stays as planned (so it covers less of the image, which
`below_mm` keeps for boxes that fit easily), and a small box needs one patch either way.

A model root asks for it in its manifest: `"box_fine_grid": {"below_mm": 16.0, "spacing_factor": 0.67}` (the bundled
Lite model's choice; see its model card for what it gains). `lesionlocator train` keeps the entry. Only box prompts
use it (a click's predicted box is one), in roi mode; the point search's cubes do not (its selector was fitted on their
answers on the planned grid). A box's size is its largest side in mm; indices are (z, y, x) voxels of the original
image.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import numpy as np

from .checkpoint import ModelFolder
from .errors import CheckpointError
from .prompts import BoxPrompt

MANIFEST_KEY = "box_fine_grid"
FIX = f"Set '{MANIFEST_KEY}' to {{\"below_mm\": <mm>, \"spacing_factor\": <between 0.25 and 1>}}, or remove it."
# Finer than a quarter of the planned spacing the planned patch would cover too little of a box's surroundings.
MIN_SPACING_FACTOR = 0.25


@dataclass(frozen=True)
class FineGrid:
    below_mm: float  # boxes whose largest side is under this many mm use the fine grid
    spacing_factor: float  # the fine grid's spacing over the plans' spacing, in [MIN_SPACING_FACTOR, 1)

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the model manifest") -> "FineGrid | None":
        entry = manifest.get(MANIFEST_KEY)
        if entry is None:
            return None
        what = f"{where}: '{MANIFEST_KEY}'"
        if not isinstance(entry, dict) or set(entry) != {"below_mm", "spacing_factor"}:
            raise CheckpointError(f"{what} must hold exactly 'below_mm' and 'spacing_factor'. {FIX}")
        below, factor = entry["below_mm"], entry["spacing_factor"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (below, factor)):
            raise CheckpointError(f"{what}: 'below_mm' and 'spacing_factor' must be numbers. {FIX}")
        if below <= 0:
            raise CheckpointError(f"{what}: 'below_mm' must be positive; got {below}. {FIX}")
        if not MIN_SPACING_FACTOR <= factor < 1:
            raise CheckpointError(f"{what}: 'spacing_factor' must be at least {MIN_SPACING_FACTOR} and under 1 (a "
                                  f"finer grid than the plans'); got {factor}. {FIX}")
        return cls(float(below), float(factor))

    def manifest_entry(self) -> dict:
        return {"below_mm": self.below_mm, "spacing_factor": self.spacing_factor}

    def applies_to(self, box: BoxPrompt, spacing_zyx) -> bool:
        sides_mm = (np.asarray(box.hi_zyx, float) - np.asarray(box.lo_zyx, float)) * np.asarray(spacing_zyx, float)
        return float(sides_mm.max()) < self.below_mm

    def folder(self, model: ModelFolder) -> ModelFolder:
        """The same networks and weights, planned at the fine spacing (the plans' other settings unchanged)."""
        spacing = [float(s) * self.spacing_factor for s in model.configuration["spacing"]]
        plans = copy.deepcopy(model.plans)
        plans["configurations"][model.configuration_name]["spacing"] = spacing  # a child's keys win over inherited ones
        return replace(model, plans=plans, configuration={**model.configuration, "spacing": spacing})
