"""The official tracker's optional z translation: crop two scans to the slices where they overlap best.

uniGradICON stretches each scan over its own field of view, so a follow-up covering many more slices than the
baseline would be squeezed onto it. When the slice counts differ by more than 20, the shorter scan is slid along
the longer one and the window with the smallest mean squared intensity difference is kept.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MAX_SLICE_DIFFERENCE = 20
INPLANE_SHAPE_YX = (175, 175)  # the registration network's in-plane size


def z_alignment_windows(moving_zyx: np.ndarray, fixed_zyx: np.ndarray) -> tuple[slice, slice]:
    """(moving z-window, fixed z-window); both full ranges unless the slice counts differ by more than 20."""
    n_moving, n_fixed = moving_zyx.shape[0], fixed_zyx.shape[0]
    full = (slice(0, n_moving), slice(0, n_fixed))
    if abs(n_moving - n_fixed) <= MAX_SLICE_DIFFERENCE:
        return full
    moving_is_shorter = n_moving < n_fixed
    shorter, longer = (moving_zyx, fixed_zyx) if moving_is_shorter else (fixed_zyx, moving_zyx)
    offset = _best_offset(_inplane_resized(shorter), _inplane_resized(longer))
    window = slice(offset, offset + shorter.shape[0])
    return (full[0], window) if moving_is_shorter else (window, full[1])


def _best_offset(shorter: torch.Tensor, longer: torch.Tensor) -> int:
    """Offset of the shorter stack within the longer one with the smallest mean squared difference.

    Offsets 0 .. |dz| - 1 only: the official loop runs `range(|dz|)` although |dz| + 1 placements fit, so the
    placement flush with the far end of the longer scan is never tried. Kept, so windows equal the official ones.
    """
    n_short, dz = shorter.shape[0], longer.shape[0] - shorter.shape[0]
    errors = [float(torch.mean((longer[offset:offset + n_short] - shorter) ** 2)) for offset in range(dz)]
    return int(np.argmin(errors))


def _inplane_resized(volume_zyx: np.ndarray) -> torch.Tensor:
    """(z, 175, 175): each slice resized bilinearly, slices kept."""
    slices = torch.from_numpy(np.ascontiguousarray(volume_zyx, dtype=np.float32))[:, None]
    return F.interpolate(slices, size=INPLANE_SHAPE_YX, mode="bilinear", align_corners=False)[:, 0]
