"""Box refinement: its features on a box's crop ((z, y, x) voxels, anisotropic spacing), what a refiner changes and
what it leaves, the manifest entry, the convolutional stage's neighbourhood, the Segmenter refining boxes only, fitting
that learns, and the `fit-box-refinement` command."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from LesionLocatorLib.box_refinement import FEATURES, BoxRefiner, box_crop, refinement_features
from LesionLocatorLib.conv_stage import HALO_VOXELS, ConvStage
from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.models.layout import MODEL_MANIFEST
from LesionLocatorLib.prompts import BoxPrompt, PointPrompt
from LesionLocatorLib.tanh_layer import TanhLayer

SPACING_ZYX = (2.5, 0.8, 0.8)  # anisotropic: mm and voxels differ per axis
SHAPE_ZYX = (30, 90, 90)


def ball_image(radius_mm: float, centre_zyx=(15.0, 45.0, 45.0), seed: int = 0) -> tuple[ImageVolume, np.ndarray]:
    """A bright ball (+100) on noise (sd 12), non-identity direction; returns the image and the true mask."""
    grids = np.indices(SHAPE_ZYX)
    distance_mm = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_zyx, SPACING_ZYX)))
    truth = distance_mm <= radius_mm
    array = (30 + 100 * truth + np.random.default_rng(seed).normal(0, 12, SHAPE_ZYX)).astype(np.float32)
    direction = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    return ImageVolume(array, SPACING_ZYX[::-1], (4.0, -2.0, 7.0), direction), truth


def loose_box(truth: np.ndarray, margin_mm: float) -> BoxPrompt:
    """The mask's bounding box grown by `margin_mm` on every side: a box much larger than a round lesion."""
    found = np.argwhere(truth)
    margin = np.round(margin_mm / np.asarray(SPACING_ZYX)).astype(int)
    lo = np.maximum(found.min(axis=0) - margin, 0)
    hi = np.minimum(found.max(axis=0) + 1 + margin, SHAPE_ZYX)
    return BoxPrompt(tuple(map(float, lo)), tuple(map(float, hi)))


def filled_box_logits(box: BoxPrompt, shape=SHAPE_ZYX) -> tuple[np.ndarray, tuple[slice, ...]]:
    """A network that fills the box (+4) and says background (-8) in a region around it."""
    lo, hi = np.asarray(box.lo_zyx, int), np.asarray(box.hi_zyx, int)
    region = tuple(slice(max(a - 3, 0), min(b + 3, n)) for a, b, n in zip(lo, hi, shape))
    score = np.full(tuple(s.stop - s.start for s in region), -8.0, np.float32)
    score[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, region))] = 4.0
    return score, region


def refiner_using(feature: str, weight: float = 1.0, output: float = 12.0, bias: float = 0.0,
                  threshold: float = 0.0) -> BoxRefiner:
    """correction = output * tanh(weight * (feature - threshold)) + bias (features unstandardized)."""
    count = len(FEATURES)
    hidden = np.zeros((1, count))
    hidden[0, FEATURES.index(feature)] = weight
    return BoxRefiner([TanhLayer(np.zeros(count), np.ones(count), hidden, np.array([-weight * threshold]),
                                 np.array([output]), bias)])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def in_grid(score: np.ndarray, region) -> np.ndarray:
    mask = np.zeros(SHAPE_ZYX, bool)
    mask[region] = score > 0
    return mask


def test_features_on_the_box_crop_in_zyx_voxels():
    image, truth = ball_image(6.0)
    box = loose_box(truth, 3.0)
    crop = box_crop(box, SPACING_ZYX, SHAPE_ZYX)
    lo = np.asarray([s.start for s in crop])
    assert tuple(lo) == tuple(np.maximum(np.asarray(box.lo_zyx, int) - np.ceil(12 / np.asarray(SPACING_ZYX)), 0))
    score, region = filled_box_logits(box)
    logits = np.full(image.array[crop].shape, -10.0, np.float32)
    logits[tuple(slice(r.start - a, r.stop - a) for r, a in zip(region, lo))] = score
    box_lo, box_hi = np.asarray(box.lo_zyx, int) - lo, np.asarray(box.hi_zyx, int) - lo
    features, reach = refinement_features(image.array[crop], logits, box_lo, box_hi, SPACING_ZYX)
    assert features.shape == image.array[crop].shape + (len(FEATURES),) and features.dtype == np.float32
    in_box, grown = np.zeros(reach.shape, bool), np.zeros(reach.shape, bool)
    in_box[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))] = True
    grown[tuple(slice(a - 2, b + 2) for a, b in zip(box_lo, box_hi))] = True
    assert np.all(reach[in_box]) and not np.any(reach & ~grown)  # the box and up to 2 face-connected steps out
    mid = (box_lo + box_hi) // 2
    assert reach[mid[0], mid[1], box_hi[2] + 1] and not reach[mid[0], mid[1], box_hi[2] + 2]
    assert not reach[box_lo[0] - 1, box_lo[1] - 1, box_lo[2] - 1]  # a corner's diagonal neighbour is 3 steps out
    named = {name: features[..., k] for k, name in enumerate(FEATURES)}
    ball = truth[crop]
    for ratio in ("likelihood_ratio_1mm", "likelihood_ratio_2mm", "likelihood_ratio_refit"):
        inside_box = np.zeros(reach.shape, bool)
        inside_box[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))] = True
        assert named[ratio][ball].mean() > named[ratio][inside_box & ~ball].mean() + 2, ratio
    centre = tuple(((box_lo + box_hi - 1) // 2).astype(int))
    assert named["box_radius_ellipsoid"][centre] < 0.2
    face = (centre[0], centre[1], int(box_hi[2]) - 1)  # on the high x face
    assert named["box_radius_chebyshev"][face] == pytest.approx(1.0, abs=0.1)
    assert named["signed_distance_mm"][centre] > 0 > named["signed_distance_mm"][0, 0, 0]
    extent_mm = (np.asarray(box.hi_zyx) - np.asarray(box.lo_zyx)) * SPACING_ZYX
    assert named["log_box_size_mm"][0, 0, 0] == pytest.approx(np.log(np.prod(extent_mm) ** (1 / 3)), rel=1e-5)


def test_intensity_fraction_runs_from_the_surroundings_to_the_lesion():
    image, truth = ball_image(6.0)
    box = loose_box(truth, 3.0)
    crop = box_crop(box, SPACING_ZYX, SHAPE_ZYX)
    lo = np.asarray([s.start for s in crop])
    box_lo, box_hi = np.asarray(box.lo_zyx, int) - lo, np.asarray(box.hi_zyx, int) - lo
    ball = truth[crop]
    logits = np.where(ball, 8.0, -8.0).astype(np.float32)  # a network that finds the ball exactly
    features, _ = refinement_features(image.array[crop], logits, box_lo, box_hi, SPACING_ZYX)
    named = {name: features[..., k] for k, name in enumerate(FEATURES)}
    centre = tuple(np.argwhere(ball).mean(axis=0).round().astype(int))
    assert named["intensity_fraction"][centre] == pytest.approx(1.0, abs=0.15)  # the lesion's mean: 1
    outside_mm = ndimage.distance_transform_edt(~ball, sampling=SPACING_ZYX)
    shell = (outside_mm > 1.5) & (outside_mm <= 4.0)
    assert abs(named["intensity_fraction"][shell].mean()) < 0.05  # the surroundings' mean: 0
    raw = named["intensity_fraction_raw"]
    assert named["intensity_fraction_raw_min"][centre] <= raw[centre] <= named["intensity_fraction_raw_max"][centre]
    assert named["intensity_fraction_raw_min"][centre] == pytest.approx(raw[tuple(
        slice(c - 1, c + 2) for c in centre)].min())
    core = ndimage.distance_transform_edt(ball, sampling=SPACING_ZYX) > 3.0
    assert raw[core].std() > 1.5 * named["intensity_fraction"][core].std()  # the raw image keeps the noise
    # a contrast of 100 against noise of sd 12, less what the light smoothing keeps of it
    assert 100 / 12 < named["contrast_to_noise"][0, 0, 0] < 20


def test_features_do_not_jump_when_a_file_stores_the_spacing_in_float32():
    image, truth = ball_image(6.0)
    crop = box_crop(loose_box(truth, 3.0), SPACING_ZYX, SHAPE_ZYX)
    ball = truth[crop]
    logits = np.where(ball, 8.0, -8.0).astype(np.float32)
    box_lo, box_hi = np.argwhere(ball).min(axis=0), np.argwhere(ball).max(axis=0) + 1
    stored = tuple(float(np.float32(s)) for s in SPACING_ZYX)  # 0.800000011920929: voxels 4 mm out sit on the shell
    exact, _ = refinement_features(image.array[crop], logits, box_lo, box_hi, SPACING_ZYX)
    read, _ = refinement_features(image.array[crop], logits, box_lo, box_hi, stored)
    assert np.abs(read - exact).max() < 1e-3


def test_a_likelihood_refiner_fixes_an_overfilled_box_and_keeps_the_rest():
    image, truth = ball_image(6.0)
    box = loose_box(truth, 4.0)
    score, region = filled_box_logits(box)
    assert dice(in_grid(score, region), truth) < 0.6
    # a box that is mostly background makes the lesion's intensities far likelier inside it than outside (the
    # likelihood ratio is high on the ball), and background ones about as likely (near 0)
    by_intensity = refiner_using("likelihood_ratio_refit", threshold=2.5)
    refined, refined_region = by_intensity.refine(image.array, SPACING_ZYX, box, score, region)
    assert dice(in_grid(refined, refined_region), truth) > 0.85
    # the region covers the network's and the box's crop; beyond the crop, the network's logits are kept
    crop = box_crop(box, SPACING_ZYX, SHAPE_ZYX)
    for r, c, out in zip(region, crop, refined_region):
        assert out.start == min(r.start, c.start) and out.stop == max(r.stop, c.stop)
    unchanged = refiner_using("logit", output=0.0).refine(image.array, SPACING_ZYX, box, score, region)
    assert np.array_equal(in_grid(*unchanged), in_grid(score, region))


def test_entry_round_trips_and_bad_entries_say_how_to_fix_them():
    first, second = refiner_using("gradient", 0.5, -3.0, bias=1.5), refiner_using("logit", output=0.0, bias=-2.0)
    refiner = BoxRefiner(first.stages + second.stages)
    manifest = json.loads(json.dumps({"tasks": {"box": "net"}, "box_refinement": refiner.manifest_entry()}))
    loaded = BoxRefiner.from_manifest(manifest)
    assert [layer.output_bias for layer in loaded.stages] == [1.5, -2.0]
    assert np.array_equal(loaded.stages[0].hidden_weight, refiner.stages[0].hidden_weight)
    assert BoxRefiner.from_manifest({"tasks": {"box": "net"}}) is None
    # an entry written before stages existed is one stage
    one_stage = first.manifest_entry()["stages"][0]
    assert len(BoxRefiner.from_manifest({"box_refinement": one_stage}).stages) == 1
    for broken, message in (({**one_stage, "features": ["logit"]}, "not fitted on this version"),
                            ({k: v for k, v in one_stage.items() if k != "hidden_weight"}, "incomplete"),
                            ({**one_stage, "hidden_bias": [0.0, 1.0]}, "bad arrays"),
                            ({**one_stage, "output_bias": float("nan")}, "bad arrays"),
                            ({"stages": []}, "non-empty list"),
                            ({"stages": [one_stage, {**one_stage, "features": ["logit"]}]}, r"stage 2\) was not fitted")):
        with pytest.raises(CheckpointError, match=message) as error:
            BoxRefiner.from_manifest({"box_refinement": broken}, "model X")
        assert "fit-box-refinement" in str(error.value) and "model X" in str(error.value)


def test_a_second_stage_corrects_what_the_first_left():
    image, truth = ball_image(6.0)
    box = loose_box(truth, 3.0)
    score, region = filled_box_logits(box)
    # the first stage makes a ball-sized mask; the second one grows it by 2 mm through the signed distance
    first = refiner_using("likelihood_ratio_refit", threshold=2.5)
    grow = refiner_using("signed_distance_mm", weight=4.0, output=12.0, threshold=-2.0)
    one = in_grid(*first.refine(image.array, SPACING_ZYX, box, score, region))
    two = in_grid(*BoxRefiner(first.stages + grow.stages).refine(image.array, SPACING_ZYX, box, score, region))
    assert dice(one, truth) > 0.85
    assert one.sum() < two.sum() and not (one & ~two).any()
    assert (two & ~one).sum() > 0.5 * (ndimage.binary_dilation(one) & ~one).sum()


def shifting_conv_stage(feature: str, offset_zyx=(1, 0, 0), scale: float = 0.01) -> ConvStage:
    """A ConvStage whose output at a voxel is about the feature at the voxel `offset_zyx` (each -1, 0 or 1) away:
    small values keep both tanh layers linear."""
    count, hidden = len(FEATURES), 2
    first = np.zeros((hidden, count, 3, 3, 3))
    first[0, FEATURES.index(feature)][tuple(1 + np.asarray(offset_zyx))] = scale
    second = np.zeros((hidden, hidden, 3, 3, 3))
    second[0, 0, 1, 1, 1] = 1.0
    last = np.zeros((1, hidden, 1, 1, 1))
    last[0, 0] = 1.0 / scale
    return ConvStage(np.zeros(count), np.ones(count), [first, second, last], [np.zeros(hidden), np.zeros(hidden),
                                                                                np.zeros(1)])


def test_conv_stage_reads_the_neighbour_in_zyx_and_computes_only_around_where_asked():
    rng = np.random.default_rng(3)
    maps = rng.uniform(-1, 1, (9, 10, 11, len(FEATURES))).astype(np.float32)
    where = np.zeros(maps.shape[:3], bool)
    where[3:6, 2:5, 6:9] = True
    stage = shifting_conv_stage("gradient", (1, 0, -1))
    outputs = stage.outputs(maps, where)
    expected = maps[4:7, 2:5, 5:8, FEATURES.index("gradient")][where[3:6, 2:5, 6:9]]
    assert np.allclose(outputs, expected, atol=2e-3)
    # computing on the bounding box and HALO_VOXELS around it gives what the whole maps give, at the maps' edges too
    edge = np.zeros_like(where)
    edge[0, :2, 9:] = True
    whole = stage.outputs(maps, np.ones_like(where)).reshape(where.shape)
    assert HALO_VOXELS == 2
    assert np.allclose(stage.outputs(maps, edge), whole[edge], atol=1e-6)
    assert np.allclose(stage.outputs(maps, where), whole[where], atol=1e-6)
    assert stage.outputs(maps, np.zeros_like(where)).shape == (0,)


def test_a_conv_stage_entry_round_trips_and_bad_ones_say_how_to_fix_them():
    first = refiner_using("likelihood_ratio_refit", threshold=2.5)
    refiner = BoxRefiner(first.stages + [shifting_conv_stage("logit")])
    entry = json.loads(json.dumps(refiner.manifest_entry()))
    assert [stage.get("kind", "tanh") for stage in entry["stages"]] == ["tanh", "conv"]
    loaded = BoxRefiner.from_manifest({"box_refinement": entry})
    assert isinstance(loaded.stages[1], ConvStage)
    per_voxel, rest = loaded.split_at_conv()
    assert per_voxel.stages == loaded.stages[:1] and rest.stages == loaded.stages[1:]
    assert first.split_at_conv() == (first, None)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.stages[1].kernels, refiner.stages[1].kernels))
    image, truth = ball_image(6.0)
    box = loose_box(truth, 3.0)
    score, region = filled_box_logits(box)
    assert np.array_equal(in_grid(*loaded.refine(image.array, SPACING_ZYX, box, score, region)),
                          in_grid(*refiner.refine(image.array, SPACING_ZYX, box, score, region)))
    conv = entry["stages"][1]
    for broken, message in (({**conv, "kind": "transformer"}, "unknown kind"),
                            ({**conv, "features": ["logit"]}, "not fitted on this version"),
                            ({k: v for k, v in conv.items() if k != "kernels"}, "incomplete"),
                            ({**conv, "kernels": conv["kernels"][:2]}, "bad arrays"),
                            ({**conv, "biases": [[0.0], [0.0, 0.0], [0.0]]}, "bad arrays"),
                            ({**conv, "feature_scale": [0.0] * len(FEATURES)}, "bad arrays")):
        with pytest.raises(CheckpointError, match=message) as error:
            BoxRefiner.from_manifest({"box_refinement": {"stages": [entry["stages"][0], broken]}}, "model X")
        assert "fit-box-refinement" in str(error.value) and r"stage 2" in str(error.value)


class FillingSegmenter:
    """Stands for a box network that fills every box it is given."""

    def network_answer(self, image, box):
        return filled_box_logits(box)


def test_fit_refiner_learns_to_undo_box_filling():
    from LesionLocatorLib.training.box_refiner import fit_refiner, make_example

    rng = np.random.default_rng(1)
    examples = []
    for seed in range(14):
        radius = rng.uniform(4, 8)
        image, truth = ball_image(radius, (15 + rng.uniform(-3, 3), 45 + rng.uniform(-9, 9), 45), seed)
        examples.append(make_example(FillingSegmenter(), image, truth, loose_box(truth, rng.uniform(1, 5))))
    refiner = fit_refiner(examples[:10], hidden=4, steps=300, voxels_per_lesion=800, conv_hidden=4, conv_epochs=4)
    assert [type(stage) for stage in refiner.stages] == [TanhLayer, TanhLayer, ConvStage]
    network = np.mean([e.dice(None) for e in examples[10:]])
    refined = np.mean([e.dice(refiner) for e in examples[10:]])
    assert network < 0.7 and refined > network + 0.15
    # a convolutional stage alone learns it too, from each voxel's neighbourhood
    conv_only = fit_refiner(examples[:10], stages=0, conv_hidden=4, conv_epochs=20, conv_lr=0.03)
    assert [type(stage) for stage in conv_only.stages] == [ConvStage]
    assert np.mean([e.dice(conv_only) for e in examples[10:]]) > network + 0.1
    # kept stages stay as they are; what follows is fitted on their output
    kept = fit_refiner(examples[:10], stages=0, kept=refiner.stages[:2], conv_hidden=4, conv_epochs=4)
    assert kept.stages[:2] == refiner.stages[:2] and isinstance(kept.stages[2], ConvStage)
    # what the fitting scores is what the Segmenter's refinement gives on the whole image
    image, truth = ball_image(6.5, (16.0, 40.0, 47.0), 99)
    box = loose_box(truth, 3.0)
    example = make_example(FillingSegmenter(), image, truth, box)
    assert example.dice(refiner) == pytest.approx(dice(in_grid(*refiner.refine(
        image.array, SPACING_ZYX, box, *filled_box_logits(box))), truth), abs=1e-9)


def with_blanking_refiner(lite_root, tmp_path):
    """A copy of the bundled model whose refinement calls everything it reaches background, and its manifest."""
    root = tmp_path / "model"
    shutil.copytree(lite_root, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    manifest["box_refinement"] = refiner_using("logit", output=0.0, bias=-50.0).manifest_entry()
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    return root, manifest


def test_segmenter_refines_boxes_and_search_cubes_only_and_can_be_told_not_to(lite_root, tmp_path):
    from LesionLocatorLib.segmentation import Segmenter

    root, _ = with_blanking_refiner(lite_root, tmp_path)
    image, truth = ball_image(7.0)
    box = loose_box(truth, 1.0)
    refining = Segmenter.from_folder(root, device="cpu", point_search=False)
    plain = Segmenter.from_folder(root, device="cpu", point_search=False, box_refinement=False)
    assert plain.box_refiner is None and refining.box_refiner is not None
    assert plain.segment(image, {1: box}).masks[1].sum() > 0.5 * truth.sum()
    assert refining.segment(image, {1: box}).masks[1].sum() == 0
    click = PointPrompt((15.0, 45.0, 45.0))
    assert np.array_equal(refining.segment(image, {1: click}).masks[1], plain.segment(image, {1: click}).masks[1])
    # the point search's cubes are boxes too; the point network's own answer is not
    searching = Segmenter.from_folder(root, device="cpu")
    unrefined = Segmenter.from_folder(root, device="cpu", box_refinement=False).point_candidates(image, click)
    refined = searching.point_candidates(image, click)
    assert [c.mask.sum() == 0 for c in refined[1:]] == [True] * (len(refined) - 1)
    assert all(c.mask.any() for c in unrefined[1:])
    assert np.array_equal(refined[0].score, unrefined[0].score)


def test_point_search_refines_cubes_per_voxel_and_only_the_kept_cube_by_the_conv_stage(lite_root, tmp_path):
    from LesionLocatorLib.segmentation import Segmenter

    root = tmp_path / "model"
    shutil.copytree(lite_root, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    per_voxel = refiner_using("likelihood_ratio_refit", threshold=2.5)
    whole = BoxRefiner(per_voxel.stages + [shifting_conv_stage("logit", (1, 0, 0))])  # moves masks one slice
    manifest["box_refinement"] = whole.manifest_entry()
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    image, truth = ball_image(7.0)
    click = PointPrompt((15.0, 45.0, 45.0))
    # the cubes answer the click; they are predicted on the planned grid, as network_answer does without a fine grid
    segmenter = Segmenter.from_folder(root, device="cpu", point_extent=False, box_fine_grid=False)
    candidates = segmenter.point_candidates(image, click)
    kept = candidates[segmenter.point_search.choose(image.array, SPACING_ZYX, candidates)]
    assert isinstance(kept.prompt, BoxPrompt)
    network = segmenter.network_answer(image, kept.prompt)
    assert np.array_equal(in_grid(kept.score, kept.region),
                          in_grid(*per_voxel.refine(image.array, SPACING_ZYX, kept.prompt, *network)))
    expected = in_grid(*whole.refine(image.array, SPACING_ZYX, kept.prompt, *network))
    assert not np.array_equal(expected, in_grid(kept.score, kept.region))
    assert np.array_equal(segmenter.segment(image, {1: click}).masks[1].astype(bool), expected)
    # a box prompt gets the whole refinement
    box = loose_box(truth, 2.0)
    assert np.array_equal(segmenter.segment(image, {1: box}).masks[1].astype(bool),
                          in_grid(*whole.refine(image.array, SPACING_ZYX, box, *segmenter.network_answer(image, box))))


def test_fit_box_refinement_command_writes_a_refinement_that_loads(lite_root, tmp_path, capsys):
    from LesionLocatorLib import cli
    from LesionLocatorLib.segmentation import Segmenter

    root = tmp_path / "model"
    shutil.copytree(lite_root, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    manifest["box_refinement"] = {"features": ["an", "earlier", "version's"]}  # outdated: the fit replaces it
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    before = (root / MODEL_MANIFEST).read_text()
    with pytest.raises(CheckpointError, match="fit-box-refinement"):
        Segmenter.from_folder(root, device="cpu")
    base = ["fit-box-refinement", "-m", str(root), "--backgrounds", "body_phantom:7", "head_phantom:8",
            "--cases-per-background", "2", "--steps", "20", "--hidden", "2", "--voxels-per-lesion", "200",
            "--conv-epochs", "1", "--conv-hidden", "2", "--folds", "0"]
    assert cli.main(base + ["--dry-run", "--folds", "2"]) == 0
    assert "refined_cross_validated" in capsys.readouterr().out
    assert (root / MODEL_MANIFEST).read_text() == before  # a dry run writes nothing
    assert cli.main(base) == 0
    stages = Segmenter.from_folder(root, device="cpu").box_refiner.stages
    assert [type(stage) for stage in stages] == [TanhLayer, TanhLayer, ConvStage]
    assert "fit-point-search" in capsys.readouterr().err  # the bundled selector was fitted on unrefined cubes
    first = (root / MODEL_MANIFEST).read_text()
    assert cli.main(base + ["--hidden", "3", "--stages", "1", "--no-conv-stage"]) == 0  # keeps the one it replaces
    assert (root / "lesionlocator_model.previous.json").read_text() == first
    one = Segmenter.from_folder(root, device="cpu").box_refiner.stages
    assert [type(stage) for stage in one] == [TanhLayer]
    # --keep-stages: the manifest's per-voxel stages stay, a convolutional stage is added after them
    capsys.readouterr()
    assert cli.main(base + ["--keep-stages", "--stages", "0"]) == 0
    report = capsys.readouterr().out
    assert "kept_stages" in report and "cross_validated" not in report  # --folds 0 skips the cross-validation
    kept = Segmenter.from_folder(root, device="cpu").box_refiner.stages
    assert len(kept) == 2 and np.array_equal(kept[0].hidden_weight, one[0].hidden_weight)
    assert isinstance(kept[1], ConvStage)
    assert cli.main(base + ["--stages", "0", "--no-conv-stage"]) == 2  # nothing to fit
    assert cli.main(base + ["--stages", "-1"]) == 2
    assert cli.main(base + ["--conv-epochs", "0"]) == 2
    assert cli.main(base + ["--folds", "1"]) == 2
    assert cli.main(base + ["--backgrounds", "chest_ct_dicom"]) == 2  # a validation background
    assert cli.main(base + ["--cases-per-background", "1", "--backgrounds", "body_phantom:7"]) == 2  # too few
    (root / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"box": "net"}}))
    assert cli.main(base + ["--keep-stages"]) == 2  # no refinement to keep
    (root / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "net_point"}}))
    assert cli.main(base) == 2  # no box network to refine


def test_own_box_is_the_mask_bounding_box_in_scan_voxels_grown_by_the_margin():
    from LesionLocatorLib.tracking import TRACK_BOX_MARGIN_VOXELS, own_box

    mask = np.zeros((6, 8, 8), bool)
    mask[2:4, 0:3, 5:8] = True
    region = (slice(10, 16), slice(0, 8), slice(82, 90))  # (z, y, x) voxels of a (30, 90, 90) scan
    box = own_box(mask, region, (30, 90, 90))
    assert TRACK_BOX_MARGIN_VOXELS == 1
    assert box.lo_zyx == (11.0, 0.0, 86.0) and box.hi_zyx == (15.0, 4.0, 90.0)  # clipped at the scan's edges


def test_tracker_refines_follow_ups_only_when_the_track_task_uses_the_box_network(lite_root, tmp_path):
    from LesionLocatorLib.tracking import Tracker

    root, manifest = with_blanking_refiner(lite_root, tmp_path)
    image, truth = ball_image(7.0)
    follow_up, _ = ball_image(7.0, seed=1)
    options = dict(device="cpu", registration="classical", point_search=False)
    refining = Tracker.from_folder(root, **options)
    plain = Tracker.from_folder(root, box_refinement=False, **options)
    assert refining.box_refiner is not None and plain.box_refiner is None
    assert plain.track_step(image, follow_up, {1: truth})[1].found
    assert not refining.track_step(image, follow_up, {1: truth})[1].found
    manifest["tasks"]["track"] = "net_point"  # the refinement was fitted for the box network's answers
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    assert Tracker.from_folder(root, **options).box_refiner is None
