"""The official optional z translation (slice-count difference > 20 -> MSE slide of the shorter scan)."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.registration.zalign import z_alignment_windows
from test_registration_gradicon import TRACK_INPUTS, track_preprocessed


def smooth_random_volume(n_slices: int, seed: int = 0) -> np.ndarray:
    """Slices that differ from each other, so exactly one placement matches."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(n_slices, 24, 24)), axis=0).astype(np.float32)


def test_a22_follow_up_window_equals_the_official_one():
    baseline, _ = track_preprocessed(TRACK_INPUTS / "A_trk_bl.nii.gz")
    followup, _ = track_preprocessed(TRACK_INPUTS / "A_trk_fulong.nii.gz")
    assert (baseline.shape[0], followup.shape[0]) == (48, 76)
    assert z_alignment_windows(baseline, followup) == (slice(0, 48), slice(13, 61))


@pytest.mark.parametrize("n_moving, n_fixed", [(40, 60), (60, 40), (50, 50)])
def test_full_ranges_when_slice_counts_differ_by_at_most_20(n_moving, n_fixed):
    windows = z_alignment_windows(smooth_random_volume(n_moving), smooth_random_volume(n_fixed, seed=1))
    assert windows == (slice(0, n_moving), slice(0, n_fixed))


def test_the_longer_scan_is_cropped_whichever_it_is():
    longer = smooth_random_volume(70)
    shorter = longer[17:45]
    assert z_alignment_windows(shorter, longer) == (slice(0, 28), slice(17, 45))
    assert z_alignment_windows(longer, shorter) == (slice(17, 45), slice(0, 28))


def test_the_placement_flush_with_the_far_end_is_never_tried():
    """Official off-by-one: offsets 0 .. |dz| - 1 only, so the exact match at offset |dz| is missed."""
    longer = smooth_random_volume(70)
    moving_window, fixed_window = z_alignment_windows(longer[-40:], longer)
    assert moving_window == slice(0, 40)
    assert fixed_window.start < 30 and fixed_window.stop - fixed_window.start == 40
