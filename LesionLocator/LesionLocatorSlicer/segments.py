"""Lesion segments in MRML: one segmentation node per timepoint volume, one segment per lesion.

A lesion is identified by the segment tag LESION_ID_TAG (saved in .seg.nrrd), never by its name or segment id,
so user segments in the same node are left alone and renamed lesions keep their links. Masks are written through
an image whose extent is the mask's bounding box, so only the changed region is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

LESION_ID_TAG = "LesionLocator.LesionId"
STATUS_TAG = "LesionLocator.Status"
FINGERPRINT_TAG = "LesionLocator.Fingerprint"
TIMEPOINT_ATTRIBUTE = "LesionLocator.TimepointSegmentation"
VOLUME_REFERENCE_ROLE = "lesionLocatorVolume"

PROMPTED, TRACKED, NOT_FOUND, EDITED = "prompted", "tracked", "not found", "edited"
PINNED_STATUSES = (PROMPTED, EDITED)  # set by the user: tracking does not overwrite them
# the tags that undo restores (vtkSegment cannot list its tags from Python)
SNAPSHOT_TAGS = (LESION_ID_TAG, STATUS_TAG, FINGERPRINT_TAG, slicer.vtkSegment.GetTerminologyEntryTagName())

# SCT "Morphologically altered structure" / "Mass" in Slicer's serialized terminology format
LESION_TERMINOLOGY = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
    "Segmentation category and type - 3D Slicer General Anatomy list",
    "49755003", "SCT", "Morphologically Altered Structure",
    "4147007", "SCT", "Mass",
    "", "", "",
    "Anatomic codes - DICOM master list", "", "", "", "", "", "",
)
# distinct, colour-blind-friendly (Okabe-Ito and Tol), no greys: they vanish on CT
LESION_COLOURS = (
    (0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.0, 0.620, 0.451), (0.941, 0.894, 0.259),
    (0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.800, 0.475, 0.655), (0.533, 0.800, 0.933),
    (0.267, 0.667, 0.600), (0.600, 0.600, 0.200), (0.667, 0.267, 0.600), (0.867, 0.800, 0.467),
)


def lesionName(lesionId: int) -> str:
    return f"Lesion {lesionId}"


def lesionColour(lesionId: int) -> tuple[float, float, float]:
    return LESION_COLOURS[(lesionId - 1) % len(LESION_COLOURS)]


def ensureSegmentationConverterRules() -> None:
    """Slicer registers the labelmap <-> surface rules at startup; a bare slicer-core process (scripts, tests) does
    not, and segments cannot be created without them."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


# --- nodes -------------------------------------------------------------------------------------------------------
def timepointSegmentationNode(volumeNode, create: bool = False):
    """The LesionLocator segmentation of a timepoint volume (created on request), or None."""
    scene = volumeNode.GetScene()
    for node in segmentationNodes(scene):
        if node.GetAttribute(TIMEPOINT_ATTRIBUTE) and node.GetNodeReference(VOLUME_REFERENCE_ROLE) is volumeNode:
            return node
    return _createTimepointSegmentationNode(volumeNode) if create else None


def segmentationNodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    return [nodes.GetItemAsObject(index) for index in range(nodes.GetNumberOfItems())]


def _createTimepointSegmentationNode(volumeNode):
    scene = volumeNode.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} lesions")
    node.CreateDefaultDisplayNodes()
    node.SetAttribute(TIMEPOINT_ATTRIBUTE, "1")
    node.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volumeNode.GetID())
    syncTransform(node, volumeNode)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    placeInSubjectHierarchy(node, volumeNode)
    return node


def removeNodeAndHelpers(node) -> None:
    """The node and its display and storage nodes (the scene does not remove those by itself)."""
    scene = node.GetScene()
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(index) for index in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None:
            scene.RemoveNode(helper)


def syncTransform(segmentationNode, volumeNode) -> None:
    """Masks are on the volume's voxel grid, so the segmentation moves with the volume's parent transform.

    The reference geometry is computed relative to the segmentation's own transform, so it is set after the
    transform: with the same transform it is the volume's local grid, which the written labelmaps use (otherwise
    saving resamples them)."""
    if segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)


def placeInSubjectHierarchy(node, volumeNode) -> None:
    """Next to the volume: under its study (and so its patient) when it came from DICOM."""
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    volumeItem = subjectHierarchyItem(shNode, volumeNode)
    shNode.SetItemParent(subjectHierarchyItem(shNode, node), shNode.GetItemParent(volumeItem))


def subjectHierarchyItem(shNode, node) -> int:
    """The node's item; Slicer's GUI creates items for new nodes, a bare scene (scripts, tests) does not."""
    item = shNode.GetItemByDataNode(node)
    return item if item else shNode.CreateItem(shNode.GetSceneItemID(), node)


# --- lesion segments -----------------------------------------------------------------------------------------------
def lesionSegmentIds(segmentationNode) -> dict[int, str]:
    """{lesion id: segment id} of the LesionLocator segments of a segmentation node."""
    segmentation = segmentationNode.GetSegmentation()
    lesions = {}
    for segmentId in segmentation.GetSegmentIDs():
        tag = segmentTag(segmentation.GetSegment(segmentId), LESION_ID_TAG)
        if tag is not None and tag.isdigit():
            lesions[int(tag)] = segmentId
    return lesions


def segmentTag(segment, name: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else None


def addLesionSegment(segmentationNode, lesionId: int) -> str:
    segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", lesionName(lesionId), lesionColour(lesionId))
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    segment.SetTag(LESION_ID_TAG, str(lesionId))
    segment.SetTerminology(LESION_TERMINOLOGY)
    return segmentId


def writeLesionMask(segmentationNode, volumeNode, lesionId: int, maskZYX: np.ndarray | None, status: str) -> str:
    """Replace the lesion's segment with `maskZYX` (volume grid; None or empty: lesion not found there)."""
    segmentId = lesionSegmentIds(segmentationNode).get(lesionId) or addLesionSegment(segmentationNode, lesionId)
    labelmap = boundingBoxLabelmap(maskZYX, volumeNode)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentationNode, segmentId,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, labelmap.GetExtent(), False, [],
    )
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    segment.SetTag(STATUS_TAG, status)
    segment.SetTag(FINGERPRINT_TAG, maskFingerprint(maskZYX))
    return segmentId


def boundingBoxLabelmap(maskZYX: np.ndarray | None, volumeNode) -> "slicer.vtkOrientedImageData":
    """The mask cropped to its bounding box, positioned on the volume's voxel grid (IJK extent = box)."""
    nonzero = np.argwhere(maskZYX) if maskZYX is not None else np.zeros((0, 3), int)
    if len(nonzero):
        loZYX, hiZYX = nonzero.min(axis=0), nonzero.max(axis=0)
        crop = (np.asarray(maskZYX)[loZYX[0]:hiZYX[0] + 1, loZYX[1]:hiZYX[1] + 1, loZYX[2]:hiZYX[2] + 1] > 0)
    else:  # one background voxel: VTK cannot import an image with an empty extent
        loZYX = hiZYX = np.zeros(3, int)
        crop = np.zeros((1, 1, 1), bool)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(loZYX[2], hiZYX[2], loZYX[1], hiZYX[1], loZYX[0], hiZYX[0])
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = crop.astype(np.uint8).ravel()
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    labelmap.SetImageToWorldMatrix(ijkToRAS)
    return labelmap


def lesionMaskArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """The segment as a uint8 (z, y, x) array on the volume's voxel grid."""
    segmentLabelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, segmentLabelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(volumeNode.GetImageData().GetExtent())
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    reference.SetImageToWorldMatrix(ijkToRAS)
    onVolumeGrid = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segmentLabelmap, reference, onVolumeGrid
    )
    dimensionsIJK = volumeNode.GetImageData().GetDimensions()
    scalars = onVolumeGrid.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros(dimensionsIJK[::-1], np.uint8)
    return (numpy_support.vtk_to_numpy(scalars).reshape(dimensionsIJK[::-1]) > 0).astype(np.uint8)


def maskFingerprint(maskZYX: np.ndarray | None) -> str:
    """Voxel count and bounding box: changes when the user edits the segment in the Segment Editor."""
    nonzero = np.argwhere(maskZYX) if maskZYX is not None else np.zeros((0, 3), int)
    return _fingerprint(nonzero)


def _fingerprint(nonzeroZYX: np.ndarray) -> str:
    if not len(nonzeroZYX):
        return "0"
    return f"{len(nonzeroZYX)}:{nonzeroZYX.min(axis=0).tolist()}:{nonzeroZYX.max(axis=0).tolist()}"


@dataclass
class SegmentVoxels:
    """What the lesion table needs of a segment, read from its own (bounding-box sized) labelmap."""

    count: int
    centroidIJK: np.ndarray | None
    fingerprint: str
    voxelVolumeMm3: float


def segmentVoxels(segmentationNode, segmentId: str) -> SegmentVoxels:
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    spacing = float(np.prod(labelmap.GetSpacing()))
    scalars = labelmap.GetPointData().GetScalars()
    extent = labelmap.GetExtent()
    if scalars is None or extent[1] < extent[0]:
        return SegmentVoxels(0, None, "0", spacing)
    shapeZYX = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    nonzeroZYX = np.argwhere(numpy_support.vtk_to_numpy(scalars).reshape(shapeZYX)) + [extent[4], extent[2], extent[0]]
    centroidIJK = nonzeroZYX.mean(axis=0)[::-1] if len(nonzeroZYX) else None
    return SegmentVoxels(len(nonzeroZYX), centroidIJK, _fingerprint(nonzeroZYX), spacing)


def lesionStatus(segment, voxels: SegmentVoxels) -> str:
    """The stored status, or EDITED when the voxels no longer match what LesionLocator wrote."""
    status = segmentTag(segment, STATUS_TAG) or EDITED
    return status if segmentTag(segment, FINGERPRINT_TAG) == voxels.fingerprint else EDITED


# --- undo ------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentSnapshot:
    """A segment as it was before an edit; `labelmap` None: the segment did not exist."""

    segmentationNodeID: str
    segmentId: str
    lesionId: int
    labelmap: "slicer.vtkOrientedImageData | None" = None
    name: str = ""
    colour: tuple = ()
    tags: dict[str, str] = field(default_factory=dict)


def snapshotLesion(segmentationNode, lesionId: int) -> SegmentSnapshot:
    segmentId = lesionSegmentIds(segmentationNode).get(lesionId)
    snapshot = SegmentSnapshot(segmentationNode.GetID(), segmentId or "", lesionId)
    if segmentId is None:
        return snapshot
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    snapshot.labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, snapshot.labelmap)
    snapshot.name, snapshot.colour = segment.GetName(), tuple(segment.GetColor())
    snapshot.tags = {name: segmentTag(segment, name) for name in SNAPSHOT_TAGS if segment.HasTag(name)}
    return snapshot


def restoreLesion(scene, snapshot: SegmentSnapshot) -> None:
    segmentationNode = scene.GetNodeByID(snapshot.segmentationNodeID)
    if segmentationNode is None:
        return
    segmentation = segmentationNode.GetSegmentation()
    currentId = lesionSegmentIds(segmentationNode).get(snapshot.lesionId)
    if snapshot.labelmap is None:
        if currentId is not None:
            segmentation.RemoveSegment(currentId)
        return
    if currentId is None:
        currentId = segmentation.AddEmptySegment(snapshot.segmentId, snapshot.name, snapshot.colour)
    segment = segmentation.GetSegment(currentId)
    for name, value in snapshot.tags.items():
        segment.SetTag(name, value)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        snapshot.labelmap, segmentationNode, currentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
