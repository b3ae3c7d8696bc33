"""The swappable registration interface used by the tracker.

`moving` is the earlier scan, `fixed` the later one. Both arrive preprocessed by the tracker (normalized, resampled
to the Track plans spacing, z-aligned crop), as ImageVolumes whose arrays are (z, y, x). `register()` runs once per
scan pair; the returned Deformation then warps every lesion mask of that pair, so warping must stay cheap.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from LesionLocatorLib.errors import LesionLocatorError
from LesionLocatorLib.image import ImageVolume


class RegistrationError(LesionLocatorError):
    """Two scans could not be registered."""


class Deformation(ABC):
    """A mapping from the fixed grid into the moving image, found by one registration."""

    def warp_mask_near(self, mask_on_moving: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
        """The warped mask over the fixed-grid region that holds it only: (mask, region), region (z, y, x) slices.
        Implementations that can warp a sub-grid directly override this; the default warps the whole grid."""
        warped = self.warp_mask(mask_on_moving)
        coords = np.argwhere(warped)
        if coords.size == 0:
            return warped[:0, :0, :0], (slice(0, 0),) * 3
        region = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(coords.min(axis=0), coords.max(axis=0)))
        return warped[region], region

    @abstractmethod
    def warp_mask(self, mask_on_moving: np.ndarray) -> np.ndarray:
        """Pull a (z, y, x) mask on the moving grid onto the fixed grid (nearest neighbour); returns uint8 0/1."""


class Registration(ABC):
    """Registers an earlier (moving) scan onto a later (fixed) scan."""

    name: str

    @abstractmethod
    def register(self, moving: ImageVolume, fixed: ImageVolume) -> Deformation:
        """Find the deformation that maps `fixed` grid points into `moving`."""


def check_mask_shape(mask_on_moving: np.ndarray, moving_shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """Return the mask as an array, or raise if it is not on the moving grid."""
    mask = np.asarray(mask_on_moving)
    if mask.shape != tuple(moving_shape_zyx):
        raise ValueError(
            f"The mask has shape {mask.shape} but the moving (earlier) image has shape {tuple(moving_shape_zyx)}; "
            "give a mask on the moving image's grid."
        )
    return mask
