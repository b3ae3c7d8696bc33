"""Tracker behaviour: shared registrations, not-found lesions, ids, re-prompts, chains, geometry (scans stored along
other axes), cancel, progress."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.errors import Cancelled, LesionLocatorError
from LesionLocatorLib.image import ImageVolume, read_image
from LesionLocatorLib.preprocessing import nonzero_bounding_box
from LesionLocatorLib.prompts import MaskPrompt, PointPrompt
from LesionLocatorLib.registration.base import Deformation, Registration
from LesionLocatorLib.tracking import Tracker, flipped_volume, oriented_like, preprocessed_volume
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
def test_a_nan_voxel_in_the_follow_up_does_not_empty_the_answer(scans, mode):
    """NaN would spread over the whole preprocessed scan: it counts as the scan's minimum, with a warning."""
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode=mode)
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    values = scans[1].array.astype(np.float32)
    values[0, 0, 0] = np.nan
    with pytest.warns(UserWarning, match="1 NaN voxel"):
        step = tracker.track_step(scans[0], scans[1].with_array(values), masks)
    assert step[1].found and np.array_equal(step[1].mask, tracker.track_step(scans[0], scans[1], masks)[1].mask)


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


# --- scans stored along other axes (exact mode registers arrays) --------------------------------------------------
def stored_along(volume: ImageVolume, axes_zyx: tuple[int, int, int], flips_zyx: tuple[int, ...]) -> ImageVolume:
    """The same physical scan with its array axes transposed (new axis a = old axis axes_zyx[a]), then flipped."""
    source_xyz = [2 - a for a in axes_zyx[::-1]]
    transposed = ImageVolume(np.transpose(volume.array, axes_zyx), np.asarray(volume.spacing_xyz)[source_xyz],
                             volume.origin_lps, volume.direction_lps[:, source_xyz])
    return flipped_volume(transposed, flips_zyx)


def nearest_onto(mask: np.ndarray, image: ImageVolume, grid: ImageVolume) -> np.ndarray:
    """A mask on `image` resampled in physical space onto `grid` (exact where voxel centres coincide)."""
    reference = grid.to_sitk(np.zeros(grid.shape_zyx, np.uint8))
    return sitk.GetArrayFromImage(sitk.Resample(image.to_sitk(mask.astype(np.uint8)), reference, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0))


@pytest.mark.parametrize("axes_zyx, flips_zyx", [((0, 1, 2), (2,)), ((1, 0, 2), (0, 2))])
def test_a_follow_up_stored_along_other_axes_is_tracked_to_the_same_physical_place(scans, axes_zyx, flips_zyx):
    """Exact mode registers arrays (GradICON; the counting stub stretches index to index): a follow-up stored
    mirrored or permuted is reoriented losslessly first, so its answer is the same-storage answer, voxel for voxel."""
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    same = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(),
                   mode="exact").track_step(scans[0], scans[1], masks)[1]
    other = stored_along(scans[1], axes_zyx, flips_zyx)
    record = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(),
                     mode="exact").track_step(scans[0], other, masks)[1]
    assert same.found and record.mask.shape == other.shape_zyx
    assert np.array_equal(record.mask, nearest_onto(same.mask, scans[1], other))
    assert np.allclose(record.centre_lps, same.centre_lps, atol=1e-3)


def test_a_follow_up_rotated_off_the_axes_is_resampled_along_the_earlier_scans_axes(scans):
    """A 30 degree rotation is no axis permutation: the follow-up is resampled onto the earlier scan's axes (here the
    earlier scan is that very resampling, so the stretching stub is exact) and the answer goes back by nearest
    neighbour onto the follow-up's own grid, at the lesion's physical place."""
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    later = replace(scans[1], direction_lps=rotation @ scans[1].direction_lps)
    earlier, to_later_grid = oriented_like(later, scans[1].direction_lps)
    assert np.allclose(earlier.direction_lps, scans[1].direction_lps) and earlier.shape_zyx != later.shape_zyx
    lesion_lps = later.index_zyx_to_lps((24, 33, 20))
    masks = lesion_masks(earlier, {1: tuple(np.round(earlier.lps_to_index_zyx(lesion_lps)).astype(int))}, radius=4)
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode="exact")
    on_earlier = tracker.track_step(earlier, earlier, masks)[1]
    record = tracker.track_step(earlier, later, masks)[1]
    assert record.found and np.array_equal(record.mask, to_later_grid(on_earlier.mask))
    assert np.linalg.norm(np.asarray(record.centre_lps) - lesion_lps) < 6  # two voxels


def test_reorientation_keeps_every_voxel_and_maps_masks_back(scans):
    other = stored_along(scans[1], (2, 0, 1), (1,))
    aligned, to_other_grid = oriented_like(other, scans[1].direction_lps)
    assert aligned.same_grid(scans[1]) and np.array_equal(aligned.array, scans[1].array)
    mask = lesion_masks(scans[1], {1: (24, 33, 20)})[1]
    assert np.array_equal(to_other_grid(mask), nearest_onto(mask, scans[1], other))
    same, identity = oriented_like(scans[1], scans[1].direction_lps)
    assert same is scans[1] and identity(mask) is mask  # the golden path is untouched


def test_gradicon_tracks_a_mirrored_follow_up_like_the_same_storage(scans):
    """The tiny checkpoint's registration network (on a small grid): the follow-up stored with x mirrored gets the
    same answer as stored as it is (before, the lesion was found at its mirror image, 70 mm away)."""
    from LesionLocatorLib.checkpoint import load_checkpoint_folder
    from LesionLocatorLib.registration.gradicon import GradICONRegistration

    weights = load_checkpoint_folder(TINY / "LesionLocatorTrack", [0]).fold_weights[0]
    registration = GradICONRegistration.from_track_state_dict(weights, input_shape=(65, 65, 65))
    masks = lesion_masks(scans[0], {1: (24, 33, 20)}, radius=4)
    records = [Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=registration, mode="exact")
               .track_step(scans[0], followup, masks)[1] for followup in (scans[1], flipped_volume(scans[1], (2,)))]
    assert records[0].found and np.array_equal(records[1].mask, np.flip(records[0].mask, 2))


# --- refused combinations, caches, messages, progress, counts -----------------------------------------------------
def test_roi_mode_refuses_the_registration_network():
    require(TINY / "LesionLocatorTrack")
    with pytest.raises(LesionLocatorError, match="mode='exact'"):
        Tracker(TINY, device="cpu", folds=[0], mode="roi")


@pytest.fixture
def five_fold_root(tmp_path) -> Path:
    """The tiny model with its Track fold 0 as five folds (the official checkpoint has five)."""
    require(TINY / "LesionLocatorTrack")
    root = tmp_path / "five"
    (root / "LesionLocatorTrack").mkdir(parents=True)
    (root / "LesionLocatorSeg").symlink_to(TINY / "LesionLocatorSeg")
    for name in ("plans.json", "dataset.json"):
        (root / "LesionLocatorTrack" / name).symlink_to(TINY / "LesionLocatorTrack" / name)
    for fold in range(5):
        (root / "LesionLocatorTrack" / f"fold_{fold}").mkdir()
        (root / "LesionLocatorTrack" / f"fold_{fold}" / "checkpoint_final.pth").symlink_to(
            TINY / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth")
    return root


def test_every_registration_of_a_five_fold_mirrored_ensemble_is_kept_for_the_next_lesion(scans, five_fold_root):
    """5 folds x 8 mirrors = 40 registrations per scan pair: tracking another lesion on that pair (Slicer tracks lesion
    by lesion) registers nothing again."""
    registration = CountingRegistration()
    tracker = Tracker(five_fold_root, device="cpu", preset="accurate", registration=registration, mode="exact")
    for fold in tracker.folds:  # only the registrations count here
        fold.predictor.predict = lambda image, prompt, **options: (np.zeros((2, 1, 1, 1), np.float32), (slice(0, 1),) * 3)
    for centre in ((24, 33, 20), (30, 40, 47), (24, 33, 20)):
        tracker.track_step(scans[0], scans[1], lesion_masks(scans[0], {1: centre}))
    assert registration.calls == 40


def test_a_lesion_smaller_than_a_voxel_of_the_track_grid_says_so(scans):
    """Exact mode: a one-slice lesion of a 1 mm-slice scan vanishes on the Track plans' 3 mm grid. Like a mask prompt
    below one voxel in segmentation, it is refused with that reason (not 'moved out of the scan')."""
    image = sitk.ReadImage(str(TRACK_INPUTS / "A_trk_bl.nii.gz"))
    size = list(image.GetSize())
    size[2] *= 3
    fine = ImageVolume.from_sitk(sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear,
                                               np.array(image.GetOrigin()) - [0, 0, 1.0], (3.0, 3.0, 1.0),
                                               image.GetDirection(), -1024))
    mask = np.zeros(fine.shape_zyx, np.uint8)
    mask[71, 30:34, 20:24] = 1
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode="exact")
    record = tracker.track_step(fine, fine, {1: mask})[1]
    assert not record.found and "too small" in record.message and "point" in record.message


def test_progress_never_goes_backwards_with_prompted_and_tracked_lesions_and_two_sources(scans):
    """fu1: lesion 1 re-prompted with a point, lesion 2 with an empty mask (not found), lesion 3 tracked; fu2:
    lesion 1 and 3 tracked from fu1, lesion 2 from the baseline."""
    masks = lesion_masks(scans[0], {1: (24, 33, 20), 2: (30, 40, 47), 3: (15, 20, 30)}, radius=4)
    reports = []
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=CountingRegistration(), mode="exact")
    result = tracker.track(scans, {k: MaskPrompt(m) for k, m in masks.items()},
                           progress=lambda fraction, stage: reports.append((fraction, stage)),
                           reprompts={1: {1: PointPrompt((24, 33, 21)), 2: MaskPrompt(np.zeros_like(masks[2]))}})
    assert [r.found for r in result.lesions[2]] == [True, False, True]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions), [pair for pair in zip(reports, reports[1:]) if pair[1][0] < pair[0][0]]
    assert max(f for f, stage in reports if stage.startswith("timepoint 2/3")) <= 2 / 3


def test_registrations_computed_counts_those_of_the_run(scans):
    registration = CountingRegistration()
    tracker = Tracker(TINY, device="cpu", folds=[0], use_tta=False, registration=registration, mode="exact")
    prompts = {1: MaskPrompt(lesion_masks(scans[0], {1: (24, 33, 20)})[1])}
    counts = [tracker.track(pair, prompts).registrations_computed
              for pair in (scans[:2], scans[:2], [scans[0], scans[2]])]
    assert counts == [1, 0, 1] and registration.calls == 2
