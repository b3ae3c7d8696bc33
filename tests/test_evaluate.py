"""Validation metrics of `lesionlocator evaluate`: CPM@25 counts missed lesions, MED only found ones."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.training.evaluate import TrackScore, core_point, open_ms_lesions, summarize_tracking
from LesionLocatorLib.training.validation import mean_ci95
from golden import SHARED


def test_cpm_counts_missed_lesions_and_med_averages_found_ones():
    scores = [TrackScore("a", 1, True, 0.9, 3.0, 1.0), TrackScore("a", 2, True, 0.5, 30.0, 1.0),
              TrackScore("b", 1, False, 0.0, None, 2.0), TrackScore("b", 2, True, 0.8, 5.0, 2.0)]
    summary = summarize_tracking(scores)
    assert summary["CPM@25"] == 0.5  # 2 of 4 within 25 mm; the missed one counts as a miss
    assert summary["MED_mm"] == pytest.approx((3 + 30 + 5) / 3, abs=0.01)
    assert summary["found"] == 3 and summary["mean_dice"] == pytest.approx(0.55)
    low, high = summary["mean_dice_ci95"]
    assert 0.0 <= low < 0.55 < high <= 0.9


def test_mean_interval_narrows_with_more_lesions_and_is_empty_for_constant_scores():
    rng = np.random.default_rng(3)
    few, many = mean_ci95(rng.uniform(0, 1, 30)), mean_ci95(rng.uniform(0, 1, 300))
    assert many[1] - many[0] < 0.6 * (few[1] - few[0])
    assert mean_ci95([0.7] * 10) == [0.7, 0.7]


def test_core_point_is_the_deepest_voxel():
    mask = np.zeros((9, 9, 9), bool)
    mask[1:8, 1:8, 1:8] = True
    assert core_point(mask) == (4.0, 4.0, 4.0)


def test_open_ms_expert_lesions_land_in_the_raw_study():
    folder = SHARED / "data" / "open_ms_longitudinal" / "raw" / "patient01"
    if not (folder / "gt.nii.gz").is_file():
        pytest.skip(f"shared data missing: {folder}")
    study, lesions = open_ms_lesions(folder)
    assert lesions and all(mask.shape == study.shape_zyx for mask in lesions.values())
    brightness = np.mean([study.array[mask].mean() for mask in lesions.values()])
    assert brightness > np.percentile(study.array[study.array > 0], 75)  # MS lesions are bright on FLAIR
