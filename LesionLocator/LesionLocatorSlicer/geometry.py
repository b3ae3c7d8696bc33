"""Volume nodes -> engine images, with the volume's parent transform applied to the geometry only.

The engine sees each timepoint in world coordinates (IJK -> world = parent transform x IJKToRAS), so prompts placed
in world RAS and registrations between timepoints honour the user's alignment transforms. Voxels are never
resampled: the engine's masks stay on the volume's own voxel grid and are written to a segmentation that lives
under the same parent transform as the volume.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from LesionLocatorLib.errors import LesionLocatorError
from LesionLocatorLib.image import LPS_TO_RAS, ImageVolume

ORTHOGONALITY_TOLERANCE = 1e-4


class GeometryError(LesionLocatorError):
    """A volume whose geometry the engine cannot use as it is (non-linear or shearing transform, no voxels)."""


def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def localToWorldMatrix(node) -> np.ndarray:
    """4x4 RAS matrix of the node's parent transforms; refuses non-linear ones (they would need resampling)."""
    transformNode = node.GetParentTransformNode()
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise GeometryError(
            f"'{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'. "
            "Harden the transform on the volume first (Data module: right-click the volume > Harden transform), "
            "which resamples it, then run LesionLocator again."
        )
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(matrix)
    return arrayFromVTKMatrix(matrix)


def ijkToWorldMatrix(volumeNode) -> np.ndarray:
    """4x4 matrix from the volume's IJK voxel indices to world RAS, parent transforms included."""
    return localToWorldMatrix(volumeNode) @ ijkToRASMatrix(volumeNode)


def ijkToRASMatrix(volumeNode) -> np.ndarray:
    """4x4 matrix from the volume's IJK voxel indices to its local RAS (no parent transform)."""
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    return arrayFromVTKMatrix(ijkToRAS)


def geometryFromIJKToWorld(ijkToWorld: np.ndarray, name: str = "") -> tuple[tuple, tuple, np.ndarray]:
    """(spacing_xyz, origin_lps, direction_lps) of an IJK -> RAS matrix; shear cannot be expressed and is refused."""
    spacing, directionRAS = _spacingAndDirection(ijkToWorld, name)
    if not _orthonormal(directionRAS):
        raise GeometryError(
            f"'{name}' is under a transform with shear: its voxel axes are not orthogonal in world space. "
            "Harden the transform on the volume (which resamples it), then run LesionLocator again."
        )
    originLPS = LPS_TO_RAS @ ijkToWorld[:3, 3]
    return tuple(spacing), tuple(originLPS), LPS_TO_RAS @ directionRAS


def _spacingAndDirection(ijkToRAS: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    axesRAS = ijkToRAS[:3, :3]
    spacing = np.linalg.norm(axesRAS, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"'{name}' has a degenerate IJK to RAS matrix (zero voxel spacing).")
    return spacing, axesRAS / spacing


def _orthonormal(directionRAS: np.ndarray) -> bool:
    return np.allclose(directionRAS.T @ directionRAS, np.eye(3), atol=ORTHOGONALITY_TOLERANCE)


def _refuseShearedVoxelGrid(volumeNode) -> None:
    """A volume whose own IJK to RAS matrix shears (e.g. a gantry-tilted CT read without regularization) has no
    transform to harden: it must be resampled."""
    name = volumeNode.GetName()
    if not _orthonormal(_spacingAndDirection(ijkToRASMatrix(volumeNode), name)[1]):
        raise GeometryError(
            f"'{name}' has a sheared voxel grid (its IJK to RAS matrix is not orthogonal, e.g. a gantry-tilted CT). "
            "Resample it onto a regular grid (e.g. Crop Volume with interpolated cropping, or reload the DICOM "
            "series with acquisition geometry regularization), then run LesionLocator on the resampled volume."
        )


def imageVolumeFromVolumeNode(volumeNode) -> ImageVolume:
    """A copy of the voxels (z, y, x) with the world geometry; the node itself is not modified."""
    # copy: the worker thread must not share memory that the main thread may modify or free
    array = voxelArrayView(volumeNode).copy()
    _refuseShearedVoxelGrid(volumeNode)
    spacingXYZ, originLPS, directionLPS = geometryFromIJKToWorld(ijkToWorldMatrix(volumeNode), volumeNode.GetName())
    return ImageVolume(array, spacingXYZ, originLPS, directionLPS, name=volumeNode.GetName())


def voxelArrayView(volumeNode) -> np.ndarray:
    """The node's voxels (z, y, x) as a view of its image data: read on the main thread only, never kept."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise GeometryError(f"Volume '{name}' has no voxels. Load an image first.")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise GeometryError(
            f"'{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components per voxel; "
            "LesionLocator needs a scalar (grey-level) volume."
        )
    dimensionsIJK = imageData.GetDimensions()
    return numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dimensionsIJK[::-1])


def ijkToRASFromImage(image: ImageVolume) -> np.ndarray:
    """The 4x4 IJK -> RAS matrix of an engine image (the inverse of geometryFromIJKToWorld)."""
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ image.direction_lps @ np.diag(image.spacing_xyz)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.origin_lps)
    return matrix


def addVolumeNodeFromImage(scene, image: ImageVolume, name: str = ""):
    """A new scalar volume node holding a copy of the image's voxels and its geometry."""
    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or image.name or "Volume")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.shape_zyx[::-1])
    vtkArray = numpy_support.numpy_to_vtk(np.ascontiguousarray(image.array).ravel(), deep=True)
    imageData.GetPointData().SetScalars(vtkArray)
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRASFromImage(image)))
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode
