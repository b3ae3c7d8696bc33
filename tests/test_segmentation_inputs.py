"""The Segmenter API and command line on good and bad inputs (tiny official-format checkpoints)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib import cli
from LesionLocatorLib.errors import LesionLocatorError, PromptError
from LesionLocatorLib.image import ImageVolume, read_image, write_volume
from LesionLocatorLib.prompts import (
    BoxPrompt, MaskPrompt, PointPrompt, dense_point, lesions_from_label_image, load_prompt_json, split_instance_mask,
)
from LesionLocatorLib.segmentation import Segmenter
from LesionLocatorLib.tracking import flipped_volume
from golden import FIXTURES, dice, require

TINY = FIXTURES / "tiny"
IMAGE = FIXTURES / "inputs" / "A_ts1" / "image" / "A_ts1.nii.gz"
GT = FIXTURES / "inputs" / "A_ts1" / "gt" / "A_ts1_gt_inst.nii.gz"
LESION_1_ZYX = (24.15, 33.10, 19.97)
LESION_2_ZYX = (30.08, 40.00, 47.14)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_folder(require(TINY), device="cpu", preset="fast")


@pytest.fixture(scope="module")
def image() -> ImageVolume:
    return read_image(require(IMAGE))


def test_point_ball_has_739_voxels():
    assert dense_point((10, 10, 10), (21, 21, 21)).sum() == 739
    assert dense_point((0, 0, 0), (21, 21, 21)).sum() < 739  # clipped at the border, no wrap-around


def test_bad_prompts_fail_alone_and_others_still_run(segmenter, image):
    prompts = {
        1: PointPrompt(LESION_1_ZYX),
        2: PointPrompt((24, 33, 500)),  # outside
        3: BoxPrompt((20, 30, 16), (20, 38, 25)),  # empty along z
        4: BoxPrompt((29, 38, 25), (20, 30, 16)),  # inverted
        5: BoxPrompt((100, 100, 100), (120, 120, 120)),  # outside
        6: MaskPrompt(np.zeros(image.shape_zyx, np.uint8)),  # empty
        7: MaskPrompt(np.zeros((3, 3, 3), np.uint8)),  # wrong grid
    }
    result = segmenter.segment(image, prompts)
    assert sorted(result.masks) == [1]
    assert result.masks[1].sum() > 50
    assert "Point (z, y, x) = (24, 33, 500) lies outside the image" in result.errors[2]
    assert "zero width on z " in result.errors[3]
    assert "(29, 38, 25)..(20, 30, 16) is inverted on z, y, x" in result.errors[4]
    assert "outside the image" in result.errors[5] and "Draw the box" in result.errors[5]
    assert not any("np." in message for message in result.errors.values())  # plain numbers, not NumPy reprs
    assert "empty" in result.errors[6]
    assert "shape" in result.errors[7]


def test_box_partly_outside_is_clipped(segmenter, image):
    result = segmenter.segment(image, {1: BoxPrompt((20, 30, -5), (29, 38, 25))})
    assert result.masks[1].sum() > 50 and not result.errors


def test_physical_prompts_in_lps_and_ras_match_voxel_prompts(segmenter, image):
    lps = image.index_zyx_to_lps(LESION_2_ZYX)
    ras = image.index_zyx_to_ras(LESION_2_ZYX)
    by_voxel = segmenter.segment(image, {2: PointPrompt(LESION_2_ZYX)}).masks[2]
    by_lps = segmenter.segment(image, {2: PointPrompt.from_physical(image, lps, "LPS")}).masks[2]
    by_ras = segmenter.segment(image, {2: PointPrompt.from_physical(image, ras, "RAS")}).masks[2]
    assert np.array_equal(by_voxel, by_lps) and np.array_equal(by_voxel, by_ras)
    box = BoxPrompt.from_physical(image, image.index_zyx_to_ras((20, 30, 16)), image.index_zyx_to_ras((28, 37, 24)), "RAS")
    assert box.lo_zyx == (20, 30, 16) and box.hi_zyx == (29, 38, 25)  # the voxel centres inside, half-open


def test_instance_masks_with_gaps_and_large_ids(segmenter, image):
    gt = read_image(require(FIXTURES / "inputs" / "A_ts1" / "gt" / "A_ts1_gt_inst.nii.gz")).array
    labels = np.where(gt == 1, 7, np.where(gt == 2, 300, 0)).astype(np.uint16)
    masks = split_instance_mask(labels)
    assert sorted(masks) == [7, 300]
    result = segmenter.segment(image, {k: MaskPrompt(v) for k, v in masks.items()})
    assert sorted(result.masks) == [7, 300]
    for lesion_id, truth in ((7, gt == 1), (300, gt == 2)):
        assert dice(result.masks[lesion_id], truth) > 0.5


def test_binary_mask_is_split_into_connected_lesions():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[6:9, 6:9, 6:9] = 1
    masks = split_instance_mask(labels)
    assert sorted(masks) == [1, 2]
    assert sorted(int(m.sum()) for m in masks.values()) == [8, 27]
    for value in (255, 7):  # any single non-zero value is binary (a 0/255 export), numbered 1..N as 0/1 is
        other = split_instance_mask(labels * value)
        assert sorted(other) == [1, 2] and all(np.array_equal(other[k], masks[k]) for k in masks)
    with pytest.raises(PromptError, match="empty"):
        split_instance_mask(np.zeros((3, 3, 3)))


def test_an_instance_map_on_another_grid_is_resampled_and_lesions_outside_are_errors(image):
    gt = read_image(require(GT)).array
    labels = np.where(gt == 1, 7, np.where(gt == 2, 300, 0)).astype(np.uint16)
    # the map's voxel (0, 0, 0) lies on the image's (0, 0, 20): lesion 7 (x 20 -> 40) stays, 300 (x 47 -> 67) leaves
    shifted = replace(image, array=labels, origin_lps=tuple(image.index_zyx_to_lps((0, 0, 20))))
    masks, errors, note = lesions_from_label_image(shifted, image, "map.nii.gz")
    assert sorted(masks) == [7] and np.array_equal(masks[7][:, :, 20:], labels[:, :, :44] == 7)
    assert errors == {300: "lesion 300 of map.nii.gz lies outside the image"}
    assert "map.nii.gz is not on the image's grid (origin (LPS)" in note and "resampled onto it" in note
    assert lesions_from_label_image(image.with_array(labels), image, "same.nii.gz")[1:] == ({}, "")


def test_prompt_json_accepts_strings_and_numbers_and_reports_bad_lesions(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"1": {"point": ["1.5", 2, 3]}, "2": {"box": [1, 2, 3, 4, 5, 6]},
                                "3": {"point": [1, 2]}, "4": {"circle": [1]}, "5": {"point": ["a", "b", "c"]}}))
    prompts, errors = load_prompt_json(path)
    assert prompts[1] == PointPrompt((1.5, 2.0, 3.0))
    assert prompts[2] == BoxPrompt((1, 3, 5), (2, 4, 6))
    assert sorted(errors) == [3, 4, 5]
    path.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompt_json(path)


@pytest.mark.parametrize("text, message", [
    ('{"1": {"point": [1, 2, 3]}, "01": {"box": [1, 2, 3, 4, 5, 6]}}', "the ids '1' and '01' both name lesion 1"),
    ('{"1": {"point": [1, 2, 3]}, "1": {"box": [1, 2, 3, 4, 5, 6]}}', "the key(s) 1 appear more than once"),
    ('{"0": {"point": [1, 2, 3]}}', "lesion ids must be 1 or more (0 is the background); got '0'"),
    ('{"-2": {"point": [1, 2, 3]}}', "lesion ids must be 1 or more (0 is the background); got '-2'"),
])
def test_prompt_json_with_a_lesion_named_twice_or_a_non_positive_id_is_refused(tmp_path: Path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PromptError) as error:
        load_prompt_json(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_prompt_json_entry_with_both_a_point_and_a_box_is_an_error(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text('{"1": {"point": [1, 2, 3], "box": [1, 2, 3, 4, 5, 6]}, "2": {"point": [1, 2, 3]}}')
    prompts, errors = load_prompt_json(path)
    assert sorted(prompts) == [2] and "both a 'point' and a 'box'" in errors[1]


def test_probabilities_and_no_nan_outside_the_patch(segmenter, image):
    result = segmenter.segment(image, {1: PointPrompt(LESION_1_ZYX)}, return_probabilities=True)
    probability = result.probabilities[1]
    assert probability.shape == image.shape_zyx and np.isfinite(probability).all()
    assert np.array_equal(probability > 0.5, result.masks[1] > 0)
    assert probability[0, 0, 0] < 0.01  # far from the prompt: background, not NaN


def test_roi_mode_matches_exact_mode_on_a_flipped_direction_image(image):
    exact = Segmenter.from_folder(TINY, device="cpu", preset="fast", mode="exact").segment(
        image, {1: PointPrompt(LESION_1_ZYX)})
    roi = Segmenter.from_folder(TINY, device="cpu", preset="fast", mode="roi").segment(
        image, {1: PointPrompt(LESION_1_ZYX)})
    assert dice(exact.masks[1], roi.masks[1]) >= 0.97


def test_image_smaller_than_patch_is_padded(segmenter, image):
    small = ImageVolume(image.array[18:30, 25:45, 10:30], image.spacing_xyz, image.origin_lps, image.direction_lps)
    result = segmenter.segment(small, {1: PointPrompt((6.15, 8.1, 9.97))})
    assert result.masks[1].shape == small.shape_zyx and result.masks[1].sum() > 20


def test_presets_and_options(image):
    fast = Segmenter.from_folder(TINY, device="cpu", preset="fast")
    fast.segment(image, {1: PointPrompt(LESION_1_ZYX)})
    assert fast.model_for("point").predictor.forward_passes == 1
    accurate = Segmenter.from_folder(TINY, device="cpu", preset="accurate")
    assert accurate.use_tta and len(accurate.model_for("point").predictor.networks) == 2
    with pytest.raises(LesionLocatorError, match="preset"):
        Segmenter.from_folder(TINY, preset="turbo")
    with pytest.raises(LesionLocatorError, match="mode"):
        Segmenter.from_folder(TINY, mode="fastest")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(LesionLocatorError, match="no CUDA GPU"):
            Segmenter.from_folder(TINY, device="cuda")


def test_cli_never_overwrites_and_can_continue(tmp_path: Path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}, "2": {"point": [0, 0, 999]}}))
    command = ["segment", "-i", str(require(IMAGE)), "-p", str(prompts), "-o", str(tmp_path / "out"), "-t", "point",
               "-m", str(require(TINY)), "-device", "cpu", "--preset", "fast", "--disable_progress_bar"]
    assert cli.main(command) == 1  # lesion 2 failed, reported, lesion 1 written
    assert "lesion 2 skipped" in capsys.readouterr().err
    written = tmp_path / "out" / "A_ts1_lesion_1.nii.gz"
    before = written.read_bytes()
    assert cli.main(command) == 2
    assert "already exists" in capsys.readouterr().err and written.read_bytes() == before
    assert cli.main(command + ["--continue_prediction"]) == 1  # lesion 1 kept, lesion 2 retried and reported again
    err = capsys.readouterr().err
    assert "lesion(s) 1 already segmented, kept" in err and "lesion 2 skipped" in err
    assert cli.main(command + ["--overwrite"]) == 1


def segment_command(image: Path, prompts: Path, output: Path, *extra: str) -> list[str]:
    return ["segment", "-i", str(image), "-p", str(prompts), "-o", str(output), "-t", "box", "-m", str(require(TINY)),
            "-device", "cpu", "--preset", "fast", "--disable_progress_bar", *extra]


def test_cli_continue_prediction_segments_only_the_missing_lesions(tmp_path: Path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}}))
    out = tmp_path / "out"
    assert cli.main(segment_command(require(IMAGE), prompts, out)) == 0
    first = (out / "A_ts1_lesion_1.nii.gz").read_bytes()
    prompts.write_text(json.dumps({"1": {"box": [20, 29, 30, 38, 16, 25]}, "2": {"point": list(LESION_2_ZYX)}}))
    assert cli.main(segment_command(require(IMAGE), prompts, out, "--continue_prediction")) == 0
    assert "lesion(s) 1 already segmented, kept" in capsys.readouterr().err
    assert (out / "A_ts1_lesion_1.nii.gz").read_bytes() == first
    assert read_image(out / "A_ts1_lesion_2.nii.gz").array.sum() > 20
    assert cli.main(segment_command(require(IMAGE), prompts, out, "--continue_prediction")) == 0
    assert "lesion(s) 1, 2 already segmented" in capsys.readouterr().err


def test_cli_resamples_a_mask_prompt_stored_on_another_grid(tmp_path: Path, capsys):
    """The same mask stored mirrored (array flipped in y and x, direction flipped) labels the same voxels: it must
    give the same lesions as the original, not be read voxel by voxel; a mask elsewhere is refused."""
    gt = read_image(require(GT))
    mirrored = flipped_volume(gt, (1, 2))
    write_volume(mirrored.array, mirrored, tmp_path / "mirrored.nii.gz")
    assert cli.main(segment_command(require(IMAGE), GT, tmp_path / "a")) == 0
    assert cli.main(segment_command(require(IMAGE), tmp_path / "mirrored.nii.gz", tmp_path / "b")) == 0
    assert "mirrored.nii.gz is not on the image's grid" in capsys.readouterr().err
    for lesion_id in (1, 2):
        name = f"A_ts1_lesion_{lesion_id}.nii.gz"
        assert np.array_equal(read_image(tmp_path / "a" / name).array, read_image(tmp_path / "b" / name).array)
    far = replace(gt, origin_lps=tuple(np.add(gt.origin_lps, 1000.0)))
    write_volume(far.array, far, tmp_path / "far.nii.gz")
    assert cli.main(segment_command(require(IMAGE), tmp_path / "far.nii.gz", tmp_path / "c")) == 2
    assert "does not overlap the image" in capsys.readouterr().err and not list((tmp_path / "c").iterdir())


def test_cli_never_pairs_an_image_with_itself_and_refuses_ambiguous_prompts(tmp_path: Path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(require(IMAGE), cases / "A_ts1.nii.gz")
    (cases / "A_ts1.json").write_text(json.dumps({"3": {"point": list(LESION_1_ZYX)}}))
    assert cli.main(segment_command(cases, cases, tmp_path / "out")) == 0  # one folder for -i and -p
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["A_ts1_lesion_3.nii.gz"]
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    shutil.copy(cases / "A_ts1.json", prompts / "A_ts1.json")
    shutil.copy(require(GT), prompts / "A_ts1.nii.gz")
    assert cli.main(segment_command(cases, prompts, tmp_path / "o2")) == 2
    assert "A_ts1.json and A_ts1.nii.gz in" in capsys.readouterr().err
    assert cli.main(segment_command(require(IMAGE), require(IMAGE), tmp_path / "o3")) == 2
    assert "is the image itself" in capsys.readouterr().err


def test_cli_refuses_two_images_of_one_name(tmp_path: Path, capsys):
    images, prompts = tmp_path / "images", tmp_path / "prompts"
    images.mkdir(), prompts.mkdir()
    shutil.copy(require(IMAGE), images / "A_ts1.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(IMAGE)), str(images / "A_ts1.nrrd"))
    (prompts / "A_ts1.json").write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}}))
    assert cli.main(segment_command(images, prompts, tmp_path / "out", "--overwrite")) == 2
    assert "A_ts1.nii.gz and A_ts1.nrrd in" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_bad_output_and_input_paths_are_clear_errors(tmp_path: Path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}}))
    (tmp_path / "outfile").write_text("")
    for output, message in (("outfile", "outfile is a file"), ("outfile/sub", "lies under the file")):
        assert cli.main(segment_command(require(IMAGE), prompts, tmp_path / output)) == 2
        assert message in capsys.readouterr().err
    folder = tmp_path / "pdir"
    folder.mkdir()
    for prompt in (folder, prompts):  # -i an existing file that is not an image
        assert cli.main(segment_command(prompts, prompt, tmp_path / "o")) == 2
        assert "p.json is not an image" in capsys.readouterr().err


def test_cli_never_overwrites_its_own_input_and_an_empty_prompt_file_fails(tmp_path: Path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    prompt = out / "A_ts1_lesion_1.nii.gz"  # a mask named like an output, in -o
    shutil.copy(require(GT), prompt)
    assert cli.main(segment_command(require(IMAGE), prompt, out, "--overwrite")) == 2
    assert "is an input of this run" in capsys.readouterr().err
    assert prompt.read_bytes() == require(GT).read_bytes()
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert cli.main(segment_command(require(IMAGE), empty, tmp_path / "o")) == 1
    assert "no prompt in file" in capsys.readouterr().err


def test_cli_notes_prompts_of_the_other_kind_than_its_prompt_type(tmp_path: Path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}, "2": {"box": [26, 34, 36, 44, 43, 51]},
                                   "3": {"point": list(LESION_2_ZYX)}}))
    command = ["segment", "-i", str(require(IMAGE)), "-p", str(prompts), "-o", str(tmp_path / "out"), "-m",
               str(require(TINY)), "-device", "cpu", "--preset", "fast", "--disable_progress_bar"]
    assert cli.main(command + ["-t", "box"]) == 0
    err = capsys.readouterr().err
    assert "lesion(s) 1, 3 have point prompts although -t is box" in err and "Give -t point" in err
    assert cli.main(command + ["-t", "point", "--overwrite"]) == 0
    assert "lesion(s) 2 have box prompts although -t is point" in capsys.readouterr().err


def test_cli_reads_a_dicom_series_folder(tmp_path: Path):
    from golden import SHARED

    dicom = require(SHARED / "data" / "totalsegmentator_examples" / "example_ct_dicom")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"box": [8, 12, 240, 280, 240, 280]}}))
    assert cli.main(["segment", "-i", str(dicom), "-p", str(prompts), "-o", str(tmp_path / "o"), "-t", "box",
                     "-m", str(TINY), "-device", "cpu", "--preset", "fast", "--disable_progress_bar"]) == 0
    output = read_image(tmp_path / "o" / "example_ct_dicom_lesion_1.nii.gz")
    assert output.shape_zyx == (20, 512, 512)


def test_roi_mode_handles_boxes_at_the_patch_size_like_exact_mode():
    """Boxes whose grid extent lands within a few voxels of the patch (48 voxels in z for the bundled model):
    floor/ceil and the box margin can push them over, into sliding-window tiles that roi's window must hold."""
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR

    spacing_zyx = (1.02487, 1.004056, 1.004056)  # a head phantom that once made roi mode fail
    rng = np.random.default_rng(3)
    array = rng.normal(0, 30, (132, 205, 166)).astype(np.float32)
    image = ImageVolume(array, spacing_zyx[::-1], (0.0, 0.0, 0.0), np.eye(3))
    roi = Segmenter.from_folder(BUNDLED_LITE_DIR, device="cpu", preset="fast", mode="roi")
    exact = Segmenter.from_folder(BUNDLED_LITE_DIR, device="cpu", preset="fast", mode="exact")
    boxes = {number: BoxPrompt((18.0 + number / 3, 92, 24), (18.0 + number / 3 + extent_z, 178, 96))
             for number, extent_z in enumerate(range(87, 91))}
    roi_masks, exact_masks = roi.segment(image, boxes).masks, exact.segment(image, boxes).masks
    assert sorted(roi_masks) == sorted(boxes)
    for lesion_id in boxes:
        assert np.array_equal(roi_masks[lesion_id], exact_masks[lesion_id]), lesion_id


def test_nonzero_bounding_box_matches_a_scan_of_every_voxel():
    from LesionLocatorLib.preprocessing import nonzero_bounding_box

    def scanned(array):
        found = np.argwhere(array != 0)
        if not len(found):
            return tuple(slice(0, n) for n in array.shape)
        return tuple(slice(int(a), int(b) + 1) for a, b in zip(found.min(axis=0), found.max(axis=0)))

    rng = np.random.default_rng(0)
    ct = np.full((7, 9, 11), -1000.0)  # air on every face: the whole image
    padded = np.zeros((7, 9, 11))
    padded[1:6, 2:9, 3:10] = rng.normal(size=(5, 7, 7))  # zero padding around a scan
    one_face = np.zeros((7, 9, 11))
    one_face[0] = 1  # five faces touched, the last z face not
    single = np.zeros((7, 9, 11))
    single[3, 0, 10] = 5
    for array in (ct, padded, one_face, single, np.zeros((4, 5, 6))):
        assert nonzero_bounding_box(array) == scanned(array)


@pytest.mark.parametrize("mode", ["roi", "exact"])
def test_a_box_in_the_zero_valued_border_fails_alone(image, mode):
    array = image.array.copy()
    array[:10] = 0  # zero slices, cropped away by nnU-Net
    prompts = {1: BoxPrompt((20, 30, 16), (29, 38, 25)), 2: BoxPrompt((2, 30, 16), (6, 38, 25))}
    result = Segmenter.from_folder(require(TINY), device="cpu", preset="fast", mode=mode).segment(
        image.with_array(array), prompts)
    assert sorted(result.masks) == [1] and result.masks[1].sum() > 50
    assert "zero-valued border" in result.errors[2] and "not 0" in result.errors[2]


def test_a_click_in_the_zero_valued_border_fails_alone_with_the_point_search():
    """The bundled Lite model's point search: its cubes around such a click lie wholly in the border too."""
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR

    rng = np.random.default_rng(0)
    array = rng.normal(-50, 10, (40, 64, 64))
    array[15:25, 27:37, 27:37] += 130
    array[:10] = 0
    image = ImageVolume(array.astype(np.int16), (1.0, 1.0, 3.0))
    segmenter = Segmenter.from_folder(BUNDLED_LITE_DIR, device="cpu", preset="fast", point_extent=False)
    result = segmenter.segment(image, {1: PointPrompt((4, 32, 32)), 2: PointPrompt((20, 32, 32))})
    assert sorted(result.masks) == [2] and result.masks[2].sum() > 50
    assert "Point (z, y, x) = (4, 32, 32) lies in the image's zero-valued border" in result.errors[1]


@pytest.mark.parametrize("mode", ["roi", "exact"])
def test_nan_voxels_count_as_the_image_minimum_with_a_warning(image, mode):
    segmenter = Segmenter.from_folder(require(TINY), device="cpu", preset="fast", mode=mode)
    clean = image.with_array(image.array.astype(np.float32))
    array = clean.array.copy()
    array[0, 0, 0] = np.nan  # far from the lesion; it used to empty every mask
    prompts = {1: PointPrompt(LESION_1_ZYX)}
    with pytest.warns(UserWarning, match="1 NaN voxel"):
        result = segmenter.segment(clean.with_array(array), prompts)
    assert np.array_equal(result.masks[1], segmenter.segment(clean, prompts).masks[1])
    with pytest.raises(LesionLocatorError, match="only NaN"):
        segmenter.segment(clean.with_array(np.full_like(array, np.nan)), prompts)


def test_roi_mode_matches_exact_mode_next_to_a_zero_valued_border(image):
    """nnU-Net crops zero-valued borders away before resampling: roi's window must lie inside that crop, or it is
    zero-padded where the whole grid holds image data."""
    array = image.array.copy()
    array[:, :, :12] = 0
    array[:8] = 0
    zero_bordered = image.with_array(array)
    prompts = {1: PointPrompt(LESION_1_ZYX), 2: PointPrompt((10, 33, 13)), 3: BoxPrompt((8, 28, 12), (20, 40, 26))}
    roi, exact = (Segmenter.from_folder(require(TINY), device="cpu", preset="fast", mode=mode).segment(zero_bordered, prompts)
                  for mode in ("roi", "exact"))
    for lesion_id in prompts:
        assert np.array_equal(roi.masks[lesion_id], exact.masks[lesion_id]), lesion_id


def test_a_mask_read_as_a_point_is_centred_where_exact_mode_centres_it():
    """The official code rounds the resampled mask's centroid on the whole grid (halves to even); rounding it in
    the window's coordinates moved the ball one voxel wherever the window starts at an odd grid index."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices((24, 100, 100))
    sphere = ((z - 12) * 5.0) ** 2 + ((y - 50) * 0.5) ** 2 + ((x - 50) * 0.5) ** 2 < 12.0 ** 2
    array = np.where(sphere, 80, -50) + rng.normal(0, 10, sphere.shape)
    image = ImageVolume(array.astype(np.int16), (0.5, 0.5, 5.0))
    prompts = {}
    for z0 in (8, 10, 12):  # 2-slice masks: their centroids sit at .5 on the grid
        mask = np.zeros(image.shape_zyx, np.uint8)
        mask[z0:z0 + 2, 44:56, 44:56] = 1
        prompts[z0] = MaskPrompt(mask)
    roi, exact = (Segmenter.from_folder(require(TINY), device="cpu", preset="fast", mode=mode, mask_prompt_as="point")
                  .segment(image, prompts) for mode in ("roi", "exact"))
    for lesion_id in prompts:
        assert np.array_equal(roi.masks[lesion_id], exact.masks[lesion_id]), lesion_id


def test_roi_mode_tiles_a_large_box_like_exact_mode_when_another_axis_is_padded():
    """A grid thinner than the patch on z (padded) and a box longer than the patch on y (sliding window): roi's
    tiles must sit where they sit on the whole padded grid."""
    rng = np.random.default_rng(2)
    z, y, x = np.indices((25, 100, 43))
    sphere = ((z - 12) * 0.8) ** 2 + ((y - 50) * 3.0) ** 2 + ((x - 21) * 1.5) ** 2 < 12.0 ** 2
    image = ImageVolume((np.where(sphere, 80, -50) + rng.normal(0, 10, sphere.shape)).astype(np.int16), (1.5, 3.0, 0.8))
    prompts = {1: BoxPrompt((12, 14, 34), (24, 36, 43))}
    roi, exact = (Segmenter.from_folder(require(TINY), device="cpu", preset="fast", mode=mode).segment(image, prompts)
                  for mode in ("roi", "exact"))
    assert np.array_equal(roi.masks[1], exact.masks[1])


def test_masked_z_score_plans_normalize_as_nnunet_in_both_modes(tmp_path: Path):
    """nnU-Net's usual MR setting (ZScoreNormalization, use_mask_for_norm): statistics inside the hole-filled
    non-zero mask, 0 outside it; exact mode used to crash and roi to normalize the background too."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

    root = tmp_path / "mr_model"
    shutil.copytree(require(TINY), root)
    plans_path = root / "LesionLocatorSeg" / "point_optimized" / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[True])
    plans_path.write_text(json.dumps(plans))
    rng = np.random.default_rng(0)
    z, y, x = np.indices((40, 64, 64))
    body = (y - 32) ** 2 + (x - 32) ** 2 < 28 ** 2
    array = np.where(body, 900 + 100 * ((z - 20) ** 2 + (y - 32) ** 2 + (x - 32) ** 2 < 64), 0)
    image = ImageVolume((array + body * rng.normal(0, 10, body.shape)).astype(np.float32), (1.0, 1.0, 3.0))
    roi, exact = (Segmenter.from_folder(root, device="cpu", preset="fast", mode=mode) for mode in ("roi", "exact"))
    prompts = {1: PointPrompt((20, 32, 32))}
    assert np.array_equal(roi.segment(image, prompts).masks[1], exact.segment(image, prompts).masks[1])

    data, seg, bbox = crop_to_nonzero(image.array[None].copy())
    reference = ZScoreNormalization(use_mask_for_norm=True, intensityproperties={}).run(data[0], seg[0])
    ours = exact.model_for("point").preprocessor.normalize_crop(image.array[tuple(slice(a, b) for a, b in bbox)])
    assert np.allclose(ours, reference, atol=1e-5)
