"""The end-to-end flow that both the module's self-test (in Slicer) and pytest (headless) run.

Prompt a lesion on the first scan, track it into the others, check what the scene then holds, check that a
cancelled job leaves the scene unchanged, and undo back to the start. Failures raise AssertionError.
"""
from __future__ import annotations

import sys

import numpy as np

from LesionLocatorLib.errors import Cancelled
from LesionLocatorLib.image import ImageVolume

from . import segments
from .geometry import addVolumeNodeFromImage
from .logic import LesionTable, LesionTrackingLogic

SYNTHETIC_SHAPE_ZYX = (40, 96, 96)
SYNTHETIC_SPACING_XYZ = (1.5, 1.5, 3.0)


def addSyntheticTimepoints(scene, count: int = 3) -> tuple[list, np.ndarray]:
    """CT-like scans of one patient: a body ellipse with a hyperdense lesion that moves and grows over time.

    Returns the volume nodes and the lesion centre (world RAS) on the first one.
    """
    rng = np.random.default_rng(2025)
    centreZYX = np.array([20.0, 50.0, 44.0])
    volumes = []
    for timepoint in range(count):
        zyx = np.indices(SYNTHETIC_SHAPE_ZYX).astype(float)
        body = ((zyx[1] - 48) / 40) ** 2 + ((zyx[2] - 48) / 44) ** 2 <= 1
        array = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, SYNTHETIC_SHAPE_ZYX)
        shiftZYX = np.array([1.0, -2.0, 3.0]) * timepoint
        radiusMm = 9.0 * (1.2 ** timepoint)
        distanceMm = np.linalg.norm((zyx - (centreZYX + shiftZYX)[:, None, None, None])
                                    * np.asarray(SYNTHETIC_SPACING_XYZ[::-1])[:, None, None, None], axis=0)
        array[distanceMm <= radiusMm] = 140.0 + rng.normal(0, 12, int((distanceMm <= radiusMm).sum()))
        image = ImageVolume(array.astype(np.int16), SYNTHETIC_SPACING_XYZ, (120.0, 90.0, -60.0),
                            np.diag([-1.0, -1.0, 1.0]), name=f"Synthetic timepoint {timepoint + 1}")
        volumes.append(addVolumeNodeFromImage(scene, image))
    firstImage = ImageVolume(np.zeros(SYNTHETIC_SHAPE_ZYX), SYNTHETIC_SPACING_XYZ, (120.0, 90.0, -60.0),
                             np.diag([-1.0, -1.0, 1.0]))
    return volumes, firstImage.index_zyx_to_ras(centreZYX)


def sceneState(scene) -> list:
    """Every data node with, for our segmentations, every lesion segment's status, lymph node marker and voxels (to
    compare scenes). The subject hierarchy node is left out: Slicer always has it, a bare scene gets it on first use."""
    state = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLSubjectHierarchyNode"):
            continue
        lesions = []
        if node.IsA("vtkMRMLSegmentationNode"):
            for lesionId, segmentId in sorted(segments.lesionSegmentIds(node).items()):
                segment = node.GetSegmentation().GetSegment(segmentId)
                voxels = segments.segmentVoxels(node, segmentId, node.GetNodeReference(segments.VOLUME_REFERENCE_ROLE))
                status = segments.segmentTag(segment, segments.STATUS_TAG)
                lesions.append((lesionId, status, segments.isLymphNode(segment), sorted(voxels.fingerprints)))
        state.append((node.GetID(), lesions))
    return state


def checkLesionAtEveryTimepoint(logic: LesionTrackingLogic, volumeNodes: list, lesionId: int) -> LesionTable:
    table = logic.lesionTable(volumeNodes)
    row = next(row for row in table.rows if row.lesionId == lesionId)
    first, *followUps = row.cells
    assert first.status == segments.PROMPTED and first.volumeMl > 0, f"baseline: {first}"
    for volumeNode, cell in zip(volumeNodes[1:], followUps):
        assert cell.status in (segments.TRACKED, segments.NOT_FOUND), f"{volumeNode.GetName()}: {cell}"
        assert (cell.volumeMl > 0) == (cell.status == segments.TRACKED), f"{volumeNode.GetName()}: {cell}"
    colours, names = set(), set()
    for volumeNode in volumeNodes:
        node = segments.timepointSegmentationNode(volumeNode)
        segment = node.GetSegmentation().GetSegment(segments.lesionSegmentIds(node)[lesionId])
        colours.add(tuple(round(c, 6) for c in segment.GetColor()))
        names.add(segment.GetName())
    assert len(colours) == 1 and len(names) == 1, f"one lesion, several looks: {names} {colours}"
    return table


def checkCancelLeavesSceneUnchanged(logic: LesionTrackingLogic, lesionId: int, followUps: list) -> None:
    before = sceneState(logic.scene)
    outcome = {}
    switchInterval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)  # the engine thread gets the GIL only when this thread waits: after the cancel
    try:
        job = logic.trackLesion(lesionId, followUps, onDone=lambda value, error: outcome.update(value=value, error=error))
        job.cancelEvent.set()
    finally:
        sys.setswitchinterval(switchInterval)
    job.finished.wait()
    logic.worker.poll()
    assert isinstance(outcome.get("error"), Cancelled), f"expected a cancelled job, got {outcome}"
    assert sceneState(logic.scene) == before, "a cancelled job changed the scene"


def endToEndFlow(logic: LesionTrackingLogic, volumeNodes: list, pointRAS) -> LesionTable:
    """Segment at `pointRAS` on volumeNodes[0], track into the others, cancel a re-run, undo everything."""
    initial = sceneState(logic.scene)
    lesionId = logic.segmentLesion(volumeNodes[0], pointRAS=pointRAS)
    afterSegmentation = sceneState(logic.scene)
    logic.trackLesion(lesionId, volumeNodes[1:])
    table = checkLesionAtEveryTimepoint(logic, volumeNodes, lesionId)
    checkCancelLeavesSceneUnchanged(logic, lesionId, volumeNodes[1:])
    assert logic.undo().startswith("tracking"), "undo should first revert the tracking"
    assert sceneState(logic.scene) == afterSegmentation, "undoing the tracking did not restore the scene"
    logic.undo()
    assert sceneState(logic.scene) == initial, "undoing the segmentation did not restore the scene"
    return table
