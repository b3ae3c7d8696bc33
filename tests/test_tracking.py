"""Tracker behaviour: shared registrations, not-found lesions, ids, re-prompts, chains, geometry, cancel."""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest

from LesionLocatorLib.errors import Cancelled, LesionLocatorError
from LesionLocatorLib.image import ImageVolume, read_image
from LesionLocatorLib.preprocessing import nonzero_bounding_box
from LesionLocatorLib.prompts import MaskPrompt, PointPrompt
from LesionLocatorLib.registration.base import Deformation, Registration
from LesionLocatorLib.tracking import Tracker, flipped_volume, preprocessed_volume
from golden import FIXTURES, require

TINY = FIXTURES / "tiny"
TRACK_INPUTS = FIXTURES / "inputs" / "A_trk"


class ResizeDeformation(Deformation):
    """Maps the moving grid onto the fixed grid by stretching (what an identity registration does here)."""

    def __init__(self, fixed_shape, empty: bool):
        self.fixed_shape, self.empty = fixed_shape, empty

    def warp_mask(self, mask_on_moving):
        if self.empty:
            return np.zeros(self.fixed_shape, np.uint8)
        index = [np.minimum((np.arange(f) * m / f).astype(int), m - 1) for f, m in zip(self.fixed_shape, mask_on_moving.shape)]
        return mask_on_moving[np.ix_(*index)].astype(np.uint8)


class CountingRegistration(Registration):
    name = "counting"

    def __init__(self, empty: bool = False):
        self.calls, self.empty = 0, empty

    def register(self, moving, fixed):
        self.calls += 1
        return ResizeDeformation(fixed.shape_zyx, self.empty)


@pytest.fixture(scope="module")
def scans() -> list[ImageVolume]:
    return [read_image(require(TRACK_INPUTS / f"A_trk_{name}.nii.gz")) for name in ("bl", "fu1", "fu2")]


def lesion_masks(image: ImageVolume, centres_zyx: dict[int, tuple[int, int, int]], radius: int = 3) -> dict[int, np.ndarray]:
    z, y, x = np.ogrid[: image.shape_zyx[0], : image.shape_zyx[1], : image.shape_zyx[2]]
    return {k: ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius ** 2).astype(np.uint8)
            for k, c in centres_zyx.items()}


FIVE_LESIONS = {2: (24, 33, 20), 7: (30, 40, 47), 11: (15, 20, 30), 300: (35, 45, 15), 301: (20, 45, 40)}


@pytest.mark.parametrize("mode", ["exact", "roi"])
def test_five_lesions_share_one_registration_per_pair(scans, mode):
    registration = CountingRegistration()
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=registration, mode=mode)
    masks = lesion_masks(scans[0], FIVE_LESIONS)
    result = tracker.track(scans, {k: MaskPrompt(m) for k, m in masks.items()})
    assert registration.calls == 2  # bl->fu1 and fu1->fu2, shared by all five lesions
    assert result.registrations_computed == 2
    assert sorted(result.lesions) == sorted(FIVE_LESIONS)  # ids with gaps and > 255 kept at every timepoint
    for history in result.lesions.values():
        assert [r.timepoint for r in history] == [0, 1, 2]


def test_registration_is_reused_across_calls_and_mirrors_multiply_it(scans):
    registration = CountingRegistration()
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=True, registration=registration, mode="exact")
    masks = lesion_masks(scans[0], {1: (24, 33, 20)})
    tracker.track_step(scans[0], scans[1], masks)
    tracker.track_step(scans[0], scans[1], lesion_masks(scans[0], {2: (30, 40, 47)}))
    assert registration.calls == 8  # one per mirror, computed once for both calls


@pytest.mark.parametrize("mode", ["exact", "roi"])
def test_empty_warped_mask_is_not_found_and_the_chain_goes_on(scans, mode):
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(empty=True),
                      mode=mode)
    result = tracker.track(scans[:2], {1: MaskPrompt(lesion_masks(scans[0], {1: (24, 33, 20)})[1])})
    record = result.lesions[1][1]
    assert not record.found and record.mask is None and "not found" in record.message
    assert record.summary()["volume_ml"] is None  # not 0 mL, which would read as a disappearance
    assert result.lesions[1][0].found


def test_an_empty_or_misplaced_mask_prompt_says_why_not_not_found(scans):
    """A user's mask that cannot be used is that mistake, not a lesion the model did not find (nor a crash later)."""
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration())
    prompts = {1: MaskPrompt(np.zeros(scans[0].shape_zyx, np.uint8)), 2: MaskPrompt(np.ones((3, 3, 3), np.uint8))}
    result = tracker.track(scans[:2], prompts)
    assert "The mask prompt is empty" in result.lesions[1][0].message
    assert "differs from the image shape" in result.lesions[2][0].message
    assert not any(record.found for history in result.lesions.values() for record in history)


def test_reprompt_at_a_follow_up_and_new_lesion(scans):
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration())
    baseline = {1: MaskPrompt(lesion_masks(scans[0], {1: (24, 33, 20)})[1])}
    result = tracker.track(scans, baseline, reprompts={1: {1: PointPrompt((24, 33, 21)), 9: PointPrompt((30, 40, 47))}})
    assert result.lesions[1][1].source == "prompted" and result.lesions[1][2].source == "tracked"
    assert [r.source for r in result.lesions[9]] == ["new", "prompted", "tracked"]
    assert not result.lesions[9][0].found and result.lesions[9][1].found


@pytest.mark.parametrize("mode", ["exact", "roi"])
def test_found_lesion_has_volume_and_physical_centre(scans, mode):
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode=mode)
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    step = tracker.track_step(scans[0], scans[1], masks)
    record = step[1]
    assert record.found and record.mask.shape == scans[1].shape_zyx
    assert np.isclose(record.volume_ml, record.mask.sum() * 27 / 1000)
    centre_index = scans[1].lps_to_index_zyx(record.centre_lps)
    assert np.linalg.norm(centre_index - np.array([24, 33, 20])) < 4
    assert np.allclose(np.asarray(record.centre_ras), np.asarray(record.centre_lps) * [-1, -1, 1])


def test_cancel_stops_tracking(scans):
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration())
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        tracker.track(scans[:2], {1: MaskPrompt(lesion_masks(scans[0], {1: (24, 33, 20)})[1])}, cancel_event=cancel)


def test_roi_mode_with_classical_registration_matches_exact_mode_on_the_same_registration(scans):
    """With an identity-like registration both modes see the same warped mask; roi predicts on a window only."""
    exact = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode="exact")
    roi = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode="roi")
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    a, b = exact.track_step(scans[0], scans[1], masks)[1], roi.track_step(scans[0], scans[1], masks)[1]
    overlap = 2 * np.logical_and(a.mask, b.mask).sum() / (a.mask.sum() + b.mask.sum())
    assert overlap > 0.8  # different grids (track spacing vs window of it), same lesion
    assert Tracker(TINY, device="cpu", folds=[0], registration="classical").mode == "roi"
    assert Tracker(TINY, device="cpu", folds=[0]).mode == "exact"  # the official network: official pipeline


def test_preprocessed_and_flipped_volumes_keep_physical_positions(scans):
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration())
    scan = tracker.scan(scans[0])
    volume = preprocessed_volume(scan.pre, scans[0], slice(0, scan.pre.grid_shape_zyx[0]))
    # preprocessed voxel i samples original index (i + 0.5) * ratio - 0.5 (+ the non-zero crop start)
    ratio = 1 / scan.pre.scale_zyx
    index = np.array([5, 40, 70])
    original = (index + 0.5) * ratio - 0.5 + [s.start for s in nonzero_bounding_box(scans[0].array)]
    assert np.allclose(volume.index_zyx_to_lps(index), scans[0].index_zyx_to_lps(original), atol=1e-4)
    flipped = flipped_volume(volume, (0, 2))
    z, y, x = volume.shape_zyx
    assert np.allclose(flipped.index_zyx_to_lps((0, 10, 0)), volume.index_zyx_to_lps((z - 1, 10, x - 1)))
    assert flipped.array[0, 10, 0] == volume.array[z - 1, 10, x - 1]


def test_caches_are_bounded():
    from LesionLocatorLib.tracking import BoundedCache

    cache = BoundedCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1  # 'a' is now the most recent
    cache["c"] = 3
    assert list(cache) == ["a", "c"]


def patch_centres(tracker: Tracker) -> list[np.ndarray]:
    """Records the U-Net patch centre of every tracking pass."""
    predictor = tracker.folds[0].predictor
    centres, predict = [], predictor.predict

    def recording(image, prompt, **options):
        centres.append(np.asarray(options["centre_zyx"]))
        return predict(image, prompt, **options)

    predictor.predict = recording
    return centres


def test_official_list_prompts_carry_the_outside_label_and_pull_the_patch(scans):
    """The official list path: voxels outside the earlier scan's body (zeros connected to the border) enter the
    prompt as -1 and the patch centre is the mean position of the prompt's non-zero voxels. Baseline instance-map
    lesions keep the plain mask; by default every lesion does."""
    def with_empty_corner(scan: ImageVolume) -> ImageVolume:  # at low x, inside the non-zero box: outside the body
        array = scan.array.copy()
        array[:, :40, :6] = 0
        return replace(scan, array=array)

    baseline, followup = with_empty_corner(scans[0]), with_empty_corner(scans[1])
    mask = lesion_masks(baseline, {1: (24, 33, 40)}, radius=4)[1]
    centres = {}
    for name, official, from_map in (("default", False, False), ("list", True, False), ("map", True, True)):
        tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(),
                          mode="exact", official_list_prompts=official)
        recorded = patch_centres(tracker)
        result = tracker.track([baseline, followup, scans[2]], {1: MaskPrompt(mask > 0, from_instance_map=from_map)})
        assert all(r.found for r in result.lesions[1])
        centres[name] = recorded
    scan = Tracker(TINY, device="cpu", folds=[0], registration=CountingRegistration()).scan(baseline)
    lesion_x = (40 + 0.5) * scan.pre.scale_zyx[2] - 0.5
    assert abs(centres["default"][0][2] - lesion_x) <= 2  # centred on the lesion
    assert centres["list"][0][2] < lesion_x - 10  # pulled towards the empty corner
    assert np.array_equal(centres["map"][0], centres["default"][0])  # an instance map is read without the label
    assert centres["map"][1][2] < centres["default"][1][2] - 10  # ...but the next pair reads the written file


def test_official_list_prompts_need_the_exact_pipeline():
    require(TINY / "LesionLocatorTrack")
    with pytest.raises(LesionLocatorError, match="exact"):
        Tracker(TINY, device="cpu", folds=[0], registration="classical", official_list_prompts=True)


def test_bf16_reaches_both_unets_and_changes_only_boundary_voxels(scans):
    """cpu_bf16 (the CLI's --bf16) runs the tracking U-Net and the segmentation U-Net in bfloat16."""
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    results = {}
    for bf16 in (False, True):
        tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(),
                          mode="roi", cpu_bf16=bf16)
        assert tracker.folds[0].predictor.settings.cpu_bf16 is bf16
        assert tracker.segmenter.cpu_bf16 is bf16
        results[bf16] = tracker.track_step(scans[0], scans[1], masks)[1].mask.astype(bool)
    overlap = 2 * np.sum(results[False] & results[True]) / (results[False].sum() + results[True].sum())
    assert results[False].any() and overlap > 0.95
