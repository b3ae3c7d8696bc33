"""Point search: cubes around a click, the boundary contrast that picks a candidate, the manifest entry, and the
Segmenter's search (the bundled Lite network with a manifest that asks for it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.models.layout import MODEL_MANIFEST
from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
from LesionLocatorLib.point_search import PointSearch, boundary_contrast, cube_around_point
from LesionLocatorLib.prompts import BoxPrompt, PointPrompt
from LesionLocatorLib.segmentation import Segmenter, single_patch_extent_zyx

SPACING_ZYX = (2.5, 0.8, 0.8)  # anisotropic: sizes in mm must become different voxel counts per axis
SIZES_MM = [8, 18, 40]


def sphere_image(radius_mm: float, shape_zyx=(40, 120, 120), seed: int = 0) -> tuple[ImageVolume, np.ndarray]:
    """A bright ball (+120) on noise (sd 15), anisotropic voxels, a non-identity direction; returns the true mask."""
    centre = np.array(shape_zyx) / 2
    zz, yy, xx = np.indices(shape_zyx)
    distance_mm = np.sqrt(sum(((c - m) * s) ** 2 for c, m, s in zip((zz, yy, xx), centre, SPACING_ZYX)))
    truth = distance_mm <= radius_mm
    rng = np.random.default_rng(seed)
    array = (20 + 120 * truth + rng.normal(0, 15, shape_zyx)).astype(np.float32)
    direction = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    return ImageVolume(array, SPACING_ZYX[::-1], (10.0, -5.0, 3.0), direction), truth


def test_cube_sizes_are_in_mm_per_axis_clipped_and_capped():
    box = cube_around_point((20, 60, 60), 16, SPACING_ZYX, (40, 120, 120))
    extent = np.subtract(box.hi_zyx, box.lo_zyx)
    assert tuple(extent) == (7, 21, 21)  # 16 mm: 6.4 z voxels and 20 in-plane, rounded around the click, + 1
    at_border = cube_around_point((1, 2, 118), 16, SPACING_ZYX, (40, 120, 120))
    assert at_border.lo_zyx == (0, 0, 108) and at_border.hi_zyx == (5, 13, 120)
    capped = cube_around_point((20, 60, 60), 60, SPACING_ZYX, (40, 120, 120), max_extent_zyx=(10, 30, 200))
    assert np.all(np.subtract(capped.hi_zyx, capped.lo_zyx) <= (10, 30, 200))
    assert 75 <= capped.hi_zyx[2] - capped.lo_zyx[2] <= 77  # x is not capped: 60 mm = 75 voxels (+ rounding)


def test_boundary_contrast_is_highest_for_the_mask_that_stops_at_the_edge():
    image, truth = sphere_image(radius_mm=10)
    _, inner = sphere_image(radius_mm=5)
    _, outer = sphere_image(radius_mm=18)
    scores = [boundary_contrast(image.array, SPACING_ZYX, mask) for mask in (truth, inner, outer)]
    assert scores[0] > 2 * max(scores[1:])
    assert boundary_contrast(image.array, SPACING_ZYX, np.zeros_like(truth)) == float("-inf")
    # the same score from a mask given on a sub-region with its offset, and on a rescaled, shifted image (MR)
    found = np.argwhere(truth)
    lo, hi = found.min(axis=0) - 1, found.max(axis=0) + 2
    part = truth[tuple(slice(a, b) for a, b in zip(lo, hi))]
    assert boundary_contrast(image.array, SPACING_ZYX, part, lo) == pytest.approx(scores[0])
    assert boundary_contrast(image.array * 0.01 - 3, SPACING_ZYX, truth) == pytest.approx(scores[0], rel=1e-4)


def test_manifest_entry_is_read_and_checked():
    tasks = {"point": "p", "box": "b"}
    assert PointSearch.from_manifest({"tasks": tasks}) is None
    search = PointSearch.from_manifest({"tasks": tasks, "point_search": {"box_sizes_mm": [8, 12.5]}})
    assert search.box_sizes_mm == (8.0, 12.5)
    for entry in ({"box_sizes_mm": []}, {"box_sizes_mm": [8, -1]}, {"box_sizes_mm": "8"}, [8, 12], {"sizes": [8]}):
        with pytest.raises(CheckpointError, match="box_sizes_mm"):
            PointSearch.from_manifest({"tasks": tasks, "point_search": entry})
    with pytest.raises(CheckpointError, match="'box' task"):
        PointSearch.from_manifest({"tasks": {"point": "p"}, "point_search": {"box_sizes_mm": [8]}})


@pytest.fixture(scope="module")
def searching_root(tmp_path_factory) -> Path:
    """The bundled model with a manifest that asks for a point search over SIZES_MM."""
    if not (BUNDLED_LITE_DIR / MODEL_MANIFEST).is_file():
        pytest.skip("bundled Lite model missing")
    root = tmp_path_factory.mktemp("lite") / "model"
    shutil.copytree(BUNDLED_LITE_DIR, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    manifest["point_search"] = {"box_sizes_mm": SIZES_MM}
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    return root


def test_search_keeps_the_candidate_with_the_highest_contrast(searching_root):
    image, _ = sphere_image(radius_mm=12)
    click = PointPrompt((20.0, 64.0, 57.0))  # off-centre, inside the ball
    searching = Segmenter.from_folder(searching_root, device="cpu", preset="fast")
    assert searching.point_search.box_sizes_mm == tuple(float(s) for s in SIZES_MM)
    plain = Segmenter.from_folder(searching_root, device="cpu", preset="fast", point_search=False)
    assert plain.point_search is None
    box_model = plain.model_for("box")
    fits = single_patch_extent_zyx(box_model.patch_size_zyx, box_model.preprocessor.target_spacing_zyx,
                                   image.spacing_zyx)
    cubes = searching.point_search.candidate_boxes(click, image.spacing_zyx, image.shape_zyx, fits)
    assert all(np.all(np.subtract(c.hi_zyx, c.lo_zyx) <= fits) for c in cubes)
    candidates = plain.segment(image, {0: click, **{n + 1: cube for n, cube in enumerate(cubes)}}).masks
    contrasts = {n: boundary_contrast(image.array, image.spacing_zyx, mask) for n, mask in candidates.items()}
    chosen = searching.segment(image, {7: click}).masks[7]
    best = max(contrasts, key=contrasts.get)
    assert np.array_equal(chosen, candidates[best])
    assert len({m.tobytes() for m in candidates.values()}) > 1  # the candidates differ: the choice means something


def test_search_in_roi_mode_matches_exact_mode(searching_root):
    """roi mode shares one preprocessed window among the cubes; exact mode preprocesses the whole image."""
    image, _ = sphere_image(radius_mm=7, seed=1)
    clicks = {1: PointPrompt((20.0, 60.0, 60.0)), 2: PointPrompt((3.0, 10.0, 110.0))}  # one near the border
    roi = Segmenter.from_folder(searching_root, device="cpu", preset="fast").segment(image, clicks).masks
    exact = Segmenter.from_folder(searching_root, device="cpu", preset="fast", mode="exact").segment(image, clicks)
    for lesion_id in clicks:
        assert np.array_equal(roi[lesion_id], exact.masks[lesion_id]), lesion_id


def test_bad_search_entry_fails_when_the_segmenter_is_made(tmp_path: Path):
    (tmp_path / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "p", "box": "b"},
                                                        "point_search": {"box_sizes_mm": [0]}}))
    with pytest.raises(CheckpointError, match="remove it"):
        Segmenter.from_folder(tmp_path, device="cpu")
    assert Segmenter.from_folder(tmp_path, device="cpu", point_search=False).point_search is None


def test_boxes_and_masks_never_search(searching_root):
    image, _ = sphere_image(radius_mm=7, seed=2)
    searching = Segmenter.from_folder(searching_root, device="cpu", preset="fast")
    plain = Segmenter.from_folder(searching_root, device="cpu", preset="fast", point_search=False)
    box = {1: BoxPrompt((16.0, 50.0, 50.0), (25.0, 71.0, 71.0))}
    assert np.array_equal(searching.segment(image, box).masks[1], plain.segment(image, box).masks[1])


def test_segment_command_searches_unless_disabled(searching_root, tmp_path: Path):
    from LesionLocatorLib import cli
    from LesionLocatorLib.image import read_image, write_volume

    image, _ = sphere_image(radius_mm=12, seed=3)
    write_volume(image.array, image, tmp_path / "ct.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"1": {"point": [20, 64, 57]}}))
    expected = {flag: Segmenter.from_folder(searching_root, device="cpu", preset="fast", point_search=not flag)
                .segment(image, {1: PointPrompt((20.0, 64.0, 57.0))}).masks[1] for flag in (False, True)}
    assert not np.array_equal(expected[False], expected[True])  # on this click the search keeps a box's mask
    for flag in (False, True):
        out = tmp_path / f"out{flag}"
        command = ["segment", "-i", str(tmp_path / "ct.nii.gz"), "-p", str(tmp_path / "p.json"), "-o", str(out),
                   "-t", "point", "-m", str(searching_root), "-device", "cpu", "--preset", "fast",
                   "--disable_progress_bar"] + (["--disable_point_search"] if flag else [])
        assert cli.main(command) == 0
        assert np.array_equal(read_image(out / "ct_lesion_1.nii.gz").array > 0, expected[flag] > 0), flag


def test_tracking_baseline_clicks_follow_the_setting(searching_root):
    import argparse

    from LesionLocatorLib import track_cli
    from LesionLocatorLib.tracking import Tracker

    assert Tracker.from_folder(searching_root, device="cpu", registration="classical").segmenter.point_search
    plain = Tracker.from_folder(searching_root, device="cpu", registration="classical", point_search=False)
    assert plain.segmenter.point_search is None
    parser = argparse.ArgumentParser()
    track_cli.configure_parser(parser)
    args = parser.parse_args(["-bl", "a.nii.gz", "-fu", "b.nii.gz", "-p", "p.json", "-t", "point", "-o", "out",
                              "--disable_point_search"])
    assert args.disable_point_search
