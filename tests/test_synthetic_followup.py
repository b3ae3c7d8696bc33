"""Synthetic follow-ups: achieved growth, invertible smooth deformations, ground-truth ids and centres."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.synthetic.backgrounds import LABELS, Background, load_background
from LesionLocatorLib.synthetic.cases import SyntheticCase, make_case, render_lesions
from LesionLocatorLib.synthetic.deformation import (
    CompositeTransform, RadialGrowth, RigidTransform, displacement_field, image_center_lps, jacobian_determinant,
    random_breathing, random_rotation_matrix, random_smooth_displacement,
)
from LesionLocatorLib.synthetic.followup import DISAPPEARED, NEW, PRESENT, FollowUpOptions, make_follow_up
from LesionLocatorLib.synthetic.lesions import LesionAppearance, SyntheticLesion, random_lesion_shape
from LesionLocatorLib.synthetic.phantoms import make_phantom

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ABDOMEN_CT = SHARED / "data" / "totalsegmentator_examples" / "example_ct.nii.gz"


def two_lesion_case(kind: str = "lobulated") -> SyntheticCase:
    """A 1 mm tissue block with two 18 mm lesions far apart."""
    image = ImageVolume(np.full((50, 60, 90), 40.0, np.float32), direction_lps=np.diag([-1.0, -1.0, 1.0]))
    background = Background("tissue", image, "CT", "body",
                            site_labels=np.full(image.shape_zyx, LABELS["soft_tissue"], np.uint8), labels_complete=True)
    rng = np.random.default_rng(11)
    lesions = []
    for lesion_id, index in ((1, (25, 30, 22)), (2, (25, 30, 67))):
        shape, made = random_lesion_shape(rng, image.index_zyx_to_lps(index), 18.0, kind=kind)
        lesions.append(SyntheticLesion(lesion_id, "soft_tissue", shape, LesionAppearance(core_value=120.0), 18.0, made))
    array = image.array.copy()
    instance_map, renders = render_lesions(array, image, lesions, rng, noise_std=0.0)
    return SyntheticCase("two", image.with_array(array), instance_map, lesions, background, renders)


@pytest.mark.parametrize("factors", [{1: 1.5, 2: 0.7}, {1: 0.8, 2: 1.25}])
def test_growth_factor_is_achieved(factors):
    case = two_lesion_case()
    follow_up = make_follow_up(case, np.random.default_rng(0), FollowUpOptions.static(), growth_factors=factors)
    assert follow_up.image.same_grid(case.image)
    for lesion_id, factor in factors.items():
        achieved = (follow_up.lesion_mask(lesion_id).sum() / case.lesion_mask(lesion_id).sum()) ** (1 / 3)
        assert achieved == pytest.approx(factor, rel=0.04)
        assert follow_up.lesion(lesion_id).growth_factor == factor


def test_growth_is_also_achieved_under_motion_and_regridding():
    case = two_lesion_case("sphere")
    options = FollowUpOptions(disappear_probability=0.0, new_lesion_range=(0, 0), slice_spacing_choices_mm=(2.0,),
                              fov_scale_range=(1.0, 1.0))
    follow_up = make_follow_up(case, np.random.default_rng(3), options, growth_factors={1: 1.4, 2: 0.75})
    assert follow_up.image.spacing_xyz[2] == 2.0
    voxel_ml = np.prod(follow_up.image.spacing_xyz) / np.prod(case.image.spacing_xyz)
    for lesion_id, factor in ((1, 1.4), (2, 0.75)):
        achieved = (follow_up.lesion_mask(lesion_id).sum() * voxel_ml / case.lesion_mask(lesion_id).sum()) ** (1 / 3)
        assert achieved == pytest.approx(factor, rel=0.08)


def random_full_transform(grid: ImageVolume, rng: np.random.Generator) -> CompositeTransform:
    centre = image_center_lps(grid)
    return CompositeTransform([
        RigidTransform(random_rotation_matrix(rng, 8.0), centre, rng.uniform(-10, 10, size=3)),
        random_breathing(rng, grid),
        random_smooth_displacement(rng, 6.0),
        RadialGrowth(centre + [5.0, -3.0, 2.0], 12.0, 1.6),
        RadialGrowth(centre + [-20.0, 10.0, 0.0], 8.0, 0.6),
    ])


def test_deformation_is_invertible_with_positive_jacobian():
    grid = ImageVolume(np.zeros((30, 40, 40), np.float32), spacing_xyz=(2.0, 2.0, 2.5))
    rng = np.random.default_rng(5)
    transform = random_full_transform(grid, rng)
    determinant = jacobian_determinant(displacement_field(transform, grid), grid)
    assert determinant.min() > 0
    points = image_center_lps(grid) + rng.uniform(-40, 40, size=(500, 3))
    np.testing.assert_allclose(transform.pull(transform.push(points)), points, atol=1e-3)
    np.testing.assert_allclose(transform.push(transform.pull(points)), points, atol=1e-3)


def test_elastic_field_is_smooth():
    grid = ImageVolume(np.zeros((24, 32, 32), np.float32), spacing_xyz=(3.0, 3.0, 3.0))
    elastic = random_smooth_displacement(np.random.default_rng(2), 8.0)
    displacement = displacement_field(elastic, grid)
    assert 0 < np.abs(displacement).max() <= 8.0 + 1e-9
    determinant = jacobian_determinant(displacement, grid)
    assert determinant.min() >= 0.7 ** 3 - 1e-6 and determinant.max() <= 1.3 ** 3 + 1e-6
    neighbour_change = np.abs(np.diff(displacement, axis=2)).max()
    assert neighbour_change < 0.3 * 3.0  # |grad u| < 0.3 over one 3 mm voxel


def test_follow_up_ground_truth_keeps_ids_and_centres():
    rng = np.random.default_rng(8)
    background = make_phantom("body_phantom", rng, max_voxels=300_000)
    case = make_case(background, rng, lesion_count=3, diameter_range_mm=(15.0, 25.0))
    options = FollowUpOptions(new_lesion_range=(1, 1))
    follow_up = make_follow_up(case, rng, options, growth_factors={1: 0.0})
    statuses = {lesion.lesion_id: lesion.status for lesion in follow_up.lesions}
    assert statuses[1] == DISAPPEARED and not follow_up.lesion_mask(1).any()
    baseline_ids = {lesion.lesion_id for lesion in case.lesions}
    new_ids = {k for k, v in statuses.items() if v == NEW}
    assert new_ids and not new_ids & baseline_ids
    assert set(np.unique(follow_up.instance_map)) - {0} == {k for k, v in statuses.items() if v != DISAPPEARED}
    for lesion in follow_up.lesions:
        if lesion.status == DISAPPEARED:
            continue
        index = tuple(np.round(follow_up.image.lps_to_index_zyx(lesion.center_lps)).astype(int))
        assert follow_up.instance_map[index] == lesion.lesion_id  # a lesion is star-shaped about its centre
        if lesion.status == PRESENT:
            baseline_centre = case.lesion(lesion.lesion_id).center_lps
            np.testing.assert_allclose(follow_up.transform.pull(lesion.center_lps[None])[0], baseline_centre, atol=1e-3)


@pytest.mark.skipif(not ABDOMEN_CT.is_file(), reason=f"shared data missing: {ABDOMEN_CT}")
def test_follow_up_of_a_real_ct_changes_grid_and_intensities():
    rng = np.random.default_rng(21)
    case = make_case(load_background("abdomen_ct", SHARED / "data"), rng, lesion_count=2, diameter_range_mm=(15.0, 30.0))
    options = FollowUpOptions(disappear_probability=0.0, slice_spacing_choices_mm=(5.0,), fov_scale_range=(0.9, 0.9))
    follow_up = make_follow_up(case, rng, options)
    assert follow_up.image.spacing_xyz[2] == 5.0
    assert follow_up.image.shape_zyx != case.image.shape_zyx
    assert follow_up.image.array.dtype == np.float32 and np.isfinite(follow_up.image.array).all()
    assert all(follow_up.lesion_mask(lesion.lesion_id).any() for lesion in follow_up.lesions if lesion.status == PRESENT)
