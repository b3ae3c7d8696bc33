"""ImageVolume geometry: (z, y, x) arrays, LPS/RAS points, non-identity directions, anisotropic spacing."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.image import ImageReadError, ImageVolume, read_image, write_mask


def rotated_image() -> ImageVolume:
    angle = np.deg2rad(30)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return ImageVolume(np.zeros((5, 6, 7), np.int16), spacing_xyz=(0.7, 0.8, 3.0), origin_lps=(10, -20, 30),
                       direction_lps=direction)


def test_index_to_lps_matches_simpleitk():
    image = rotated_image()
    reference = image.to_sitk()
    for index_zyx in [(0, 0, 0), (4, 5, 6), (2.5, 1.25, 3.75)]:
        expected = reference.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in index_zyx[::-1]))
        assert np.allclose(image.index_zyx_to_lps(index_zyx), expected)
        assert np.allclose(image.lps_to_index_zyx(expected), index_zyx)


def test_ras_is_lps_with_first_two_axes_flipped():
    image = rotated_image()
    lps = image.index_zyx_to_lps((1, 2, 3))
    ras = image.index_zyx_to_ras((1, 2, 3))
    assert np.allclose(ras, lps * [-1, -1, 1])
    assert np.allclose(image.ras_to_index_zyx(ras), (1, 2, 3))


def test_round_trip_through_file_keeps_geometry(tmp_path):
    image = rotated_image()
    write_mask(np.ones(image.shape_zyx), image, tmp_path / "m.nrrd")
    back = read_image(tmp_path / "m.nrrd")
    assert back.same_grid(image)
    assert back.array.dtype == np.uint8


def test_bad_images_are_reported(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"junk")
    with pytest.raises(ImageReadError, match="Could not read"):
        read_image(tmp_path / "junk.nii.gz")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ImageReadError, match="No DICOM series"):
        read_image(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="3D"):
        ImageVolume(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="orthonormal"):
        ImageVolume(np.zeros((2, 2, 2)), direction_lps=np.zeros((3, 3)))


def test_a_sheared_grid_is_a_clear_error_that_says_to_resample(tmp_path):
    """A non-orthogonal NRRD (e.g. a CT with gantry tilt) is refused with what to do, not a bare ValueError."""
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4 4 3\n"
              "space directions: (1,0,0) (0.5,1,0) (0,0,2)\nkinds: domain domain domain\nendian: little\n"
              "encoding: raw\nspace origin: (0,0,0)\n\n")
    (tmp_path / "shear.nrrd").write_bytes(header.encode() + np.zeros(4 * 4 * 3, "<i2").tobytes())
    with pytest.raises(ImageReadError, match="shear.nrrd.*orthonormal.*perpendicular: resample it"):
        read_image(tmp_path / "shear.nrrd")


def test_dicom_series_folder_is_read():
    from golden import SHARED, require

    image = read_image(require(SHARED / "data" / "totalsegmentator_examples" / "example_ct_dicom"))
    assert image.shape_zyx[1:] == (512, 512) and image.shape_zyx[0] == 20
    assert np.isclose(image.spacing_xyz[2], 2.0, atol=0.05)
