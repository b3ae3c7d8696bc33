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
def searching_root(lite_root) -> Path:
    """The bundled model with a manifest that asks for a point search over SIZES_MM."""
    manifest = json.loads((lite_root / MODEL_MANIFEST).read_text())
    manifest["point_search"] = {"box_sizes_mm": SIZES_MM}
    (lite_root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    return lite_root


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


# --- candidate features and the fitted selector -----------------------------------------------------------------
def ball_candidates(image: ImageVolume, truth: np.ndarray, sizes_mm) -> list:
    """Candidates without a network: the point network's answer is the true ball (logit +5 inside, -5 outside) on a
    region; each cube's answer fills its cube (+5), given on a region that starts elsewhere."""
    from LesionLocatorLib.point_search import Candidate

    click = PointPrompt(tuple(float(c) for c in np.array(image.shape_zyx) // 2))
    point_region = (slice(5, 35), slice(20, 100), slice(30, 110))
    candidates = [Candidate(click, np.where(truth[point_region], 5.0, -5.0), point_region)]
    for size in sizes_mm:
        cube = cube_around_point(click.index_zyx, size, image.spacing_zyx, image.shape_zyx)
        lo, hi = np.asarray(cube.lo_zyx, int), np.asarray(cube.hi_zyx, int)
        region = tuple(slice(max(a - 3, 0), min(b + 4, n)) for a, b, n in zip(lo, hi, image.shape_zyx))
        score = np.full(tuple(r.stop - r.start for r in region), -5.0)
        score[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))] = 5.0
        candidates.append(Candidate(cube, score, region))
    return candidates


def test_candidate_features_describe_each_candidate():
    from LesionLocatorLib.point_search import FEATURES, candidate_features

    image, truth = sphere_image(radius_mm=9)
    candidates = ball_candidates(image, truth, SIZES_MM)
    features = candidate_features(image.array, image.spacing_zyx, candidates, SIZES_MM)
    assert features.shape == (4, len(FEATURES))
    value = {name: features[:, i] for i, name in enumerate(FEATURES)}
    assert value["is_point_network"].tolist() == [1, 0, 0, 0]
    assert value["contrast_rank"][0] == 0 and value["contrast_minus_best"][0] == 0  # the true ball stands out most
    assert np.all(value["contrast_minus_best"] <= 0)
    # a ball of 9 mm radius: its equivalent diameter is 18 mm (voxelized, so within a few percent)
    assert np.exp(value["log_diameter_mm"][0]) - 1 == pytest.approx(18, rel=0.05)
    # cubes: their masks fill them (face fill 1); their equivalent diameter is about (6/pi)^(1/3) = 1.24 x the side
    assert np.allclose(value["cube_face_fill"][1:], 1.0) and value["cube_face_fill"][0] == 0
    volumes_mm3 = [int((c.score > 0).sum()) * np.prod(SPACING_ZYX) for c in candidates[1:]]
    diameters = [(6 * v / np.pi) ** (1 / 3) for v in volumes_mm3]
    assert value["log_diameter_over_cube"][1:] == pytest.approx(np.log1p(diameters) - np.log(SIZES_MM))
    assert np.allclose(np.divide(diameters, SIZES_MM), 1.24, atol=0.35)  # voxel rounding of small cubes
    assert value["mean_probability_inside"] == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-6)
    # the band just outside each mask: -5 where the candidate's region reaches, -10 (OUTSIDE_LOGIT) beyond it
    assert np.all(value["mean_probability_band"] < 1 / (1 + np.exp(5.0)) + 1e-9)
    # agreement: the point candidate with itself, and nested cubes with their neighbours
    assert value["dice_point_network"][0] == 1
    cube_masks = [c.score > 0 for c in candidates[1:]]
    volumes = [int(m.sum()) for m in cube_masks]
    assert value["dice_next_cube"][1] == pytest.approx(2 * volumes[0] / (volumes[0] + volumes[1]), rel=1e-6)
    assert value["dice_previous_cube"][2] == value["dice_next_cube"][1]
    assert value["dice_next_cube"][3] == 0 and value["dice_previous_cube"][1] == 0  # no neighbour there
    with pytest.raises(ValueError, match="3 cubes"):
        candidate_features(image.array, image.spacing_zyx, candidates[:3], SIZES_MM)


def test_features_do_not_depend_on_where_a_candidate_region_starts():
    from LesionLocatorLib.point_search import Candidate, candidate_features

    image, truth = sphere_image(radius_mm=9)
    candidates = ball_candidates(image, truth, SIZES_MM)
    whole = [Candidate(c.prompt, _on_whole_grid(c, image.shape_zyx), (slice(0, None),) * 3) for c in candidates]
    # outside a region counts as OUTSIDE_LOGIT, so only the band's probability may differ
    a = candidate_features(image.array, image.spacing_zyx, candidates, SIZES_MM)
    b = candidate_features(image.array, image.spacing_zyx, whole, SIZES_MM)
    band = list(__import__("LesionLocatorLib.point_search", fromlist=["FEATURES"]).FEATURES).index(
        "mean_probability_band")
    assert np.allclose(np.delete(a, band, axis=1), np.delete(b, band, axis=1))


def _on_whole_grid(candidate, shape_zyx) -> np.ndarray:
    score = np.full(shape_zyx, -10.0)
    score[candidate.region] = candidate.score
    return score


def preferring(feature: str, sign: float = 1.0):
    """A selector whose score is sign * tanh(feature)."""
    from LesionLocatorLib.point_search import FEATURES, CandidateSelector

    count = len(FEATURES)
    weight = np.zeros((1, count))
    weight[0, FEATURES.index(feature)] = 1.0
    return CandidateSelector(np.zeros(count), np.ones(count), weight, np.zeros(1), np.array([sign]))


def test_selector_entry_round_trips_and_bad_entries_fail():
    from LesionLocatorLib.point_search import CandidateSelector

    selector = preferring("log_diameter_mm")
    tasks = {"point": "p", "box": "b"}
    manifest = {"tasks": tasks, "point_search": {"box_sizes_mm": SIZES_MM, "selector": selector.manifest_entry()}}
    loaded = PointSearch.from_manifest(json.loads(json.dumps(manifest)))
    assert np.array_equal(loaded.selector.hidden_weight, selector.hidden_weight)
    assert loaded.manifest_entry() == manifest["point_search"]
    assert PointSearch.from_manifest({"tasks": tasks, "point_search": {"box_sizes_mm": SIZES_MM}}).selector is None
    entry = selector.manifest_entry()
    for broken, message in (({**entry, "features": ["contrast"]}, "not fitted on this version"),
                            ({k: v for k, v in entry.items() if k != "hidden_bias"}, "incomplete"),
                            ({**entry, "output_weight": [1.0, 2.0]}, "bad arrays"),
                            ({**entry, "feature_scale": [0.0] * len(entry["feature_scale"])}, "bad arrays")):
        with pytest.raises(CheckpointError, match=message):
            PointSearch.from_manifest({"tasks": tasks, "point_search": {"box_sizes_mm": SIZES_MM, "selector": broken}})
    assert isinstance(CandidateSelector.from_entry(entry, "x"), CandidateSelector)


def test_search_keeps_the_candidate_the_selector_scores_highest(searching_root, tmp_path: Path):
    root = tmp_path / "model"
    shutil.copytree(searching_root, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    image, _ = sphere_image(radius_mm=12)
    click = PointPrompt((20.0, 64.0, 57.0))
    kept = {}
    for sign in (1.0, -1.0):  # prefer the largest mask, then the smallest
        manifest["point_search"]["selector"] = preferring("log_diameter_mm", sign).manifest_entry()
        (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
        segmenter = Segmenter.from_folder(root, device="cpu", preset="fast")
        candidates = segmenter.point_candidates(image, click)
        sizes = [int(c.mask.sum()) for c in candidates]
        chosen = segmenter.segment(image, {1: click}).masks[1].astype(bool)
        # the kept cube is then refined by the model's convolutional stage, so it is the candidate closest to the answer
        overlaps = []
        for candidate in candidates:
            placed = np.zeros(chosen.shape, bool)
            placed[candidate.region] = candidate.mask
            overlaps.append(2 * (placed & chosen).sum() / (placed.sum() + chosen.sum()))
        assert int(np.argmax(overlaps)) == int(np.argmax(sizes) if sign > 0 else np.argmin(sizes))
        assert max(overlaps) > 0.9
        kept[sign] = chosen
    assert not np.array_equal(kept[1.0], kept[-1.0])


def test_fit_selector_learns_which_candidate_is_best():
    from LesionLocatorLib.point_search import FEATURES
    from LesionLocatorLib.training.point_selector import chosen_dice, contrast_scores, fit_selector

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 7, len(FEATURES)))
    # the best candidate is where one feature peaks; contrast is noise here
    key = features[..., FEATURES.index("cube_face_fill")]
    dice = np.where(key == key.max(axis=1, keepdims=True), 0.9, 0.3) + rng.uniform(0, 0.05, key.shape)
    selector = fit_selector(features[:200], dice[:200], steps=300)
    held_out = chosen_dice(selector.scores(features[200:]), dice[200:])
    assert held_out.mean() > 0.85
    assert chosen_dice(contrast_scores(features[200:]), dice[200:]).mean() < 0.5


def test_fit_point_search_command_writes_a_selector_that_loads(searching_root, tmp_path: Path):
    from LesionLocatorLib import cli

    root = tmp_path / "model"
    shutil.copytree(searching_root, root)
    before = (root / MODEL_MANIFEST).read_text()
    saved = tmp_path / "features.npz"
    base = ["fit-point-search", "-m", str(root), "--steps", "30", "--seeds", "1"]
    assert cli.main(base + ["--backgrounds", "body_phantom:7", "head_phantom:8", "--cases-per-background", "2",
                            "--save-features", str(saved), "--dry-run"]) == 0
    assert (root / MODEL_MANIFEST).read_text() == before  # a dry run writes nothing
    with np.load(saved) as data:
        assert data["features"].shape[1:] == (len(SIZES_MM) + 1, 12) and data["dice"].shape == data["features"].shape[:2]
        assert np.all((data["dice"] >= 0) & (data["dice"] <= 1))
    assert cli.main(base + ["--features", str(saved)]) == 0
    assert Segmenter.from_folder(root, device="cpu").point_search.selector is not None
    first = (root / MODEL_MANIFEST).read_text()
    assert cli.main(base + ["--features", str(saved), "--hidden", "2"]) == 0  # a second fit keeps the first
    assert (root / "lesionlocator_model.previous.json").read_text() == first
    assert (root / MODEL_MANIFEST).read_text() != first
    assert cli.main(base + ["--features", str(saved), "--temperature", "0"]) == 2  # must be positive
    assert cli.main(base + ["--backgrounds", "brain_atlas_ct"]) == 2  # a validation background
    (root / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "net_point", "box": "net"}}))
    assert cli.main(base + ["--features", str(saved)]) == 2  # no point search to fit


def test_new_search_sizes_drop_a_selector_fitted_for_earlier_networks(tmp_path: Path):
    from LesionLocatorLib.training.plans import set_point_search

    selector = preferring("contrast").manifest_entry()
    extent = {"weights": "point_extent.pth", "min_size_mm": 10.0}
    (tmp_path / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "p", "box": "b"}, "point_search": {
        "box_sizes_mm": [8], "selector": selector, "extent": extent}}))
    assert set_point_search(tmp_path, [10, 20])
    assert json.loads((tmp_path / MODEL_MANIFEST).read_text())["point_search"] == {"box_sizes_mm": [10.0, 20.0]}


def test_candidate_dice_counts_the_truth_outside_the_candidate_region():
    from LesionLocatorLib.point_search import Candidate
    from LesionLocatorLib.training.point_selector import candidate_dice
    from LesionLocatorLib.training.validation import dice_score

    image, truth = sphere_image(radius_mm=9)
    region = (slice(10, 30), slice(40, 64), slice(40, 90))  # cuts the ball: part of the truth lies outside
    score = np.where(truth[region], 3.0, -3.0)
    whole = np.zeros_like(truth)
    whole[region] = truth[region]
    candidate = Candidate(PointPrompt((20.0, 60.0, 60.0)), score, region)
    assert candidate_dice(candidate, truth, int(truth.sum())) == pytest.approx(dice_score(whole, truth))
    assert 0 < dice_score(whole, truth) < 1
