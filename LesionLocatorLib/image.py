"""The engine's image type and its geometry.

Conventions used everywhere in LesionLocatorLib:
- `array` is indexed (z, y, x), i.e. SimpleITK's `GetArrayFromImage` order; `index_zyx` names such indices.
- `spacing_xyz`, `origin_lps` and `direction_lps` are in ITK order and space: x first, physical points in
  LPS millimetres, `direction_lps[:, i]` is the LPS direction of voxel axis i (i = x, j = y, k = z).
- RAS points (Slicer's world space) differ from LPS by the sign of the first two coordinates.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LesionLocatorError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class ImageReadError(LesionLocatorError, ValueError):
    """An image file or folder could not be read."""


@dataclass
class ImageVolume:
    """A 3D scalar image: voxels in (z, y, x) order plus ITK (LPS) geometry."""

    array: np.ndarray
    spacing_xyz: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = ""

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"An ImageVolume needs a 3D array (z, y, x); got shape {self.array.shape}.")
        self.spacing_xyz = tuple(float(s) for s in self.spacing_xyz)
        self.origin_lps = tuple(float(o) for o in self.origin_lps)
        self.direction_lps = np.asarray(self.direction_lps, dtype=float).reshape(3, 3)
        if any(s <= 0 or not np.isfinite(s) for s in self.spacing_xyz):
            raise ValueError(f"Voxel spacing must be positive and finite; got {self.spacing_xyz}.")
        if abs(abs(np.linalg.det(self.direction_lps)) - 1.0) > 1e-3:
            raise ValueError(f"The direction matrix must be orthonormal; got {self.direction_lps.tolist()}.")

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return self.spacing_xyz[::-1]

    def with_array(self, array: np.ndarray, name: str | None = None) -> "ImageVolume":
        """Same geometry, other voxels (e.g. a mask on this image's grid)."""
        if tuple(array.shape) != self.shape_zyx:
            raise ValueError(f"Array shape {array.shape} does not match the image grid {self.shape_zyx}.")
        return replace(self, array=array, name=self.name if name is None else name)

    def same_grid(self, other: "ImageVolume", tol: float = 1e-4) -> bool:
        return (
            self.shape_zyx == other.shape_zyx
            and np.allclose(self.spacing_xyz, other.spacing_xyz, atol=tol)
            and np.allclose(self.origin_lps, other.origin_lps, atol=tol * 10)
            and np.allclose(self.direction_lps, other.direction_lps, atol=tol)
        )

    # --- index <-> physical -------------------------------------------------------------------------------
    def _ijk_to_lps_matrix(self) -> np.ndarray:
        return self.direction_lps @ np.diag(self.spacing_xyz)

    def index_zyx_to_lps(self, index_zyx) -> np.ndarray:
        """Continuous (z, y, x) voxel indices (..., 3) -> LPS points (..., 3) in mm."""
        ijk = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return ijk @ self._ijk_to_lps_matrix().T + np.asarray(self.origin_lps)

    def lps_to_index_zyx(self, point_lps) -> np.ndarray:
        """LPS points (..., 3) in mm -> continuous (z, y, x) voxel indices (..., 3)."""
        rel = np.asarray(point_lps, dtype=float) - np.asarray(self.origin_lps)
        ijk = rel @ np.linalg.inv(self._ijk_to_lps_matrix()).T
        return ijk[..., ::-1]

    def index_zyx_to_ras(self, index_zyx) -> np.ndarray:
        return self.index_zyx_to_lps(index_zyx) @ LPS_TO_RAS

    def ras_to_index_zyx(self, point_ras) -> np.ndarray:
        return self.lps_to_index_zyx(np.asarray(point_ras, dtype=float) @ LPS_TO_RAS)

    # --- SimpleITK ------------------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image, name: str = "") -> "ImageVolume":
        if image.GetDimension() != 3:
            raise ImageReadError(f"Only 3D images are supported; '{name or 'image'}' has {image.GetDimension()} dimensions.")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ImageReadError(
                f"'{name or 'image'}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                "give a single-channel (scalar) image."
            )
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing_xyz=image.GetSpacing(),
            origin_lps=image.GetOrigin(),
            direction_lps=np.asarray(image.GetDirection()).reshape(3, 3),
            name=name,
        )

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array if array is None else array)
        image.SetSpacing(self.spacing_xyz)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(self.direction_lps.flatten().tolist())
        return image


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def without_nan(image: ImageVolume) -> ImageVolume:
    """The image with NaN voxels (left by some registration or resampling tools) set to its minimum, with a warning.
    nnU-Net has no answer for NaN: normalization and resampling spread it over the whole grid, and every mask
    comes out empty."""
    if image.array.dtype.kind != "f":
        return image
    nan = np.isnan(image.array)
    if not nan.any():
        return image
    label = f"Image '{image.name}'" if image.name else "The image"
    if nan.all():
        raise LesionLocatorError(f"{label} holds only NaN voxels; check the tool that wrote it.")
    minimum = np.nanmin(image.array)
    warnings.warn(f"{label} has {int(nan.sum())} NaN voxel(s); they are treated as its minimum ({float(minimum):.4g}). "
                  "Replace them before segmenting if another value is meant.", stacklevel=3)
    return image.with_array(np.where(nan, minimum, image.array))


def resampled_onto(image: sitk.Image, grid: ImageVolume, interpolator: int, outside: float = 0.0,
                   pixel_type: int = sitk.sitkUnknown) -> np.ndarray:
    """`image` sampled at the voxels of `grid` (physical space), as a (z, y, x) array (its own pixel type unless
    `pixel_type` is given)."""
    return sitk.GetArrayFromImage(sitk.Resample(image, list(grid.shape_zyx[::-1]), sitk.Transform(), interpolator,
                                                grid.origin_lps, grid.spacing_xyz,
                                                grid.direction_lps.flatten().tolist(), outside, pixel_type))


def is_image_file(path: str | os.PathLike) -> bool:
    """A file with an image extension SimpleITK reads (a DICOM series is a folder instead)."""
    path = Path(path)
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def image_stem(path: str | os.PathLike) -> str:
    """File name without the image extension ('a.nii.gz' -> 'a'); a DICOM folder keeps its name."""
    name = Path(path).name
    for ext in (*IMAGE_SUFFIXES, ".seg.nrrd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def read_image(path: str | os.PathLike) -> ImageVolume:
    """Read NIfTI, NRRD, MHA/MHD or a DICOM series folder (the largest series in it)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"Image not found: {path}. Check the path (a file, or a folder holding one DICOM series).")
    try:
        if path.is_dir():
            return ImageVolume.from_sitk(_read_dicom_series(path), name=path.name)
        return ImageVolume.from_sitk(sitk.ReadImage(str(path)), name=image_stem(path))
    except ImageReadError:
        raise
    except RuntimeError as error:
        raise ImageReadError(
            f"Could not read {path}: {str(error).strip().splitlines()[-1]}. "
            "Supported: .nii/.nii.gz, .nrrd, .mha/.mhd and DICOM series folders."
        ) from error
    except ValueError as error:  # a grid ImageVolume refuses: sheared axes (e.g. a CT with gantry tilt)
        raise ImageReadError(
            f"Cannot use {path}: {error} Its voxel axes must be perpendicular: resample it onto a regular grid "
            "first (e.g. with 3D Slicer or SimpleITK, or dcm2niix's gantry-tilt correction for DICOM) and give "
            "the resampled image."
        ) from error


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or []
    if not series_ids:
        raise ImageReadError(f"No DICOM series found in folder {folder}.")
    files = max(
        (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def write_volume(array: np.ndarray, reference: ImageVolume, path: str | os.PathLike) -> None:
    """Write an array on `reference`'s grid (size, spacing, origin, direction copied)."""
    sitk.WriteImage(reference.to_sitk(np.asarray(array)), str(path), useCompression=True)


def write_mask(mask: np.ndarray, reference: ImageVolume, path: str | os.PathLike) -> None:
    """Write a uint8 0/1 mask on `reference`'s grid."""
    write_volume(np.asarray(mask, dtype=np.uint8), reference, path)
