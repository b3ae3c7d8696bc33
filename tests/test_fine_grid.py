"""Small boxes on a finer grid: the manifest entry, which boxes use it (largest side in mm on anisotropic grids), the
scaled plans, and the Segmenter's answers on it, against a model root planned at the fine spacing itself."""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.checkpoint import load_checkpoint_folder, resolve_configuration
from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.fine_grid import MANIFEST_KEY, FineGrid
from LesionLocatorLib.models.layout import MODEL_MANIFEST
from LesionLocatorLib.preprocessing import Preprocessor
from LesionLocatorLib.prompts import BoxPrompt
from LesionLocatorLib.segmentation import Segmenter

FACTOR = 0.6


def test_entry_round_trips_and_bad_entries_fail():
    grid = FineGrid.from_manifest({MANIFEST_KEY: {"below_mm": 24, "spacing_factor": 0.67}})
    assert grid == FineGrid(24.0, 0.67)
    assert FineGrid.from_manifest({MANIFEST_KEY: grid.manifest_entry()}) == grid
    assert FineGrid.from_manifest({}) is None
    bad = [{"below_mm": 24}, {"below_mm": 24, "spacing_factor": 0.5, "extra": 1}, [24, 0.5],
           {"below_mm": -1, "spacing_factor": 0.5}, {"below_mm": 24, "spacing_factor": 1.0},
           {"below_mm": 24, "spacing_factor": 0.1}, {"below_mm": "24", "spacing_factor": 0.5},
           {"below_mm": True, "spacing_factor": 0.5}, {"below_mm": float("nan"), "spacing_factor": 0.5}]
    for entry in bad:
        with pytest.raises(CheckpointError, match=f"'{MANIFEST_KEY}'.*remove it"):
            FineGrid.from_manifest({MANIFEST_KEY: entry}, "model.json")


def test_a_box_qualifies_by_its_largest_side_in_mm():
    grid = FineGrid(16.0, 0.5)
    spacing_zyx = (2.5, 0.8, 0.8)
    # 6 slices of 2.5 mm = 15 mm, 19 x 0.8 = 15.2 mm in y: under 16 mm
    assert grid.applies_to(BoxPrompt((10, 20, 30), (16, 39, 40)), spacing_zyx)
    assert not grid.applies_to(BoxPrompt((10, 20, 30), (17, 39, 40)), spacing_zyx)  # 17.5 mm in z
    assert not grid.applies_to(BoxPrompt((10, 20, 30), (16, 40, 40)), spacing_zyx)  # 16 mm in y
    assert grid.applies_to(BoxPrompt((10, 20, 30), (16, 21, 49)), spacing_zyx)  # x: 19 voxels = 15.2 mm
    assert not grid.applies_to(BoxPrompt((10, 20, 30), (16, 21, 50)), spacing_zyx)  # x: 20 voxels = 16 mm


def test_the_fine_folder_scales_the_spacing_alone(lite_root: Path):
    model = load_checkpoint_folder(lite_root / "net")
    plans_before = json.dumps(model.plans, sort_keys=True)
    fine = FineGrid(16.0, FACTOR).folder(model)
    expected = [s * FACTOR for s in model.configuration["spacing"]]
    assert Preprocessor(fine).target_spacing_zyx == pytest.approx(expected)
    assert fine.configuration["spacing"] == pytest.approx(expected)
    assert fine.patch_size_zyx == model.patch_size_zyx and fine.fold_weights is model.fold_weights
    assert json.dumps(model.plans, sort_keys=True) == plans_before  # the loaded model is unchanged
    # a configuration that inherits its spacing from another one
    plans = json.loads(plans_before)
    plans["configurations"]["child"] = {"inherits_from": model.configuration_name}
    child = replace(model, plans=plans, configuration_name="child", configuration=resolve_configuration(plans, "child"))
    assert Preprocessor(FineGrid(16.0, FACTOR).folder(child)).target_spacing_zyx == pytest.approx(expected)


@pytest.fixture(scope="module")
def fine_roots(lite_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The bundled model asking for a fine grid, and the same networks planned at the fine spacing (no entry)."""
    base = tmp_path_factory.mktemp("fine")
    asking, planned = base / "asking", base / "planned"
    for root in (asking, planned):
        shutil.copytree(lite_root, root)
        manifest = json.loads((root / MODEL_MANIFEST).read_text())
        manifest.pop(MANIFEST_KEY, None)
        if root == asking:
            manifest[MANIFEST_KEY] = {"below_mm": 16.0, "spacing_factor": FACTOR}
        (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    plans = json.loads((planned / "net" / "plans.json").read_text())
    for configuration in plans["configurations"].values():
        if "spacing" in configuration:
            configuration["spacing"] = [s * FACTOR for s in configuration["spacing"]]
    (planned / "net" / "plans.json").write_text(json.dumps(plans))
    return asking, planned


def test_small_boxes_are_answered_on_the_fine_grid_and_large_ones_as_planned(fine_roots):
    from test_point_search import sphere_image

    asking, planned = fine_roots
    image, truth = sphere_image(radius_mm=5, seed=4)  # (2.5, 0.8, 0.8) mm voxels, a non-identity direction
    lo, hi = np.argwhere(truth).min(0), np.argwhere(truth).max(0) + 1
    small = BoxPrompt(tuple(map(float, lo)), tuple(map(float, hi)))  # 12.5 x 10.4 x 10.4 mm
    large = BoxPrompt(tuple(map(float, lo - 10)), tuple(map(float, hi + 10)))  # 62.5 mm in z
    fine = Segmenter.from_folder(asking, device="cpu", preset="fast", box_refinement=False)
    on_planned_grid = Segmenter.from_folder(asking, device="cpu", preset="fast", box_refinement=False,
                                            box_fine_grid=False)
    at_fine_spacing = Segmenter.from_folder(planned, device="cpu", preset="fast", box_refinement=False)
    assert on_planned_grid.fine_grid is None and fine.fine_grid == FineGrid(16.0, FACTOR)
    for box, same_as in ((small, at_fine_spacing), (large, on_planned_grid)):
        score, region = fine.network_answer(image, box)
        expected_score, expected_region = same_as.network_answer(image, box)
        assert region == expected_region
        np.testing.assert_array_equal(score, expected_score)
    small_planned, _ = on_planned_grid.network_answer(image, small)
    assert not np.array_equal(fine.network_answer(image, small)[0], small_planned)
    # the whole answer (with the refinement) goes the same way, and the mask is the lesion
    refined = Segmenter.from_folder(asking, device="cpu", preset="fast").segment(image, {1: small}).masks[1]
    assert 2 * (refined & truth).sum() / (refined.sum() + truth.sum()) > 0.8
    assert Segmenter.from_folder(asking, device="cpu", mode="exact").fine_grid is None  # the official pipeline


def test_the_commands_and_the_tracker_follow_the_setting(fine_roots):
    from LesionLocatorLib import segment_cli, track_cli
    from LesionLocatorLib.tracking import Tracker
    from LesionLocatorLib.training import evaluate

    asking, _ = fine_roots
    assert Tracker.from_folder(asking, device="cpu", registration="classical").segmenter.fine_grid is not None
    off = Tracker.from_folder(asking, device="cpu", registration="classical", box_fine_grid=False)
    assert off.segmenter.fine_grid is None
    for module, argv, flag in (
            (segment_cli, ["-i", "a.nii.gz", "-p", "p.json", "-t", "box", "-o", "out"], "--disable_box_fine_grid"),
            (track_cli, ["-bl", "a.nii.gz", "-fu", "b.nii.gz", "-p", "p.json", "-t", "box", "-o", "out"],
             "--disable_box_fine_grid"),
            (evaluate, [], "--disable-box-fine-grid")):
        parser = argparse.ArgumentParser()
        module.configure_parser(parser)
        assert parser.parse_args(argv + [flag]).disable_box_fine_grid
        assert not parser.parse_args(argv).disable_box_fine_grid
