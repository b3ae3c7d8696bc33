"""Lesion segments per timepoint, user segments, undo, lesion table, subject hierarchy and scene save/reload.

The engine is not involved: results are applied through the Logic's apply step, the code path the engine's output
takes (prepare/compute run in test_slicer_logic_end_to_end.py).
"""
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.image import ImageVolume  # noqa: E402
from LesionLocatorSlicer import geometry, segments, timepoints  # noqa: E402
from LesionLocatorSlicer.logic import EngineSettings, LesionTrackingLogic, SegmentationRequest  # noqa: E402
from test_slicer_geometry import addLinearTransform, rigid, rotation  # noqa: E402

SHAPE_ZYX = (12, 16, 20)


@pytest.fixture
def logic(scene):
    return LesionTrackingLogic(scene)


def addTimepoint(scene, name: str, transformed: bool = False):
    image = ImageVolume(np.zeros(SHAPE_ZYX, np.int16), (0.8, 0.9, 2.0), (5.0, -3.0, 10.0), rotation([0, 1, 0], 15))
    node = geometry.addVolumeNodeFromImage(scene, image, name)
    if transformed:
        node.SetAndObserveTransformNodeID(addLinearTransform(scene, rigid([0, 0, 1], 20, [3, 4, 5])).GetID())
    return node


def cube(lo, hi) -> np.ndarray:
    mask = np.zeros(SHAPE_ZYX, np.uint8)
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return mask


def applyMask(logic, volumeNode, mask, lesionId=None) -> int:
    """The apply step of segmentLesion, with `mask` as the engine's output."""
    lesionId = lesionId if lesionId is not None else max(logic.lesionIds(), default=0) + 1
    image = geometry.imageVolumeFromVolumeNode(volumeNode)
    request = SegmentationRequest(volumeNode.GetID(), lesionId, image, None, Path("unused"), EngineSettings())
    return logic.applySegmentation(request, mask)


def lesionSegment(volumeNode, lesionId):
    node = segments.timepointSegmentationNode(volumeNode)
    return node, node.GetSegmentation().GetSegment(segments.lesionSegmentIds(node)[lesionId])


def test_a_lesion_has_the_same_name_colour_and_tag_at_every_timepoint(scene, logic):
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up", transformed=True)
    lesionId = applyMask(logic, baseline, cube((2, 3, 4), (5, 7, 9)))
    applyMask(logic, followUp, cube((3, 3, 4), (6, 8, 10)), lesionId=lesionId)
    (nodeA, segmentA), (nodeB, segmentB) = lesionSegment(baseline, lesionId), lesionSegment(followUp, lesionId)
    assert nodeA is not nodeB
    assert segmentA.GetName() == segmentB.GetName() == "Lesion 1"
    assert segmentA.GetColor() == segmentB.GetColor()
    assert segments.segmentTag(segmentA, segments.LESION_ID_TAG) == segments.segmentTag(segmentB, segments.LESION_ID_TAG) == "1"
    assert "SCT^4147007^Mass" in segmentB.GetTerminology()
    assert nodeB.GetTransformNodeID() == followUp.GetTransformNodeID()
    np.testing.assert_array_equal(segments.lesionMaskArray(nodeB, segments.lesionSegmentIds(nodeB)[1], followUp),
                                  cube((3, 3, 4), (6, 8, 10)))


def test_only_the_bounding_box_of_the_mask_is_written(scene, logic):
    volume = addTimepoint(scene, "baseline")
    applyMask(logic, volume, cube((2, 3, 4), (5, 7, 9)))
    node, _ = lesionSegment(volume, 1)
    labelmap = node.GetBinaryLabelmapInternalRepresentation(segments.lesionSegmentIds(node)[1])
    assert labelmap.GetExtent() == (4, 8, 3, 6, 2, 4)  # (i, j, k) min/max = the mask's box, not the volume


def test_user_segments_are_never_overwritten(scene, logic):
    volume = addTimepoint(scene, "baseline")
    applyMask(logic, volume, cube((2, 2, 2), (6, 6, 6)))
    node, _ = lesionSegment(volume, 1)
    userId = node.GetSegmentation().AddEmptySegment("", "my liver", (0.5, 0.2, 0.1))
    userMask = cube((0, 0, 0), (8, 8, 8))  # overlaps the lesion before and after
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        segments.boundingBoxLabelmap(userMask, volume), node, userId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    applyMask(logic, volume, cube((4, 4, 4), (10, 10, 10)), lesionId=1)
    np.testing.assert_array_equal(segments.lesionMaskArray(node, userId, volume), userMask)
    assert node.GetSegmentation().GetSegment(userId).GetName() == "my liver"
    assert sorted(segments.lesionSegmentIds(node)) == [1]


def test_undo_restores_the_previous_mask_then_the_scene_as_it_was(scene, logic):
    volume = addTimepoint(scene, "baseline")
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # Slicer has one from the start
    nodesBefore = scene.GetNumberOfNodes()
    first, second = cube((2, 2, 2), (5, 5, 5)), cube((6, 6, 6), (9, 12, 14))
    applyMask(logic, volume, first)
    applyMask(logic, volume, second, lesionId=1)
    node, _ = lesionSegment(volume, 1)
    assert logic.undo().startswith("segmenting Lesion 1")
    np.testing.assert_array_equal(segments.lesionMaskArray(node, segments.lesionSegmentIds(node)[1], volume), first)
    logic.undo()
    assert segments.timepointSegmentationNode(volume) is None
    assert scene.GetNumberOfNodes() == nodesBefore
    assert logic.undo() is None and not logic.canUndo


def test_closing_the_scene_forgets_the_undo_steps(scene, logic):
    applyMask(logic, addTimepoint(scene, "baseline"), cube((2, 2, 2), (5, 5, 5)))
    assert logic.canUndo
    scene.Clear(0)
    assert not logic.canUndo


def test_delete_lesion_removes_it_everywhere_and_undo_brings_it_back(scene, logic):
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up")
    applyMask(logic, baseline, cube((2, 2, 2), (5, 5, 5)))
    applyMask(logic, followUp, cube((3, 3, 3), (6, 6, 6)), lesionId=1)
    _, segment = lesionSegment(followUp, 1)
    colour, status = segment.GetColor(), segments.segmentTag(segment, segments.STATUS_TAG)
    logic.deleteLesion(1)
    assert logic.lesionIds() == []
    logic.undo()
    assert logic.lesionIds() == [1]
    node, restored = lesionSegment(followUp, 1)
    assert restored.GetName() == "Lesion 1" and restored.GetColor() == colour
    assert segments.segmentTag(restored, segments.STATUS_TAG) == status
    np.testing.assert_array_equal(segments.lesionMaskArray(node, segments.lesionSegmentIds(node)[1], followUp),
                                  cube((3, 3, 3), (6, 6, 6)))


def test_lesion_table_reports_status_volume_world_centre_and_user_edits(scene, logic):
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up", transformed=True)
    applyMask(logic, baseline, cube((2, 2, 2), (4, 6, 8)))
    applyMask(logic, followUp, cube((2, 2, 2), (4, 4, 4)), lesionId=1)
    applyMask(logic, baseline, cube((8, 8, 8), (10, 10, 10)))
    table = logic.lesionTable([baseline, followUp])
    assert table.timepointNames == ["baseline", "follow-up"]
    assert [row.lesionId for row in table.rows] == [1, 2]
    first = table.rows[0].cells
    assert [cell.status for cell in first] == ["prompted", "prompted"]
    assert first[0].volumeMl == pytest.approx(2 * 4 * 6 * 0.8 * 0.9 * 2.0 / 1000)
    centreWorld = geometry.imageVolumeFromVolumeNode(followUp).index_zyx_to_ras([2.5, 2.5, 2.5])
    np.testing.assert_allclose(first[1].centreRAS, centreWorld, atol=1e-6)
    assert table.rows[1].cells[1].status == "" and table.rows[1].cells[1].volumeMl is None

    node, _ = lesionSegment(baseline, 1)
    edited = segments.boundingBoxLabelmap(cube((2, 2, 2), (4, 6, 9)), baseline)  # the user paints one more slice
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        edited, node, segments.lesionSegmentIds(node)[1], slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert logic.lesionTable([baseline, followUp]).rows[0].cells[0].status == "edited"


def test_segmentation_goes_under_the_study_of_its_volume(scene, logic):
    volume = addTimepoint(scene, "baseline")
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    study = shNode.CreateStudyItem(patient, "CT 2021")
    shNode.SetItemParent(segments.subjectHierarchyItem(shNode, volume), study)
    applyMask(logic, volume, cube((2, 2, 2), (4, 4, 4)))
    segmentationItem = shNode.GetItemByDataNode(segments.timepointSegmentationNode(volume))
    assert shNode.GetItemParent(segmentationItem) == study
    assert shNode.GetItemAncestorAtLevel(segmentationItem, "Patient") == patient


def test_timepoints_are_ordered_by_study_date_else_kept_in_the_given_order(scene):
    volumes = [addTimepoint(scene, name) for name in ("c", "a", "b")]
    assert timepoints.orderTimepoints(volumes)[0] == volumes
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient 1")
    for volume, date in zip(volumes, ("20230105", "20210301", "20220710")):
        study = shNode.CreateStudyItem(patient, date)
        shNode.SetItemAttribute(study, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMStudyDateAttributeName(), date)
        shNode.SetItemParent(segments.subjectHierarchyItem(shNode, volume), study)
    ordered, how = timepoints.orderTimepoints(volumes)
    assert [node.GetName() for node in ordered] == ["a", "b", "c"] and "study date" in how


def test_study_date_falls_back_to_the_dicom_database(scene):
    class DicomDatabase:  # the two methods of ctkDICOMDatabase that are used
        def fileForInstance(self, uid):
            return {"1.2.3": "/dicom/file1"}.get(uid, "")

        def fileValue(self, fileName, tag):
            return "20200101" if (fileName, tag) == ("/dicom/file1", "0008,0020") else ""

    volume = addTimepoint(scene, "from dicom")
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    assert timepoints.studyDate(volume, DicomDatabase()) == "20200101"
    assert timepoints.studyDate(volume) == ""


def saveAndReloadBundle(scene, folder: Path):
    """What File > Save as .mrb does (bundle folder, zipped), then File > Open of that .mrb in a new scene."""
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    bundle = folder / "scene"
    os.makedirs(bundle)
    assert applicationLogic.SaveSceneToSlicerDataBundleDirectory(str(bundle))
    with zipfile.ZipFile(folder / "scene.mrb", "w") as archive:
        for path in bundle.rglob("*"):
            archive.write(path, path.relative_to(folder))
    shutil.rmtree(bundle)
    reloaded = slicer.vtkMRMLScene()
    reopening = slicer.vtkMRMLApplicationLogic()
    reopening.SetMRMLScene(reloaded)
    os.makedirs(folder / "unpacked")
    assert reopening.OpenSlicerDataBundle(str(folder / "scene.mrb"), str(folder / "unpacked"))
    return reloaded


def test_saved_and_reloaded_scene_keeps_the_links_between_a_lesions_segments(scene, logic, tmp_path):
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up", transformed=True)
    applyMask(logic, baseline, cube((2, 2, 2), (4, 6, 8)))
    applyMask(logic, followUp, cube((3, 3, 3), (5, 5, 5)), lesionId=1)
    applyMask(logic, followUp, cube((8, 8, 8), (10, 10, 10)))
    before = logic.lesionTable()

    reloaded = saveAndReloadBundle(scene, tmp_path)
    after = LesionTrackingLogic(reloaded).lesionTable()
    assert after.timepointNames == before.timepointNames
    assert [(row.lesionId, row.name, row.colour) for row in after.rows] == [(r.lesionId, r.name, r.colour) for r in before.rows]
    for rowBefore, rowAfter in zip(before.rows, after.rows):
        assert [c.status for c in rowAfter.cells] == [c.status for c in rowBefore.cells]
        assert [c.volumeMl for c in rowAfter.cells] == pytest.approx([c.volumeMl for c in rowBefore.cells], nan_ok=True)
        for cellBefore, cellAfter in zip(rowBefore.cells, rowAfter.cells):
            assert (cellBefore.centreRAS is None) == (cellAfter.centreRAS is None)
            if cellBefore.centreRAS is not None:
                np.testing.assert_allclose(cellAfter.centreRAS, cellBefore.centreRAS, atol=1e-4)


def lesionMask(volumeNode, lesionId) -> np.ndarray:
    node = segments.timepointSegmentationNode(volumeNode)
    return segments.lesionMaskArray(node, segments.lesionSegmentIds(node)[lesionId], volumeNode)


def addUserSegment(node, volumeNode, mask) -> str:
    userId = node.GetSegmentation().AddEmptySegment("", "my liver", (0.5, 0.2, 0.1))
    labelmap = segments.boundingBoxLabelmap(mask, volumeNode)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, node, userId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    return userId


@pytest.mark.parametrize("hardened", ["volume", "segmentation"])
def test_hardening_the_transform_on_one_node_only_keeps_every_segment_where_it_is(scene, logic, hardened):
    """Data module > Harden transform on the volume (or on its segmentation) only: the lesions stay on their voxels
    in world space, read back intact, and the next write moves neither them nor the user's segments."""
    volume = addTimepoint(scene, "baseline", transformed=True)
    first, liver = cube((2, 3, 4), (5, 7, 9)), cube((0, 0, 0), (8, 8, 8))
    applyMask(logic, volume, first)
    node, _ = lesionSegment(volume, 1)
    userId = addUserSegment(node, volume, liver)
    centre = logic.lesionTable([volume]).rows[0].cells[0].centreRAS
    (volume if hardened == "volume" else node).HardenTransform()
    np.testing.assert_array_equal(lesionMask(volume, 1), first)

    applyMask(logic, volume, cube((8, 8, 8), (10, 12, 15)))
    assert node.GetTransformNodeID() == volume.GetTransformNodeID()
    np.testing.assert_array_equal(lesionMask(volume, 1), first)
    np.testing.assert_array_equal(segments.lesionMaskArray(node, userId, volume), liver)
    cell = logic.lesionTable([volume]).rows[0].cells[0]
    assert cell.status == "prompted"
    np.testing.assert_allclose(cell.centreRAS, centre, atol=1e-6)


def test_undo_after_a_hardened_transform_puts_the_lesion_back_where_it_was(scene, logic):
    volume = addTimepoint(scene, "baseline", transformed=True)
    first = cube((2, 3, 4), (5, 7, 9))
    applyMask(logic, volume, first)
    applyMask(logic, volume, cube((3, 3, 3), (6, 9, 12)), lesionId=1)
    volume.HardenTransform()
    applyMask(logic, volume, cube((8, 8, 8), (10, 12, 15)))  # moves the segmentation into the volume's frame
    logic.undo()
    logic.undo()
    np.testing.assert_array_equal(lesionMask(volume, 1), first)


def oversample(node, volumeNode) -> None:
    """Segment Editor > Specify geometry, oversampling 2: a finer reference geometry, the segments resampled onto it."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRAS = geometry.arrayFromVTKMatrix(matrix)
    fine = ijkToRAS.copy()
    fine[:3, :3] /= 2
    fine[:3, 3] = (ijkToRAS @ [-0.25, -0.25, -0.25, 1])[:3]
    grid = slicer.vtkOrientedImageData()
    grid.SetImageToWorldMatrix(geometry.vtkMatrixFromArray(fine))
    grid.SetExtent(0, 2 * SHAPE_ZYX[2] - 1, 0, 2 * SHAPE_ZYX[1] - 1, 0, 2 * SHAPE_ZYX[0] - 1)
    segmentation = node.GetSegmentation()
    segmentation.SetConversionParameter("Reference image geometry",
                                        slicer.vtkSegmentationConverter.SerializeImageGeometry(grid))
    for segmentId in segmentation.GetSegmentIDs():  # one segment per layer here
        labelmap = segmentation.GetSegment(segmentId).GetRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, grid, resampled)
        labelmap.DeepCopy(resampled)


def test_specify_geometry_changes_neither_the_status_nor_the_place_of_a_lesion(scene, logic):
    """Its voxels on the scan are the same, so a tracked lesion stays tracked (re-tracking may update it), at the
    same world centre and volume."""
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up", transformed=True)
    applyMask(logic, baseline, cube((2, 3, 4), (5, 7, 9)))
    node = segments.timepointSegmentationNode(followUp, create=True)
    segments.writeLesionMask(node, followUp, 1, cube((3, 4, 5), (6, 9, 11)), segments.TRACKED)
    before = logic.lesionTable([baseline, followUp]).rows[0].cells[1]
    oversample(node, followUp)
    after = logic.lesionTable([baseline, followUp]).rows[0].cells[1]
    assert after.status == before.status == "tracked" and not logic._isPinned(1, followUp)
    np.testing.assert_allclose(after.centreRAS, before.centreRAS, atol=1e-6)
    assert after.volumeMl == pytest.approx(before.volumeMl)


def test_left_handed_volume_keeps_its_lesions_through_a_saved_scene(scene, logic, tmp_path):
    """Slicer's reader flips an axis of a left-handed volume when the scene is reopened, and the .seg.nrrd keeps its
    own geometry: the lesions keep status, centre and volume, also after one of them is written again."""
    direction = rotation([0, 1, 0], 15) @ np.diag([1.0, 1.0, -1.0])
    image = ImageVolume(np.zeros(SHAPE_ZYX, np.int16), (0.8, 0.9, 2.0), (5.0, -3.0, 10.0), direction)
    volume = geometry.addVolumeNodeFromImage(scene, image, "left-handed")
    applyMask(logic, volume, cube((2, 3, 4), (5, 7, 9)))
    applyMask(logic, volume, cube((7, 8, 10), (10, 12, 15)))
    before = logic.lesionTable([volume]).rows

    reloaded = saveAndReloadBundle(scene, tmp_path)
    reloadedLogic, volume = LesionTrackingLogic(reloaded), reloaded.GetFirstNodeByName("left-handed")
    ijkToRAS = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRAS)
    assert ijkToRAS.Determinant() > 0  # the flip this test is about
    after = reloadedLogic.lesionTable([volume]).rows
    assert [row.cells[0].status for row in after] == ["prompted", "prompted"]
    for rowBefore, rowAfter in zip(before, after):
        np.testing.assert_allclose(rowAfter.cells[0].centreRAS, rowBefore.cells[0].centreRAS, atol=1e-6)
        assert rowAfter.cells[0].volumeMl == pytest.approx(rowBefore.cells[0].volumeMl)
    applyMask(reloadedLogic, volume, np.roll(lesionMask(volume, 1), 1, axis=2), lesionId=1)
    assert [row.cells[0].status for row in reloadedLogic.lesionTable([volume]).rows] == ["prompted", "prompted"]
