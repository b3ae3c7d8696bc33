"""Classical registration (SimpleITK affine + demons) on phantoms with a known transform, and on real MR."""
from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LesionLocatorLib.image import ImageVolume, read_image
from LesionLocatorLib.registration import RegistrationError
from LesionLocatorLib.registration.classical import MAX_METRIC_SAMPLES, ClassicalRegistration, metric_sampling_fractions

MS_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "open_ms_longitudinal" / "raw"
MOVING_SPACING_XYZ = (2.5, 2.5, 4.0)


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation about physical axis 0/1/2 (x/y/z)."""
    angle = np.deg2rad(degrees)
    i, j = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[i, i] = matrix[j, j] = np.cos(angle)
    matrix[i, j], matrix[j, i] = -np.sin(angle), np.sin(angle)
    return matrix


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def phantom(shape_zyx=(40, 96, 96), spacing_xyz=MOVING_SPACING_XYZ) -> tuple[ImageVolume, np.ndarray]:
    """A textured ellipsoidal 'body' with two organs and a 12 mm lesion (returned as a mask), centred at 0."""
    rng = np.random.default_rng(0)
    axes_mm = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape_zyx, spacing_xyz[::-1])]
    z, y, x = np.meshgrid(*axes_mm, indexing="ij")
    texture = ndimage.gaussian_filter(rng.normal(size=shape_zyx), sigma=[6 / s for s in spacing_xyz[::-1]])
    body = (x / 100) ** 2 + (y / 80) ** 2 + (z / 70) ** 2 < 1
    image = np.where(body, 1.0 + 0.3 * texture / texture.std(), 0.0)
    image += 1.5 * (((x - 30) / 35) ** 2 + (y / 25) ** 2 + ((z + 10) / 30) ** 2 < 1)
    image -= 1.0 * (((x + 40) / 20) ** 2 + ((y - 20) / 30) ** 2 + (z / 40) ** 2 < 1)
    lesion = (x - 25) ** 2 + (y - 5) ** 2 + (z + 10) ** 2 < 12**2
    image += 2.0 * lesion
    extent = np.array(shape_zyx[::-1]) * np.array(spacing_xyz)
    origin = -(extent - np.array(spacing_xyz)) / 2
    return ImageVolume(image.astype(np.float32), spacing_xyz, tuple(origin)), lesion.astype(np.uint8)


def known_transform(moving: ImageVolume, deformation_mm: float) -> sitk.Transform:
    """Fixed -> moving: 6 degree rotation, (7, -5, 4) mm shift and a smooth random B-spline deformation."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rotation(2, 6).flatten().tolist())
    affine.SetTranslation((7.0, -5.0, 4.0))
    bspline = sitk.BSplineTransformInitializer(moving.to_sitk(), [3, 3, 2], 3)
    coefficients = np.random.default_rng(1).normal(scale=deformation_mm, size=bspline.GetNumberOfParameters())
    bspline.SetParameters(coefficients.tolist())
    return sitk.CompositeTransform([affine, bspline])


def fixed_grid() -> sitk.Image:
    """Anisotropic, finer than the moving grid, rotated 15 degrees about x and flipped in x and y."""
    direction = rotation(0, 15) @ np.diag([-1.0, -1.0, 1.0])
    size = np.array([105, 105, 52])
    spacing = np.array([2.25, 2.25, 3.2])
    grid = sitk.Image(size.tolist(), sitk.sitkUInt8)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.flatten().tolist())
    grid.SetOrigin((-direction @ ((size - 1) * spacing / 2)).tolist())
    return grid


def resampled(volume: ImageVolume, array: np.ndarray, grid: sitk.Image, transform, nearest: bool) -> np.ndarray:
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.GetArrayFromImage(sitk.Resample(volume.to_sitk(array), grid, transform, interpolator, 0))


def test_recovers_a_known_rotation_shift_and_deformation_on_an_oblique_anisotropic_grid():
    moving, lesion = phantom()
    grid = fixed_grid()
    truth = known_transform(moving, deformation_mm=6.0)
    fixed = ImageVolume.from_sitk(sitk.Resample(moving.to_sitk(), grid, truth, sitk.sitkLinear, 0.0))
    lesion_on_fixed = resampled(moving, lesion, grid, truth, nearest=True)
    assert dice(resampled(moving, lesion, grid, sitk.Transform(), nearest=True), lesion_on_fixed) < 0.7
    deformation = ClassicalRegistration().register(moving, fixed)
    warped = deformation.warp_mask(lesion)
    assert warped.shape == fixed.shape_zyx and warped.dtype == np.uint8
    assert dice(warped, lesion_on_fixed) >= 0.9


def test_a_flipped_copy_with_compensating_geometry_needs_no_motion():
    """Same voxels in physical space, stored with reversed x/z axes: the warped mask is the flipped mask."""
    moving, lesion = phantom()
    flipped_axes_zyx = (0, 2)
    last_zyx = np.array(moving.shape_zyx) - 1
    last_zyx[1] = 0
    direction = moving.direction_lps @ np.diag([-1.0, 1.0, -1.0])
    fixed = ImageVolume(np.flip(moving.array, flipped_axes_zyx), moving.spacing_xyz,
                        tuple(moving.index_zyx_to_lps(last_zyx)), direction)
    warped = ClassicalRegistration().register(moving, fixed).warp_mask(lesion)
    assert dice(warped, np.flip(lesion, flipped_axes_zyx)) >= 0.97


def test_points_map_both_ways_consistently():
    moving, lesion = phantom()
    grid = fixed_grid()
    truth = known_transform(moving, deformation_mm=3.0)
    fixed = ImageVolume.from_sitk(sitk.Resample(moving.to_sitk(), grid, truth, sitk.sitkLinear, 0.0))
    deformation = ClassicalRegistration(affine_iterations=30, demons_iterations=10).register(moving, fixed)
    points_moving = moving.index_zyx_to_lps(np.argwhere(lesion)[::50])
    round_trip = deformation.fixed_points_to_moving(deformation.moving_points_to_fixed(points_moving))
    assert np.abs(round_trip - points_moving).max() < 0.01
    with pytest.raises(ValueError, match="moving"):
        deformation.warp_mask(lesion[1:])


def test_a_blank_scan_is_refused_with_a_clear_error():
    moving, _ = phantom(shape_zyx=(20, 32, 32))
    with pytest.raises(RegistrationError, match="fixed \\(later\\) scan is constant"):
        ClassicalRegistration().register(moving, moving.with_array(np.zeros_like(moving.array)))


@pytest.mark.slow
def test_real_longitudinal_mr_lesions_map_within_2mm():
    """MS patient 01, FLAIR study 1 -> study 2; reference: the dataset's affine transforms to its common space."""
    folder = MS_DATA / "patient01"
    if not (folder / "gt.nii.gz").exists():
        pytest.skip(f"shared data missing: {folder}")
    components = sitk.ConnectedComponent(sitk.ReadImage(str(folder / "gt.nii.gz")) > 0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    centres = [stats.GetCentroid(label) for label in stats.GetLabels()]
    common_to_study = [sitk.ReadTransform(str(folder / f"study{k}_FLAIR_to_common_space.txt")) for k in (1, 2)]
    study1, study2 = (np.array([t.TransformPoint(c) for c in centres]) for t in common_to_study)
    start = time.perf_counter()
    deformation = ClassicalRegistration().register(
        read_image(folder / "study1_FLAIR.nii.gz"), read_image(folder / "study2_FLAIR.nii.gz")
    )
    print(f"registration: {time.perf_counter() - start:.1f} s")
    errors = np.linalg.norm(deformation.moving_points_to_fixed(study1) - study2, axis=1)
    assert errors.mean() < 1.5 and errors.max() < 3.0


def shifted_pair() -> tuple[ImageVolume, ImageVolume]:
    """(moving, fixed): a body shifted 2 voxels along x, on a grid rotated 90 degrees about z."""
    rng = np.random.default_rng(3)
    z, y, x = np.ogrid[:40, :64, :64]
    body = (((y - 32) / 26.0) ** 2 + ((x - 32) / 28.0) ** 2 < 1).astype(np.int16)
    fixed_array = (body * 300 + rng.normal(0, 5, (40, 64, 64))).astype(np.int16)
    moving_array = np.roll(fixed_array, 2, axis=2)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return (ImageVolume(moving_array, spacing_xyz=(1.5, 1.5, 3.0), direction_lps=direction),
            ImageVolume(fixed_array, spacing_xyz=(1.5, 1.5, 3.0), direction_lps=direction))


def lesion_box(shape_zyx) -> np.ndarray:
    mask = np.zeros(shape_zyx, np.uint8)
    mask[18:24, 28:36, 30:38] = 1
    return mask


def test_warp_near_equals_the_whole_grid_warp_inside_its_region():
    """The tracker warps only around the lesion: same voxels as warping the whole scan."""
    moving, fixed = shifted_pair()
    deformation = ClassicalRegistration(deformable=False).register(moving, fixed)
    mask = lesion_box(moving.shape_zyx)
    whole = deformation.warp_mask(mask)
    near, region = deformation.warp_mask_near(mask)
    assert whole.sum() > 0 and np.array_equal(near, whole[region]) and whole.sum() == near.sum()
    assert near.size < whole.size


def test_a_deformation_keeps_the_grids_not_the_scans():
    """The tracker caches deformations: they must not keep the scans' voxels (nor a scan-sized image) alive."""
    moving, fixed = shifted_pair()
    arrays = [weakref.ref(moving.array), weakref.ref(fixed.array)]
    deformation = ClassicalRegistration(deformable=False).register(moving, fixed)
    fixed_reference = fixed.to_sitk(np.zeros(fixed.shape_zyx, np.uint8))
    del moving, fixed
    gc.collect()
    assert all(array() is None for array in arrays)
    assert not any(isinstance(value, sitk.Image) for value in vars(deformation).values())
    mask = lesion_box(deformation._moving_grid.shape_zyx)
    moving_mask = deformation._moving_grid.to_sitk(mask)
    expected = sitk.Resample(moving_mask, fixed_reference, deformation.transform, sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(deformation.warp_mask(mask), sitk.GetArrayFromImage(expected))


def test_metric_samples_are_capped_per_pyramid_level():
    # a 512x512x200 CT on the 3 mm working grid: 137x137x167 voxels
    voxels = 137 * 137 * 167
    fractions = metric_sampling_fractions([4, 2, 1], voxels, 0.2)
    assert fractions[:2] == [0.2, 0.2]  # coarse levels keep the requested share
    assert fractions[2] * voxels == pytest.approx(MAX_METRIC_SAMPLES)
    assert metric_sampling_fractions([2, 1], 40 * 40 * 40, 0.2) == [0.2, 0.2]  # small scans are not touched
