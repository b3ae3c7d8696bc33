"""Markups (point list, ROI) -> engine prompts, with parent transforms on the volume AND on the markup."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.errors import PromptError  # noqa: E402
from LesionLocatorLib.image import ImageVolume  # noqa: E402
from LesionLocatorLib.prompts import BoxPrompt, PointPrompt  # noqa: E402
from LesionLocatorSlicer import geometry, prompts  # noqa: E402
from LesionLocatorSlicer.logic import promptFromInputs  # noqa: E402
from test_slicer_geometry import addLinearTransform, rigid, rotation  # noqa: E402


@pytest.fixture
def transformedVolume(scene):
    """An oblique, anisotropic 20x30x40 volume under a rigid transform."""
    image = ImageVolume(np.zeros((20, 30, 40), np.int16), (0.8, 0.6, 2.5), (10.0, 20.0, -30.0), rotation([1, 1, 0], 20))
    node = geometry.addVolumeNodeFromImage(scene, image, "baseline")
    node.SetAndObserveTransformNodeID(addLinearTransform(scene, rigid([0, 0, 1], 35, [4, -6, 9])).GetID())
    return node


def worldOfIndexZYX(volumeNode, indexZYX) -> np.ndarray:
    """Independent path: IJKToRAS, then the transform node's own TransformPointToWorld."""
    localRAS = geometry.arrayFromVTKMatrix(_ijkToRAS(volumeNode)) @ np.append(np.asarray(indexZYX, float)[::-1], 1)
    world = [0.0, 0.0, 0.0]
    volumeNode.TransformPointToWorld(localRAS[:3], world)
    return np.asarray(world)


def _ijkToRAS(volumeNode):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def placeUnderTransform(markupsNode, scene, worldPoints):
    """Put the markup under its own transform and give it local positions that land on `worldPoints`."""
    transform = addLinearTransform(scene, rigid([0, 1, 0], -50, [-7, 3, 1]))
    markupsNode.SetAndObserveTransformNodeID(transform.GetID())
    toLocal = np.linalg.inv(rigid([0, 1, 0], -50, [-7, 3, 1]))
    return [(toLocal @ np.append(point, 1))[:3] for point in worldPoints]


def test_fiducial_under_its_own_transform_maps_to_the_volume_index(scene, transformedVolume):
    targetZYX = np.array([7.3, 12.6, 25.1])
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    (local,) = placeUnderTransform(fiducial, scene, [worldOfIndexZYX(transformedVolume, targetZYX)])
    fiducial.AddControlPoint(*local)
    image = geometry.imageVolumeFromVolumeNode(transformedVolume)
    prompt = prompts.promptFromMarkups(image, fiducial)
    assert isinstance(prompt, PointPrompt)
    np.testing.assert_allclose(prompt.index_zyx, targetZYX, atol=1e-6)


def test_last_fiducial_point_is_the_prompt(scene, transformedVolume):
    fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for indexZYX in ([1, 2, 3], [4, 5, 6]):
        fiducial.AddControlPoint(*worldOfIndexZYX(transformedVolume, indexZYX))
    prompt = prompts.promptFromMarkups(geometry.imageVolumeFromVolumeNode(transformedVolume), fiducial)
    np.testing.assert_allclose(prompt.index_zyx, [4, 5, 6], atol=1e-6)


def test_roi_aligned_with_the_voxels_gives_the_voxel_box_under_both_transforms(scene, transformedVolume):
    """An ROI whose faces lie inside the edge voxels lo and hi-1 (0.1 voxel in from their outer edges, so rounding
    at an exact voxel edge plays no part) must give exactly [lo, hi)."""
    loZYX, hiZYX = np.array([3, 5, 8]), np.array([9, 14, 20])
    centreZYX = (loZYX + hiZYX - 1) / 2.0
    image = geometry.imageVolumeFromVolumeNode(transformedVolume)
    ijkToWorld = geometry.ijkToWorldMatrix(transformedVolume)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    objectToWorld = np.eye(4)
    objectToWorld[:3, :3] = ijkToWorld[:3, :3] / np.linalg.norm(ijkToWorld[:3, :3], axis=0)
    objectToWorld[:3, 3] = worldOfIndexZYX(transformedVolume, centreZYX)
    roiTransform = addLinearTransform(scene, rigid([1, 0, 1], 60, [2, 2, -5]))
    roi.SetAndObserveTransformNodeID(roiTransform.GetID())
    roi.SetSize(*((hiZYX - loZYX - 0.2)[::-1] * np.asarray(image.spacing_xyz)))
    # the ROI centre is the translation of ObjectToNode
    objectToNode = np.linalg.inv(rigid([1, 0, 1], 60, [2, 2, -5])) @ objectToWorld
    roi.SetAndObserveObjectToNodeMatrix(geometry.vtkMatrixFromArray(objectToNode))
    prompt = prompts.promptFromMarkups(image, roi)
    assert isinstance(prompt, BoxPrompt)
    np.testing.assert_array_equal(prompt.lo_zyx, loZYX)
    np.testing.assert_array_equal(prompt.hi_zyx, hiZYX)


def test_roi_corners_follow_the_roi_transform(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(1, 2, 3)
    roi.SetSize(2, 4, 6)
    roi.SetAndObserveTransformNodeID(addLinearTransform(scene, rigid([0, 0, 1], 90, [10, 0, 0])).GetID())
    corners = prompts.roiCornersWorld(roi)
    local = prompts.boxCornersFromTwoPoints([0, 0, 0], [2, 4, 6])
    expected = (np.c_[local, np.ones(8)] @ rigid([0, 0, 1], 90, [10, 0, 0]).T)[:, :3]
    np.testing.assert_allclose(sorted(map(tuple, corners)), sorted(map(tuple, expected)), atol=1e-9)


def test_box_from_two_world_corners_keeps_the_voxel_centres_inside():
    image = ImageVolume(np.zeros((10, 10, 10), np.int16), (1.0, 2.0, 3.0), direction_lps=np.diag([1.0, -1.0, -1.0]))
    cornerA, cornerB = image.index_zyx_to_ras([1.2, 2.7, 3.0]), image.index_zyx_to_ras([6.6, 7.4, 8.5])
    box = prompts.boxPromptFromWorldCorners(image, prompts.boxCornersFromTwoPoints(cornerA, cornerB))
    assert box == BoxPrompt((2.0, 3.0, 3.0), (7.0, 8.0, 9.0))


def test_box_thinner_than_a_voxel_keeps_the_voxel_it_crosses():
    image = ImageVolume(np.zeros((10, 10, 10), np.int16))
    box = prompts.boxPromptFromWorldCorners(image, image.index_zyx_to_ras([[4.2, 1.0, 1.0], [4.4, 5.0, 5.0]]))
    assert box == BoxPrompt((4.0, 1.0, 1.0), (5.0, 6.0, 6.0))


def test_empty_markups_are_refused(scene, transformedVolume):
    image = geometry.imageVolumeFromVolumeNode(transformedVolume)
    with pytest.raises(PromptError, match="no point"):
        prompts.promptFromMarkups(image, scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))
    with pytest.raises(PromptError, match="use a point list or an ROI"):
        prompts.promptFromMarkups(image, scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode"))


def test_roi_drawn_in_a_slice_view_gets_depth_but_a_3d_roi_is_kept(scene):
    flat = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    flat.SetSize(30.0, 0.0, 20.0)
    assert prompts.deepenFlatROI(flat)
    assert flat.GetSize() == (30.0, 25.0, 20.0)
    box = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    box.SetSize(30.0, 12.0, 20.0)
    assert not prompts.deepenFlatROI(box) and box.GetSize() == (30.0, 12.0, 20.0)


@pytest.mark.parametrize("inputs, message", [
    (dict(pointRAS=[1.0, 2.0]), r"pointRAS must be one point \(R, A, S\)"),
    (dict(boxRAS=[[1.0, 2.0, 3.0]]), r"boxRAS must be two opposite corners"),
    (dict(boxRAS=[[1.0, 2.0, 3.0], [4.0, 5.0]]), r"boxRAS must be two opposite corners"),
])
def test_malformed_console_prompts_say_what_is_expected(transformedVolume, inputs, message):
    with pytest.raises(PromptError, match=message):
        promptFromInputs(geometry.imageVolumeFromVolumeNode(transformedVolume), **inputs)
