"""Synthetic lesions: exact ground truth (mask = blended weight >= 0.5), sizes, partial volume, sites, real scans."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.synthetic.backgrounds import LABELS, Background, load_background
from LesionLocatorLib.synthetic.cases import make_case, render_lesions
from LesionLocatorLib.synthetic.lesions import (
    APPEARANCE_KINDS, SHAPE_KINDS, LesionAppearance, LesionShape, SyntheticLesion, random_appearance,
    random_lesion_shape, render_lesion,
)
from LesionLocatorLib.synthetic.phantoms import make_phantom

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ABDOMEN_CT = SHARED / "data" / "totalsegmentator_examples" / "example_ct.nii.gz"


def tissue_background(shape_zyx=(40, 56, 56), spacing_xyz=(1.0, 1.0, 1.0)) -> Background:
    """A uniform 40 HU block labelled soft tissue (no noise: blends are checked exactly)."""
    image = ImageVolume(np.full(shape_zyx, 40.0, np.float32), spacing_xyz=spacing_xyz, origin_lps=(-20.0, 5.0, 30.0))
    labels = np.full(shape_zyx, LABELS["soft_tissue"], np.uint8)
    return Background("tissue", image, "CT", "body", site_labels=labels, labels_complete=True)


def centre_of(image: ImageVolume) -> np.ndarray:
    return image.index_zyx_to_lps((np.asarray(image.shape_zyx) - 1) / 2.0)


def sphere(image: ImageVolume, radius_mm: float, half_width_mm: float = 0.5) -> SyntheticLesion:
    shape = LesionShape(centre_of(image), radius_mm, edge_half_width_mm=half_width_mm)
    return SyntheticLesion(1, "soft_tissue", shape, LesionAppearance(core_value=100.0), 2 * radius_mm)


def test_mask_is_blended_weight_at_least_half_and_image_is_the_blend():
    background = tissue_background()
    rng = np.random.default_rng(0)
    shape, kind = random_lesion_shape(rng, centre_of(background.image), 24.0, kind="irregular")
    appearance = random_appearance(rng, "soft_tissue", "CT", 40.0, 12.0, kind="rim")
    lesion = SyntheticLesion(1, "soft_tissue", shape, appearance, 24.0, kind)
    array = background.image.array.copy()
    instance_map, renders = render_lesions(array, background.image, [lesion], rng, noise_std=0.0)
    render = renders[1]
    weight = np.zeros(background.image.shape_zyx, np.float32)
    weight[render.region] = render.weight
    assert np.array_equal(instance_map == 1, weight >= 0.5)
    expected = background.image.array[render.region] * (1 - render.weight) + render.values * render.weight
    np.testing.assert_allclose(array[render.region], expected, rtol=0, atol=1e-3)
    outside = np.ones(array.shape, bool)
    outside[render.region] = False
    assert np.array_equal(array[outside], background.image.array[outside])


@pytest.mark.parametrize("spacing_xyz, tolerance", [((1.0, 1.0, 1.0), 0.03), ((0.7, 0.7, 3.0), 0.05)])
def test_sphere_mask_volume_matches_its_radius(spacing_xyz, tolerance):
    shape = tuple(int(np.ceil(40 / s)) for s in spacing_xyz[::-1])
    grid = ImageVolume(np.zeros(shape, np.float32), spacing_xyz=spacing_xyz)
    radius = 11.0
    render = render_lesion(sphere(grid, radius, half_width_mm=1.0), grid)
    volume = render.mask.sum() * np.prod(spacing_xyz)
    assert volume == pytest.approx(4 / 3 * np.pi * radius ** 3, rel=tolerance)


def test_partial_volume_only_at_the_surface():
    grid = ImageVolume(np.zeros((30, 30, 30), np.float32), spacing_xyz=(1.0, 1.0, 2.0))
    lesion = sphere(grid, 12.0, half_width_mm=0.5)
    render = render_lesion(lesion, grid)
    partial = (render.weight > 0) & (render.weight < 1)
    assert partial.sum() > 100
    index = np.argwhere(partial) + [s.start for s in render.region]
    distance = np.linalg.norm(grid.index_zyx_to_lps(index) - lesion.center_lps, axis=1)
    half_diagonal = 0.5 * np.linalg.norm(grid.spacing_xyz)
    assert np.all(np.abs(distance - 12.0) <= 0.5 + half_diagonal + 1e-6)


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_every_shape_kind_gives_a_lesion_of_about_its_diameter(kind):
    background = tissue_background(shape_zyx=(48, 48, 48))
    rng = np.random.default_rng(SHAPE_KINDS.index(kind))
    shape, made = random_lesion_shape(rng, centre_of(background.image), 20.0, kind=kind)
    assert made == kind
    lesion = SyntheticLesion(1, "soft_tissue", shape, LesionAppearance(core_value=0.0), 20.0, kind)
    render = render_lesion(lesion, background.image)
    equivalent_diameter = 2 * (3 * render.mask.sum() / (4 * np.pi)) ** (1 / 3)
    assert 0.7 * 20.0 < equivalent_diameter < 1.4 * 20.0


@pytest.mark.parametrize("kind", APPEARANCE_KINDS)
def test_appearance_kinds_have_their_intensity_profile(kind):
    appearance = random_appearance(np.random.default_rng(1), "liver", "CT", 60.0, 15.0, kind=kind)
    appearance.texture = None
    depth = np.array([0.0, 14.0])
    surface, centre = appearance.values(depth, np.zeros((2, 3)))
    if kind == "rim":
        assert surface > centre + 10  # enhancing rim, darker core
    elif kind == "necrotic":
        assert centre == pytest.approx(appearance.necrotic_value, abs=1.0)
    else:
        assert surface == centre == appearance.core_value
    if kind == "solid":
        assert abs(appearance.core_value - 60.0) >= 20.0  # hypo- or hyperdense by at least 20 HU


def test_lesions_go_to_their_sites_in_a_phantom():
    rng = np.random.default_rng(4)
    background = make_phantom("body_phantom", rng, max_voxels=300_000)
    case = make_case(background, rng, lesion_count=3, diameter_range_mm=(8.0, 20.0), sites=["lung", "liver", "bone"])
    assert [lesion.lesion_id for lesion in case.lesions] == list(range(1, len(case.lesions) + 1))
    assert len(case.lesions) >= 2
    for lesion in case.lesions:
        index = tuple(np.round(case.image.lps_to_index_zyx(lesion.center_lps)).astype(int))
        assert background.site_labels[index] == LABELS[lesion.site]
        assert case.lesion_mask(lesion.lesion_id).any()


@pytest.mark.skipif(not ABDOMEN_CT.is_file(), reason=f"shared data missing: {ABDOMEN_CT}")
def test_real_ct_changes_only_inside_lesion_regions():
    background = load_background("abdomen_ct", SHARED / "data")
    rng = np.random.default_rng(7)
    case = make_case(background, rng, lesion_count=3, diameter_range_mm=(10.0, 30.0))
    assert len(case.lesions) == 3
    touched = np.zeros(case.image.shape_zyx, bool)
    for lesion in case.lesions:
        render = case.renders[lesion.lesion_id]
        touched[render.region] |= render.weight > 0
        assert np.array_equal(case.lesion_mask(lesion.lesion_id)[render.region], render.mask)
    assert np.array_equal(case.image.array[~touched], background.image.array[~touched])
    assert case.image.same_grid(background.image)
