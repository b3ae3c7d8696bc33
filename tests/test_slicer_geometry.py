"""Volume node -> engine image conversion on real MRML classes (slicer-core), transforms included."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

import vtk  # noqa: E402

from LesionLocatorLib.image import ImageVolume  # noqa: E402
from LesionLocatorSlicer import geometry  # noqa: E402

RNG = np.random.default_rng(7)


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def obliqueIJKToRAS() -> np.ndarray:
    """Anisotropic spacing, a rotated and flipped direction, an arbitrary origin."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation([1, 2, 3], 25) @ np.diag([-1, 1, 1]) @ np.diag([0.7, 0.9, 3.0])
    matrix[:3, 3] = [12.5, -40.0, 88.0]
    return matrix


def addVolume(scene, ijkToRAS: np.ndarray, shapeZYX=(6, 7, 8)):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*shapeZYX[::-1])
    imageData.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(imageData)
    slicer.util.arrayFromVolume(node)[:] = RNG.integers(-1000, 1000, shapeZYX)
    node.SetIJKToRASMatrix(geometry.vtkMatrixFromArray(ijkToRAS))
    return node


def addLinearTransform(scene, matrix: np.ndarray, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(geometry.vtkMatrixFromArray(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def rigid(axis, degrees, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(axis, degrees)
    matrix[:3, 3] = translation
    return matrix


def homogeneous(points) -> np.ndarray:
    return np.c_[points, np.ones(len(points))]


def test_oblique_anisotropic_volume_maps_index_to_ras_exactly_both_ways(scene):
    ijkToRAS = obliqueIJKToRAS()
    node = addVolume(scene, ijkToRAS)
    image = geometry.imageVolumeFromVolumeNode(node)
    indicesIJK = RNG.uniform(-0.5, 6.5, (20, 3))
    expectedRAS = (homogeneous(indicesIJK) @ ijkToRAS.T)[:, :3]
    np.testing.assert_allclose(image.index_zyx_to_ras(indicesIJK[:, ::-1]), expectedRAS, atol=1e-9)
    np.testing.assert_allclose(image.ras_to_index_zyx(expectedRAS), indicesIJK[:, ::-1], atol=1e-9)
    np.testing.assert_allclose(image.spacing_xyz, [0.7, 0.9, 3.0])
    np.testing.assert_array_equal(image.array, slicer.util.arrayFromVolume(node))


def test_nested_parent_transforms_are_in_the_geometry_and_the_node_is_untouched(scene):
    ijkToRAS = obliqueIJKToRAS()
    node = addVolume(scene, ijkToRAS)
    outer = addLinearTransform(scene, rigid([0, 0, 1], 30, [5, -3, 2]))
    inner = addLinearTransform(scene, rigid([1, 0, 0], -15, [0, 10, 0]), parent=outer)
    node.SetAndObserveTransformNodeID(inner.GetID())
    image = geometry.imageVolumeFromVolumeNode(node)
    indicesIJK = RNG.uniform(0, 5, (10, 3))
    worldFromIJK = rigid([0, 0, 1], 30, [5, -3, 2]) @ rigid([1, 0, 0], -15, [0, 10, 0]) @ ijkToRAS
    expectedWorld = (homogeneous(indicesIJK) @ worldFromIJK.T)[:, :3]
    np.testing.assert_allclose(image.index_zyx_to_ras(indicesIJK[:, ::-1]), expectedWorld, atol=1e-9)
    localMatrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(localMatrix)
    np.testing.assert_allclose(geometry.arrayFromVTKMatrix(localMatrix), ijkToRAS)
    assert node.GetTransformNodeID() == inner.GetID()


def test_scaling_transform_goes_into_the_spacing(scene):
    node = addVolume(scene, obliqueIJKToRAS())
    node.SetAndObserveTransformNodeID(addLinearTransform(scene, np.diag([2.0, 2.0, 2.0, 1.0])).GetID())
    np.testing.assert_allclose(geometry.imageVolumeFromVolumeNode(node).spacing_xyz, [1.4, 1.8, 6.0])


def test_shearing_transform_is_refused_with_advice(scene):
    shear = np.eye(4)
    shear[0, 1] = 0.4
    node = addVolume(scene, np.eye(4))
    node.SetAndObserveTransformNodeID(addLinearTransform(scene, shear).GetID())
    with pytest.raises(geometry.GeometryError, match="shear.*Harden"):
        geometry.imageVolumeFromVolumeNode(node)


def test_sheared_voxel_grid_without_a_transform_is_refused_with_advice_to_resample(scene):
    ijkToRAS = np.diag([-1.5, -1.5, 3.0, 1.0])
    ijkToRAS[1, 2] = 0.8  # e.g. a gantry-tilted CT read without regularization
    with pytest.raises(geometry.GeometryError, match="sheared voxel grid.*Resample") as error:
        geometry.imageVolumeFromVolumeNode(addVolume(scene, ijkToRAS))
    assert "Harden" not in str(error.value)


def test_non_linear_transform_is_refused_with_advice(scene):
    node = addVolume(scene, np.eye(4))
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    displacement = vtk.vtkImageData()
    displacement.SetDimensions(3, 3, 3)
    displacement.AllocateScalars(vtk.VTK_DOUBLE, 3)
    gridTransform = slicer.vtkOrientedGridTransform()
    gridTransform.SetDisplacementGridData(displacement)
    grid.SetAndObserveTransformFromParent(gridTransform)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(geometry.GeometryError, match="non-linear.*Harden"):
        geometry.imageVolumeFromVolumeNode(node)


def test_volume_without_voxels_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(geometry.GeometryError, match="no voxels"):
        geometry.imageVolumeFromVolumeNode(node)


def test_engine_image_round_trips_through_a_volume_node(scene):
    direction = rotation([0, 1, 1], 40)
    image = ImageVolume(RNG.integers(0, 100, (4, 5, 6)).astype(np.int16), (0.5, 0.75, 2.5), (3.0, -2.0, 7.0), direction)
    back = geometry.imageVolumeFromVolumeNode(geometry.addVolumeNodeFromImage(scene, image, "round trip"))
    assert back.same_grid(image, tol=1e-9)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == np.int16
