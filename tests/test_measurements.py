"""Measurements of analytic shapes (spheres, ellipsoids) on isotropic, anisotropic, rotated and oblique grids."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.image import ImageVolume, read_image
from LesionLocatorLib.measurements import LesionMeasurement, MeasurementError, measure_lesion


def rotation(axis, degrees: float) -> np.ndarray:
    """Rotation matrix about `axis` (LPS) by `degrees` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = math.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def ellipsoid_on_grid(shape_zyx, spacing_xyz, direction_lps, semi_axes_lps, origin_lps=(10.0, -20.0, 30.0)):
    """A grid and the mask of an ellipsoid centred in it, its semi-axes along the patient's LPS x, y, z."""
    image = ImageVolume(np.zeros(shape_zyx, dtype=np.int16), spacing_xyz, origin_lps, direction_lps)
    centre_lps = image.index_zyx_to_lps((np.asarray(shape_zyx) - 1) / 2.0)
    points_lps = image.index_zyx_to_lps(np.indices(shape_zyx).reshape(3, -1).T)
    inside = (((points_lps - centre_lps) / np.asarray(semi_axes_lps)) ** 2).sum(axis=1) <= 1.0
    return image, inside.reshape(shape_zyx).astype(np.uint8), centre_lps


def expected(semi_axes_lps) -> dict:
    a_x, a_y, a_z = semi_axes_lps
    return {
        "volume_ml": 4.0 / 3.0 * math.pi * a_x * a_y * a_z / 1000.0,
        "long": 2.0 * max(a_x, a_y),
        "short": 2.0 * min(a_x, a_y),
        "max_3d": 2.0 * max(semi_axes_lps),
    }


def assert_matches(measurement: LesionMeasurement, semi_axes_lps, centre_lps, voxel_mm: float) -> None:
    truth = expected(semi_axes_lps)
    assert measurement.found
    assert measurement.volume_ml == pytest.approx(truth["volume_ml"], rel=0.02)
    assert measurement.long_axis_mm == pytest.approx(truth["long"], abs=voxel_mm)
    assert measurement.short_axis_mm == pytest.approx(truth["short"], abs=voxel_mm)
    assert measurement.max_diameter_3d_mm == pytest.approx(truth["max_3d"], abs=voxel_mm)
    assert np.allclose(measurement.centroid_lps, centre_lps, atol=0.5 * voxel_mm)
    assert np.allclose(measurement.centroid_ras, np.asarray(centre_lps) * [-1, -1, 1], atol=0.5 * voxel_mm)
    assert measurement.n_components == 1


def test_sphere_isotropic():
    image, mask, centre = ellipsoid_on_grid((30, 30, 30), (1.0, 1.0, 1.0), np.eye(3), (10.0, 10.0, 10.0))
    assert_matches(measure_lesion(image, mask), (10.0, 10.0, 10.0), centre, voxel_mm=1.0)


def test_ellipsoid_anisotropic_spacing():
    semi_axes = (14.0, 9.0, 12.0)
    image, mask, centre = ellipsoid_on_grid((12, 50, 50), (0.7, 0.7, 3.0), np.eye(3), semi_axes)
    measurement = measure_lesion(image, mask)
    assert_matches(measurement, semi_axes, centre, voxel_mm=3.0)
    # The grid's slices are axial: the diameters are measured on an acquired slice, and the long axis runs along x.
    slice_z = (measurement.axial_plane_z_lps - image.origin_lps[2]) / 3.0
    assert slice_z == pytest.approx(round(slice_z), abs=1e-6)
    ends = np.asarray(measurement.long_axis_lps)
    direction = (ends[1] - ends[0]) / measurement.long_axis_mm
    assert abs(direction[0]) > math.cos(math.radians(15))


def test_axial_rotation_of_the_grid_keeps_patient_diameters():
    semi_axes = (13.0, 8.0, 10.0)
    direction = rotation((0, 0, 1), 30)
    image, mask, centre = ellipsoid_on_grid((14, 44, 44), (0.8, 0.8, 2.0), direction, semi_axes)
    assert_matches(measure_lesion(image, mask), semi_axes, centre, voxel_mm=2.0)


def test_oblique_grid_measures_in_the_patient_axial_plane():
    # A tall ellipsoid on a grid tilted 30 degrees about y: the grid's own slice through the centre cuts the
    # ellipsoid obliquely (x diameter ~18.3 mm), the patient's axial plane gives 16 x 12 mm.
    semi_axes = (8.0, 6.0, 15.0)
    direction = rotation((0, 1, 0), 30)
    image, mask, centre = ellipsoid_on_grid((40, 24, 36), (1.0, 1.0, 1.0), direction, semi_axes)
    measurement = measure_lesion(image, mask)
    assert_matches(measurement, semi_axes, centre, voxel_mm=1.0)
    ends = np.asarray(measurement.long_axis_lps)
    assert ends[0][2] == ends[1][2] == measurement.axial_plane_z_lps

    # The same voxels read as an axis-aligned grid are measured in the grid's slices: clearly different.
    grid_slices = measure_lesion(ImageVolume(mask, image.spacing_xyz, image.origin_lps, np.eye(3)), mask)
    assert grid_slices.long_axis_mm - measurement.long_axis_mm > 1.5


def test_oblique_grid_about_a_diagonal_with_anisotropic_spacing():
    semi_axes = (12.0, 9.0, 10.0)
    direction = rotation((1, 1, 1), 30)
    image, mask, centre = ellipsoid_on_grid((16, 50, 50), (0.7, 0.7, 2.5), direction, semi_axes)
    assert_matches(measure_lesion(image, mask), semi_axes, centre, voxel_mm=2.5)


def oblique_copy(image: ImageVolume, mask: np.ndarray, direction_lps: np.ndarray, spacing_xyz) -> tuple:
    """Image (linear) and mask (nearest) resampled onto a rotated grid around the same centre, large enough."""
    extent_mm = np.asarray(image.shape_zyx[::-1]) * image.spacing_xyz
    size_xyz = np.ceil(1.5 * extent_mm / spacing_xyz).astype(int)
    centre_lps = image.index_zyx_to_lps((np.asarray(image.shape_zyx) - 1) / 2.0)
    reference = sitk.Image(size_xyz.tolist(), sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in spacing_xyz))
    reference.SetDirection(direction_lps.flatten().tolist())
    reference.SetOrigin((centre_lps - direction_lps @ (np.asarray(spacing_xyz) * (size_xyz - 1) / 2.0)).tolist())
    resampled_image = sitk.Resample(
        image.to_sitk(), reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32
    )
    resampled_mask = sitk.Resample(image.to_sitk(mask), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return ImageVolume.from_sitk(resampled_image), sitk.GetArrayFromImage(resampled_mask)


def test_real_ct_organ_measures_the_same_on_an_oblique_grid():
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator_examples"
    if not (folder / "example_seg.nii.gz").exists():
        pytest.skip(f"shared TotalSegmentator example CT not found in {folder}")
    image = read_image(folder / "example_ct_sm.nii.gz")  # 3 mm, RAS-oriented NIfTI
    kidney = (read_image(folder / "example_seg.nii.gz").array == 2).astype(np.uint8)
    original = measure_lesion(image, kidney, intensity_unit="HU")
    tilted = rotation((1, 0, 0), 20) @ image.direction_lps
    oblique_image, oblique_kidney = oblique_copy(image, kidney, tilted, (2.0, 2.0, 2.5))
    oblique = measure_lesion(oblique_image, oblique_kidney, intensity_unit="HU")
    assert oblique.volume_ml == pytest.approx(original.volume_ml, rel=0.02)
    for name in ("long_axis_mm", "short_axis_mm", "max_diameter_3d_mm"):
        assert getattr(oblique, name) == pytest.approx(getattr(original, name), abs=3.0), name
    assert np.allclose(oblique.centroid_lps, original.centroid_lps, atol=1.5)


def test_flipped_axes_as_in_ras_oriented_nifti():
    semi_axes = (9.0, 7.0, 6.0)
    direction = np.diag([-1.0, -1.0, 1.0])
    image, mask, centre = ellipsoid_on_grid((10, 30, 30), (0.9, 0.9, 2.0), direction, semi_axes)
    assert_matches(measure_lesion(image, mask), semi_axes, centre, voxel_mm=2.0)


def test_intensities_units_and_components():
    image, mask, _ = ellipsoid_on_grid((20, 20, 32), (1.0, 1.0, 1.0), np.eye(3), (4.0, 4.0, 4.0))
    second = np.roll(mask, 12, axis=2)
    lesion = mask | second
    values = np.where(lesion, 100, -50).astype(np.int16)
    hot_voxel = tuple(np.argwhere(lesion)[0])
    values[hot_voxel] = 400
    measurement = measure_lesion(image.with_array(values), lesion, intensity_unit="HU")
    count = int(lesion.sum())
    assert measurement.n_components == 2
    assert measurement.voxel_count == count
    assert measurement.intensity_unit == "HU"
    assert measurement.intensity_mean == pytest.approx((100 * (count - 1) + 400) / count)
    assert (measurement.intensity_min, measurement.intensity_max) == (100.0, 400.0)
    # The 3D diameter spans both parts: centres 12 mm apart, each 8 mm across.
    assert measurement.max_diameter_3d_mm == pytest.approx(20.0, abs=1.0)


def test_fragmented_lesion_sums_the_long_axes_of_its_parts():
    """RECIST 1.1 adds the long axes of a lesion's fragments; the long axis itself spans them all."""
    direction = rotation((0, 0, 1), 30)  # an axial rotation of the grid: the patient's axial plane is unchanged
    image, part, _ = ellipsoid_on_grid((12, 48, 64), (0.8, 0.8, 2.0), direction, (4.0, 4.0, 4.0))
    other = np.zeros_like(part)
    other[:, :, 20:] = part[:, :, :-20]  # the same ball, 20 voxels (16 mm) further along the grid's x
    fragments = measure_lesion(image, part | other)
    whole = measure_lesion(image, part)
    assert fragments.n_components == 2
    assert whole.parts_long_axis_sum_mm == pytest.approx(whole.long_axis_mm)
    assert fragments.parts_long_axis_sum_mm == pytest.approx(2 * whole.long_axis_mm, abs=0.01)
    assert fragments.long_axis_mm == pytest.approx(16.0 + 8.0, abs=1.0)


def test_largest_short_axis_is_found_on_the_thickest_slice():
    """A node long and thin on one slice, round and thick on another: its RECIST short axis is the thick one."""
    image = ImageVolume(np.zeros((24, 100, 100), dtype=np.int16), (1.0, 1.0, 2.0), (5.0, -7.0, 11.0))
    z_mm, y_mm, x_mm = (np.indices(image.shape_zyx) * np.array([2.0, 1.0, 1.0])[:, None, None, None])

    def ellipsoid(centre_xyz, semi_xyz):
        return sum(((v - c) / a) ** 2 for v, c, a in zip((x_mm, y_mm, z_mm), centre_xyz, semi_xyz)) <= 1.0

    thin = ellipsoid((50, 50, 14), (15, 4, 3.5))  # 30 x 8 mm on its longest slice
    thick = ellipsoid((50, 50, 22), (9, 9, 5))  # 18 x 18 mm, touching the thin part
    measurement = measure_lesion(image, (thin | thick).astype(np.uint8))
    assert measurement.n_components == 1
    assert measurement.long_axis_mm == pytest.approx(30.0, abs=1.0)
    assert measurement.short_axis_mm == pytest.approx(8.0, abs=1.0)
    assert measurement.largest_short_axis_mm == pytest.approx(18.0, abs=1.0)
    ends = np.asarray(measurement.largest_short_axis_lps)
    assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(measurement.largest_short_axis_mm)
    assert ends[0][2] == ends[1][2] == pytest.approx(11.0 + 22.0)  # on the thick part's middle slice (LPS z)


def test_single_voxel_and_lesion_touching_the_border():
    image = ImageVolume(np.zeros((5, 6, 7)), (0.5, 0.5, 2.0))
    mask = np.zeros(image.shape_zyx, dtype=np.uint8)
    mask[0, 0, 0] = 1
    measurement = measure_lesion(image, mask)
    assert measurement.volume_ml == pytest.approx(0.5 * 0.5 * 2.0 / 1000)
    assert measurement.long_axis_mm == pytest.approx(0.5 * math.sqrt(2) / 2, abs=0.5)
    assert 0 < measurement.short_axis_mm <= measurement.long_axis_mm


def test_empty_mask_is_not_found():
    image = ImageVolume(np.zeros((4, 5, 6)))
    measurement = measure_lesion(image, np.zeros((4, 5, 6), dtype=np.uint8), intensity_unit="SUV")
    assert not measurement.found
    assert measurement.volume_ml == 0.0 and measurement.long_axis_mm is None
    assert measurement.intensity_unit == "SUV"
    assert json.loads(json.dumps(measurement.to_dict()))["found"] is False


def test_bad_inputs_say_what_to_do():
    image = ImageVolume(np.zeros((4, 5, 6)))
    with pytest.raises(MeasurementError, match="resample the mask"):
        measure_lesion(image, np.ones((4, 5, 5), dtype=np.uint8))
    with pytest.raises(MeasurementError, match="HU, SUV, unknown"):
        measure_lesion(image, np.ones((4, 5, 6), dtype=np.uint8), intensity_unit="hounsfield")
