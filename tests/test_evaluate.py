"""Validation metrics of `lesionlocator evaluate`: CPM@25 counts missed lesions, MED only found ones."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.training.evaluate import (
    TrackScore, core_point, open_ms_lesions, summarize_tracking, tracking_line,
)
from LesionLocatorLib.preprocessing import Preprocessor
from LesionLocatorLib.training.plans import LiteModelConfig, plans_model_folder
from LesionLocatorLib.training.validation import (
    LesionScore, mean_ci95, spacing_ceiling_dice, summarize, summary_table,
)
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


def sphere_zyx(shape_zyx, spacing_zyx, radius_mm: float) -> np.ndarray:
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape_zyx, spacing_zyx)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return z**2 + y**2 + x**2 <= radius_mm**2


def test_spacing_ceiling_falls_for_lesions_a_few_model_voxels_across():
    coarse = Preprocessor(plans_model_folder(LiteModelConfig(spacing_zyx=(2.0, 1.5, 1.5))))
    image_spacing_zyx = (1.0, 0.8, 0.8)  # anisotropic scan (z, y, x)
    large = sphere_zyx((50, 60, 60), image_spacing_zyx, 20.0)
    small = sphere_zyx((20, 30, 30), image_spacing_zyx, 2.5)  # 5 mm: 2.5 voxels of the model's grid
    assert spacing_ceiling_dice(large, image_spacing_zyx, coarse) > 0.95
    assert spacing_ceiling_dice(small, image_spacing_zyx, coarse) < 0.9
    # the model's own spacing: nothing is lost on the way
    native = Preprocessor(plans_model_folder(LiteModelConfig(spacing_zyx=image_spacing_zyx)))
    assert spacing_ceiling_dice(small, image_spacing_zyx, native) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        spacing_ceiling_dice(np.zeros((4, 4, 4), bool), image_spacing_zyx, coarse)


def test_summary_reports_the_spacing_ceiling_only_when_every_lesion_has_one():
    scores = [LesionScore("a", 1, "box", 0.6, 5.0, "lung", "sphere", 0.1, 0.8),
              LesionScore("a", 2, "box", 0.9, 30.0, "lung", "sphere", 0.1, 1.0)]
    summary = summarize(scores)["box"]
    assert summary["spacing_ceiling"] == pytest.approx(0.9)
    assert summary["by_diameter"]["0-10mm"]["spacing_ceiling"] == pytest.approx(0.8)
    unknown = summarize([LesionScore("a", 1, "box", 0.6, 5.0, "lung", "sphere", 0.1)])["box"]
    assert "spacing_ceiling" not in unknown


def test_the_terminal_table_holds_each_prompts_interval_size_bins_and_ceiling():
    scores = [LesionScore("a", 1, "box", 0.6, 5.0, "lung", "sphere", 0.2, 0.8),
              LesionScore("a", 2, "box", 0.9, 30.0, "lung", "sphere", 0.4, 1.0),
              LesionScore("a", 1, "point", 0.3, 5.0, "lung", "sphere", 0.5)]
    summary = summarize(scores)
    header, box, point = summary_table(summary).splitlines()
    assert header.split()[:2] == ["prompt", "lesions"] and "0-10mm" in header and ">=40mm" in header
    low, high = summary["box"]["mean_dice_ci95"]
    # box: 2 lesions, mean 0.75 with its interval, one lesion in 0-10 mm and one in 20-40 mm, ceiling 0.9, 0.3 s
    assert box.split()[:2] == ["box", "2"] and f"0.750 [{low:.3f}, {high:.3f}]" in box
    assert "0.60 (1)" in box and "0.90 (1)" in box and box.split()[-2:] == ["0.900", "0.30"]
    assert box.count(" - ") == 2  # the empty 10-20 mm and >= 40 mm bins
    # point: no ceiling known, no lesion at Dice >= 0.5
    assert point.split()[:2] == ["point", "1"] and "0 %" in point and point.split()[-2:] == ["-", "0.50"]
    assert summary_table({}) == "no lesions scored"


def test_the_tracking_line_names_found_lesions_cpm_and_med():
    scores = [TrackScore("a", 1, True, 0.9, 3.0, 1.0), TrackScore("b", 1, False, 0.0, None, 2.0)]
    line = tracking_line(summarize_tracking(scores))
    assert line.startswith("1 of 2 lesions found, mean Dice 0.450 [")
    assert "CPM@25 0.500, MED 3.00 mm, 1.50 s per step" in line
    nothing_found = tracking_line(summarize_tracking([TrackScore("b", 1, False, 0.0, None, 2.0)]))
    assert "0 of 1 lesions found" in nothing_found and "MED -," in nothing_found
    assert "no lesion was tracked" in tracking_line({})
