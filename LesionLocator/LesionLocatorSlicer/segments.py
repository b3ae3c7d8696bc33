"""Lesion segments in MRML: one segmentation node per timepoint volume, one segment per lesion.

A lesion is identified by the segment tag LESION_ID_TAG (saved in .seg.nrrd), never by its name or segment id,
so user segments in the same node are left alone and renamed lesions keep their links. What the reader states is
stored the same way: LYMPH_NODE_TAG on a lesion's segments (a lymph node, at every timepoint), the status ABSENT on
its empty segment of one scan (confirmed gone there). Masks are written through an image whose extent is the mask's
bounding box, so only the changed region is touched. They are read back on the volume's grid through both nodes'
transforms to world, so a segment stays where the user sees it whatever grid it is stored on and whichever of the
two nodes a transform was hardened on.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .geometry import arrayFromVTKMatrix, ijkToRASMatrix, vtkMatrixFromArray

LESION_ID_TAG = "LesionLocator.LesionId"
STATUS_TAG = "LesionLocator.Status"
FINGERPRINT_TAG = "LesionLocator.Fingerprint"
LYMPH_NODE_TAG = "LesionLocator.LymphNode"  # "1" on every segment of a lesion marked as a lymph node
EMPTY_FINGERPRINT = "0"
TIMEPOINT_ATTRIBUTE = "LesionLocator.TimepointSegmentation"
VOLUME_REFERENCE_ROLE = "lesionLocatorVolume"

PROMPTED, TRACKED, NOT_FOUND, EDITED = "prompted", "tracked", "not found", "edited"
ABSENT = "absent"  # an empty segment the user confirmed: the lesion is gone on that scan (the report's word)
PINNED_STATUSES = (PROMPTED, EDITED, ABSENT)  # set by the user: tracking does not overwrite them
USER_VOXEL_STATUSES = (PROMPTED, EDITED)  # voxels the user made (a prompt's answer, or painted)
# the tags that undo restores (vtkSegment cannot list its tags from Python)
SNAPSHOT_TAGS = (LESION_ID_TAG, STATUS_TAG, FINGERPRINT_TAG, LYMPH_NODE_TAG,
                 slicer.vtkSegment.GetTerminologyEntryTagName())

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
    """Masks are written on the volume's voxel grid, so the segmentation goes under the volume's parent transform.

    Its segments keep their place in world space: after 'Harden transform' on only one of the two nodes the frames
    differ, and the segments are moved into the volume's frame first (only their geometry changes unless the move
    shears or is non-linear). The reference geometry is computed relative to the segmentation's own transform, so it
    is set after the transform: with the same transform it is the volume's local grid, which the written labelmaps
    use (otherwise saving resamples them)."""
    transform = transformToVolumeFrame(segmentationNode, volumeNode)
    if transform is None:
        return
    segmentationNode.ApplyTransform(transform)
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)


def transformToVolumeFrame(segmentationNode, volumeNode) -> vtk.vtkAbstractTransform | None:
    """Segmentation coordinates -> the volume's local RAS, through world; None when both are under the same
    transform (one frame)."""
    if segmentationNode.GetTransformNodeID() == volumeNode.GetTransformNodeID():
        return None
    return transformBetween(segmentationNode.GetParentTransformNode(), volumeNode.GetParentTransformNode())


def transformBetween(sourceTransformNode, targetTransformNode) -> vtk.vtkAbstractTransform:
    """From one transform node's coordinates to another's (None: world). A linear one is returned as a vtkTransform:
    GetTransformBetweenNodes concatenates an inverse, which VTK does not take as linear, so a labelmap moved by it
    would be resampled."""
    matrix = vtk.vtkMatrix4x4()
    if slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(sourceTransformNode, targetTransformNode, matrix):
        linear = vtk.vtkTransform()
        linear.SetMatrix(matrix)
        return linear
    general = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceTransformNode, targetTransformNode, general)
    return general


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


def isLymphNode(segment) -> bool:
    return segmentTag(segment, LYMPH_NODE_TAG) == "1"


def setLymphNode(segment, isNode: bool) -> None:
    if isNode:
        segment.SetTag(LYMPH_NODE_TAG, "1")
    else:
        segment.RemoveTag(LYMPH_NODE_TAG)


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
    """The mask cropped to its bounding box, positioned on the volume's voxel grid (IJK extent = box), in the
    volume's local frame (a segmentation under the volume's transform: syncTransform)."""
    nonzero = np.argwhere(maskZYX) if maskZYX is not None else np.zeros((0, 3), int)
    if len(nonzero):
        loZYX, hiZYX = nonzero.min(axis=0), nonzero.max(axis=0)
        crop = (np.asarray(maskZYX)[loZYX[0]:hiZYX[0] + 1, loZYX[1]:hiZYX[1] + 1, loZYX[2]:hiZYX[2] + 1] > 0)
    else:  # one background voxel: VTK cannot import an image with an empty extent
        loZYX = hiZYX = np.zeros(3, int)
        crop = np.zeros((1, 1, 1), bool)
    labelmap = volumeGrid(volumeNode, (loZYX[2], hiZYX[2], loZYX[1], hiZYX[1], loZYX[0], hiZYX[0]))
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = crop.astype(np.uint8).ravel()
    return labelmap


def volumeGrid(volumeNode, extentIJK=None) -> "slicer.vtkOrientedImageData":
    """An image without voxels on the volume's voxel grid (its local IJKToRAS) over `extentIJK` (default: all)."""
    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(*(extentIJK if extentIJK is not None else volumeNode.GetImageData().GetExtent()))
    grid.SetImageToWorldMatrix(vtkMatrixFromArray(ijkToRASMatrix(volumeNode)))
    return grid


def segmentLabelmap(segmentationNode, segmentId: str) -> "slicer.vtkOrientedImageData":
    """The segment's binary labelmap on its own geometry, in the segmentation's coordinates."""
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    return labelmap


def lesionMaskArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """The segment as a uint8 (z, y, x) array on the volume's voxel grid, where both nodes' transforms put it in
    world space (resampled when its labelmap is on another grid or in another frame)."""
    labelmap = segmentLabelmap(segmentationNode, segmentId)
    return _onGrid(labelmap, transformToVolumeFrame(segmentationNode, volumeNode), volumeGrid(volumeNode))


def _onGrid(labelmap, toVolumeFrame, grid) -> np.ndarray:
    """The labelmap (nearest neighbour) as a uint8 (z, y, x) array over the grid's extent."""
    onGrid = slicer.vtkOrientedImageData()
    resampled = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, grid, onGrid, False, False, toVolumeFrame)
    shapeZYX = _shapeZYX(grid.GetExtent())
    scalars = onGrid.GetPointData().GetScalars()
    if not resampled or scalars is None:
        return np.zeros(shapeZYX, np.uint8)
    return (numpy_support.vtk_to_numpy(scalars).reshape(shapeZYX) > 0).astype(np.uint8)


def _shapeZYX(extentIJK) -> tuple[int, int, int]:
    return (extentIJK[5] - extentIJK[4] + 1, extentIJK[3] - extentIJK[2] + 1, extentIJK[1] - extentIJK[0] + 1)


def maskFingerprint(maskZYX: np.ndarray | None) -> str:
    """Voxel count and bounding box on the volume grid: changes when the user edits the segment."""
    nonzero = np.argwhere(maskZYX) if maskZYX is not None else np.zeros((0, 3), int)
    if not len(nonzero):
        return EMPTY_FINGERPRINT
    return _fingerprint(len(nonzero), nonzero.min(axis=0), nonzero.max(axis=0))


def _fingerprint(count: int, loZYX, hiZYX) -> str:
    return f"{count}:{np.asarray(loZYX).tolist()}:{np.asarray(hiZYX).tolist()}"


def _fingerprints(nonzeroZYX: np.ndarray, shapeZYX) -> frozenset[str]:
    """The voxels' fingerprint and those of their mirror images along the grid's axes: Slicer's reader flips an
    axis of a left-handed volume when a scene is reopened, so the same voxels come back under mirrored indices."""
    if not len(nonzeroZYX):
        return frozenset({EMPTY_FINGERPRINT})
    lo, hi, last = nonzeroZYX.min(axis=0), nonzeroZYX.max(axis=0), np.asarray(shapeZYX) - 1
    mirrors = (np.array(flips) for flips in itertools.product((False, True), repeat=3))
    return frozenset(_fingerprint(len(nonzeroZYX), np.where(f, last - hi, lo), np.where(f, last - lo, hi))
                     for f in mirrors)


@dataclass
class SegmentVoxels:
    """What the lesion table needs of a segment: its voxels on the volume's grid (as the report counts them, and
    as LesionLocator wrote them) and where the user sees it."""

    count: int
    centroidIJK: np.ndarray | None  # on the volume's grid
    fingerprints: frozenset[str]  # of the voxels on the volume's grid (and mirrored: _fingerprints)
    centreRAS: tuple[float, float, float] | None  # world centroid of the segment's own labelmap


def segmentVoxels(segmentationNode, segmentId: str, volumeNode) -> SegmentVoxels:
    labelmap = segmentLabelmap(segmentationNode, segmentId)
    toVolumeFrame = transformToVolumeFrame(segmentationNode, volumeNode)
    extent = _extentOnVolumeGrid(labelmap, toVolumeFrame, volumeNode)
    centreRAS = _worldCentroid(segmentationNode, labelmap)
    if extent is None:
        return SegmentVoxels(0, None, frozenset({EMPTY_FINGERPRINT}), centreRAS)
    crop = _onGrid(labelmap, toVolumeFrame, volumeGrid(volumeNode, extent))
    nonzeroZYX = np.argwhere(crop) + [extent[4], extent[2], extent[0]]
    centroidIJK = nonzeroZYX.mean(axis=0)[::-1] if len(nonzeroZYX) else None
    shapeZYX = volumeNode.GetImageData().GetDimensions()[::-1]
    return SegmentVoxels(len(nonzeroZYX), centroidIJK, _fingerprints(nonzeroZYX, shapeZYX), centreRAS)


def _extentOnVolumeGrid(labelmap, toVolumeFrame, volumeNode) -> list[int] | None:
    """The volume voxels (IJK extent) that the labelmap's non-zero part may land on, so that the table resamples a
    lesion-sized box and not the whole scan; None when it lands on none."""
    effective = [0, -1, 0, -1, 0, -1]
    if not slicer.vtkOrientedImageDataResample.CalculateEffectiveExtent(labelmap, effective):
        return None
    whole = np.array(volumeNode.GetImageData().GetExtent())
    linear = vtk.vtkTransform()
    if toVolumeFrame is not None and not slicer.vtkOrientedImageDataResample.IsTransformLinear(toVolumeFrame, linear):
        return whole.tolist()  # a non-linear move: its corners do not bound it
    imageToLocal = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(imageToLocal)
    rasToIJK = np.linalg.inv(ijkToRASMatrix(volumeNode))
    imageToVolumeIJK = rasToIJK @ arrayFromVTKMatrix(linear.GetMatrix()) @ arrayFromVTKMatrix(imageToLocal)
    cornersIJK = [[effective[2 * axis + side] + (side - 0.5) for axis, side in enumerate(sides)] + [1.0]
                  for sides in itertools.product((0, 1), repeat=3)]
    onVolume = (np.array(cornersIJK) @ imageToVolumeIJK.T)[:, :3]
    lo = np.maximum(np.floor(onVolume.min(axis=0)), whole[0::2]).astype(int)
    hi = np.minimum(np.ceil(onVolume.max(axis=0)), whole[1::2]).astype(int)
    return None if np.any(lo > hi) else np.ravel(np.c_[lo, hi]).tolist()


def _worldCentroid(segmentationNode, labelmap) -> tuple[float, float, float] | None:
    """The centroid of the labelmap's voxels through its geometry and the segmentation's transforms."""
    extent = labelmap.GetExtent()
    scalars = labelmap.GetPointData().GetScalars()
    if scalars is None or extent[1] < extent[0]:
        return None
    nonzeroZYX = np.argwhere(numpy_support.vtk_to_numpy(scalars).reshape(_shapeZYX(extent)))
    if not len(nonzeroZYX):
        return None
    centroidIJK = nonzeroZYX.mean(axis=0)[::-1] + [extent[0], extent[2], extent[4]]
    imageToLocal = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(imageToLocal)
    world = [0.0, 0.0, 0.0]
    segmentationNode.TransformPointToWorld(imageToLocal.MultiplyPoint([*centroidIJK, 1.0])[:3], world)
    return tuple(world)


def lesionStatus(segment, voxels: SegmentVoxels) -> str:
    """The stored status, or EDITED when the voxels on the volume grid no longer match what LesionLocator wrote."""
    status = segmentTag(segment, STATUS_TAG) or EDITED
    return status if segmentTag(segment, FINGERPRINT_TAG) in voxels.fingerprints else EDITED


def isConfirmedAbsent(segment, maskZYX: np.ndarray) -> bool:
    """What lesionStatus says of the segment, from its mask on the volume grid: ABSENT only while it is empty (voxels
    painted into it make it EDITED)."""
    return (not np.any(maskZYX) and segmentTag(segment, STATUS_TAG) == ABSENT
            and segmentTag(segment, FINGERPRINT_TAG) == EMPTY_FINGERPRINT)


# --- undo ------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentSnapshot:
    """A segment as it was before an edit; `labelmap` (in world coordinates) None: the segment did not exist."""

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
    # in world: undo puts it back in place even if the segmentation's frame changed meanwhile (syncTransform)
    snapshot.labelmap = segmentLabelmap(segmentationNode, segmentId)
    _moveLabelmap(snapshot.labelmap, segmentationNode.GetParentTransformNode(), None)
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
    for name in SNAPSHOT_TAGS:  # a tag added since the snapshot goes too (a lymph node marker)
        if name in snapshot.tags:
            segment.SetTag(name, snapshot.tags[name])
        else:
            segment.RemoveTag(name)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.DeepCopy(snapshot.labelmap)
    _moveLabelmap(labelmap, None, segmentationNode.GetParentTransformNode())
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentationNode, currentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )


def _moveLabelmap(labelmap, fromTransformNode, toTransformNode) -> None:
    """Only the geometry changes unless the move shears or is non-linear."""
    transform = transformBetween(fromTransformNode, toTransformNode)
    slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, transform)
