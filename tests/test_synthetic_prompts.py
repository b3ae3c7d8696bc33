"""Prompt simulation (points in the core, jittered boxes, previous masks) and the reproducible validation set."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from LesionLocatorLib.synthetic.cases import make_validation_set
from LesionLocatorLib.synthetic.phantoms import make_phantom
from LesionLocatorLib.synthetic.prompts import (
    bounding_box, jittered_box, lesion_core, sample_point_prompt, simulate_previous_mask,
)


def ellipsoid_mask(shape=(40, 50, 50), centre=(20, 24, 26), radii=(10, 14, 8)) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_points_lie_anywhere_in_the_lesion_core():
    mask = ellipsoid_mask()
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    rng = np.random.default_rng(0)
    points = [sample_point_prompt(mask, rng) for _ in range(30)]
    for point in points:
        assert mask[point] and depth[point] >= 0.5 * depth.max()
    assert len(set(points)) >= 10  # not always the centre
    assert lesion_core(mask).sum() < mask.sum()


def test_point_of_a_one_voxel_lesion_is_that_voxel():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 2, 3] = True
    assert sample_point_prompt(mask, np.random.default_rng(1)) == (1, 2, 3)


@pytest.mark.parametrize("jitter", [0, 2, 4])
def test_boxes_contain_the_mask_up_to_the_jitter(jitter):
    mask = ellipsoid_mask()
    lo_true, hi_true = (np.asarray(b) for b in bounding_box(mask))
    rng = np.random.default_rng(jitter)
    moved = 0
    for _ in range(40):
        lo, hi = (np.asarray(b) for b in jittered_box(mask, rng, jitter))
        assert np.all(lo < hi) and np.all(lo >= 0) and np.all(hi <= mask.shape)
        assert np.all(np.abs(lo - lo_true) <= jitter) and np.all(np.abs(hi - hi_true) <= jitter)
        moved += int(np.any(lo != lo_true) or np.any(hi != hi_true))
    assert moved == 0 if jitter == 0 else moved > 30


def test_previous_masks_overlap_the_lesion_but_differ():
    mask = ellipsoid_mask()
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(15):
        previous = simulate_previous_mask(mask, rng, spacing_zyx=(2.0, 1.5, 1.5))
        assert previous.shape == mask.shape and previous.any()
        scores.append(dice(previous, mask))
    assert min(scores) > 0.3 and np.mean(scores) > 0.6
    assert max(scores) < 1.0


def test_previous_mask_of_a_tiny_lesion_is_never_empty():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    rng = np.random.default_rng(4)
    assert all(simulate_previous_mask(mask, rng, scale_range=(0.5, 0.6)).any() for _ in range(10))


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        sample_point_prompt(np.zeros((4, 4, 4), bool), np.random.default_rng(0))


def test_validation_set_is_reproducible_and_prompts_hit_their_lesions():
    backgrounds = [make_phantom("head_phantom", np.random.default_rng(1), max_voxels=200_000),
                   make_phantom("body_phantom", np.random.default_rng(2), max_voxels=200_000)]
    first = make_validation_set(5, backgrounds, cases_per_background=1, lesions_per_case=2)
    again = make_validation_set(5, backgrounds, cases_per_background=1, lesions_per_case=2)
    other = make_validation_set(6, backgrounds, cases_per_background=1, lesions_per_case=2)
    assert len(first) == 2
    for a, b in zip(first, again):
        assert a.points_zyx == b.points_zyx and a.boxes_zyx == b.boxes_zyx
        assert np.array_equal(a.case.image.array, b.case.image.array)
    assert any(a.points_zyx != c.points_zyx for a, c in zip(first, other))
    # `evaluate --skip tracking` must score the same cases as a full run
    with_follow_ups = make_validation_set(5, backgrounds, cases_per_background=1, lesions_per_case=2, with_follow_up=True)
    for a, b in zip(first, with_follow_ups):
        assert a.points_zyx == b.points_zyx and a.boxes_zyx == b.boxes_zyx and b.follow_up is not None
        assert np.array_equal(a.case.image.array, b.case.image.array)
    for validation_case in first:
        for lesion in validation_case.case.lesions:
            mask = validation_case.case.lesion_mask(lesion.lesion_id)
            assert mask[validation_case.points_zyx[lesion.lesion_id]]
            lo, hi = validation_case.boxes_zyx[lesion.lesion_id]
            inside = mask[tuple(slice(l, h) for l, h in zip(lo, hi))].sum()
            assert inside >= 0.5 * mask.sum()
