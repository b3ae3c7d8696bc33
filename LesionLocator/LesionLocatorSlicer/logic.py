"""The module's Logic: MRML nodes in, engine calls on the engine thread, segments out. No Qt.

Every operation has three steps, the same for the console and the GUI:
  prepare (main thread): MRML -> engine objects (copied voxels, prompts, masks); the scene is not modified;
  compute (engine thread): engine calls only, no MRML access; cancelling raises Cancelled;
  apply (main thread): engine results -> segments, recorded as one undo step.
Without `onDone` the public methods wait for the result (scripting); with `onDone(result, error)` they return the
worker Job at once and `onDone` runs on the main thread when the Widget polls the worker.
"""
from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from LesionLocatorLib.errors import LesionLocatorError, PromptError
from LesionLocatorLib.image import ImageVolume

from . import measurements, segments
from .geometry import imageVolumeFromVolumeNode, voxelArrayView
from .prompts import (boxCornersFromTwoPoints, boxPromptFromWorldCorners, pointPromptFromWorld, promptFromMarkups,
                      worldPoints)
from .timepoints import orderTimepoints, studyDate
from .worker import EngineWorker, Job

MODEL_LITE, MODEL_OFFICIAL, MODEL_CUSTOM = "lite", "official", "custom"
DEVICES = ("auto", "cuda", "cpu", "mps")
PRESETS = ("fast", "accurate")
REGISTRATIONS = ("auto", "gradicon", "classical")
LARGE_CHECKPOINT_MB = 150  # the official ResEnc-L folds are several hundred MB; Lite is a few MB
UNDO_DEPTH = 20

OnDone = Callable[[Any, BaseException | None], None]


class ModelChoice(enum.Enum):
    """The model setting; `label()` is what the parameter node wrapper shows in a combo box."""

    LITE = MODEL_LITE
    OFFICIAL = MODEL_OFFICIAL
    CUSTOM = MODEL_CUSTOM

    def label(self) -> str:
        return {"lite": "Bundled Lite model", "official": "Official LesionLocator checkpoint",
                "custom": "Custom model folder"}[self.value]


@dataclass
class EngineSettings:
    model: str = MODEL_LITE
    modelFolder: str = ""  # official: an extracted checkpoint folder (empty: the downloaded one); custom: required
    device: str = "auto"
    preset: str = "fast"
    registration: str = "auto"
    cpuBfloat16: bool = False  # bfloat16 network passes on the CPU: about 2x faster on CPUs with native bfloat16
    pointSearch: bool = True  # clicks: the model's point search when its manifest asks for one (the Lite model does)
    boxRefinement: bool = True  # boxes: the model's box refinement when its manifest holds one (the Lite model does)

    def modelNameOrFolder(self) -> str:
        from LesionLocatorLib.models import registry

        if self.model == MODEL_LITE:
            return registry.LESIONLOCATOR_LITE.name
        if self.model == MODEL_OFFICIAL:
            return self.modelFolder or registry.LESIONLOCATOR_OFFICIAL.name
        if self.model == MODEL_CUSTOM and self.modelFolder:
            return self.modelFolder
        raise LesionLocatorError("Choose the folder of the custom model (it holds LesionLocatorSeg/ and LesionLocatorTrack/).")


# --- requests: plain data handed from the main thread to the engine thread -------------------------------------------
@dataclass
class SegmentationRequest:
    volumeNodeID: str
    lesionId: int
    image: ImageVolume
    prompt: Any
    modelRoot: Path
    settings: EngineSettings

    @property
    def description(self) -> str:
        return f"segmenting {segments.lesionName(self.lesionId)} on {self.image.name}"


@dataclass
class TrackingRequest:
    lesionIds: list[int]
    timepointIDs: list[str]  # time order
    images: dict[str, ImageVolume]
    masks: dict[tuple[int, str], np.ndarray]  # (lesion id, volume node ID) -> non-empty mask to track from
    targets: list[tuple[int, str]]  # (lesion id, volume node ID) to find by tracking
    modelRoot: Path
    settings: EngineSettings

    @property
    def description(self) -> str:
        return f"tracking {', '.join(segments.lesionName(i) for i in self.lesionIds)}"


# --- lesion table: plain data the Widget renders ---------------------------------------------------------------------
@dataclass
class LesionCell:
    volumeNodeID: str
    status: str = ""  # prompted / tracked / not found / edited / absent; "" = not analysed at this timepoint
    volumeMl: float | None = None
    centreRAS: tuple[float, float, float] | None = None  # world

    @property
    def holdsUserVoxels(self) -> bool:
        """Voxels the user made here (a prompt's answer, or painted): confirming the lesion absent is refused."""
        return self.status in segments.USER_VOXEL_STATUSES and bool(self.volumeMl)


@dataclass
class LesionRow:
    lesionId: int
    name: str
    colour: tuple[float, float, float]
    cells: list[LesionCell]
    isLymphNode: bool = False


@dataclass
class LesionTable:
    timepointIDs: list[str]
    timepointNames: list[str]
    rows: list[LesionRow]


@dataclass
class UndoStep:
    description: str
    snapshots: list[segments.SegmentSnapshot] = field(default_factory=list)
    createdNodeIDs: list[str] = field(default_factory=list)


def emptyAnswerMessage(prompt) -> str:
    """What to do when a prompt's answer is empty (the user drew a box: do not ask for one)."""
    from LesionLocatorLib.prompts import BoxPrompt

    if isinstance(prompt, BoxPrompt):
        return ("Nothing was segmented in this box: the lesion may be too small or too faint for the model. Draw the "
                "box tightly around the lesion, or click its centre.")
    return "Nothing was segmented at this prompt. Click closer to the lesion centre, or draw a box around it."


class EngineCache:
    """The last Segmenter and Tracker, reused while the settings stay the same. Used on the engine thread only."""

    def __init__(self) -> None:
        self._segmenter: tuple[tuple, Any] | None = None
        self._tracker: tuple[tuple, Any] | None = None

    def segmenter(self, modelRoot: Path, settings: EngineSettings):
        key = (str(modelRoot), settings.device, settings.preset, settings.cpuBfloat16, settings.pointSearch,
               settings.boxRefinement)
        if self._segmenter is None or self._segmenter[0] != key:
            from LesionLocatorLib.segmentation import Segmenter  # torch: imported once dependencies are installed

            self._segmenter = None  # free the previous model before loading the next
            self._segmenter = (key, Segmenter.from_folder(modelRoot, device=settings.device, preset=settings.preset,
                                                          cpu_bf16=settings.cpuBfloat16,
                                                          point_search=settings.pointSearch,
                                                          box_refinement=settings.boxRefinement))
        return self._segmenter[1]

    def tracker(self, modelRoot: Path, settings: EngineSettings):
        # the tracker segments baselines with the shared segmenter: rebuilt with it
        key = (str(modelRoot), settings.device, settings.preset, settings.registration, settings.cpuBfloat16,
               settings.pointSearch, settings.boxRefinement)
        if self._tracker is None or self._tracker[0] != key:
            from LesionLocatorLib.tracking import Tracker

            self._tracker = None
            segmenter = self.segmenter(modelRoot, settings)  # shared: one copy of the segmentation weights
            self._tracker = (key, Tracker.from_folder(modelRoot, device=settings.device, preset=settings.preset,
                                                      registration=settings.registration, segmenter=segmenter,
                                                      cpu_bf16=settings.cpuBfloat16,
                                                      box_refinement=settings.boxRefinement))
        return self._tracker[1]


class LesionTrackingLogic:
    """Promptable segmentation and longitudinal tracking of lesions in an MRML scene."""

    def __init__(self, scene, worker: EngineWorker | None = None) -> None:
        segments.ensureSegmentationConverterRules()
        self.scene = scene
        self.settings = EngineSettings()
        self.worker = worker or EngineWorker()
        self.engines = EngineCache()
        self._undoSteps: list[UndoStep] = []
        self._cpuWarning: tuple[Any, str] = (None, "")  # (settings it was computed for, text)
        self._intensityWarnings: dict[str, tuple[Any, str]] = {}  # volume node ID -> (what it was computed for, text)
        scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose)

    def _onSceneStartClose(self, caller=None, event=None) -> None:
        """Undo steps, a running job and the intensity warnings refer to nodes of the scene being closed: drop them."""
        self.worker.cancel()
        self._undoSteps = []
        self._intensityWarnings = {}

    # --- settings ----------------------------------------------------------------------------------------------
    def modelRoot(self) -> Path:
        from LesionLocatorLib.models.registry import model_root

        return model_root(self.settings.modelNameOrFolder())

    def largeModelOnCPUWarning(self) -> str:
        """A warning to show when the chosen model is large and will run on the CPU ('' otherwise)."""
        key = (self.settings.model, self.settings.modelFolder, self.settings.device)
        if self._cpuWarning[0] != key:
            self._cpuWarning = (key, self._computeLargeModelOnCPUWarning())
        return self._cpuWarning[1]

    def _computeLargeModelOnCPUWarning(self) -> str:
        try:
            megabytes = checkpointMegabytes(self.modelRoot())
        except LesionLocatorError:
            return ""
        if megabytes < LARGE_CHECKPOINT_MB or not runsOnCPU(self.settings.device):
            return ""
        return (
            f"This model ({megabytes:.0f} MB per fold) runs on the CPU here: expect minutes per lesion. "
            "Use a CUDA GPU, or the Lite model for interactive use; bfloat16 on the CPU halves the time on CPUs that "
            "support it natively."
        )

    def intensityWarning(self, volumeNodes: list) -> str:
        """One line for each volume whose intensities do not look like CT in Hounsfield units, when the chosen model
        normalizes its input as CT ('' otherwise): such a model answers on MR or PET without any error. Each new
        warning is also logged once (the Python console's user sees it when segmenting or tracking)."""
        return "\n".join(filter(None, (self._intensityWarningOf(node) for node in _unique(volumeNodes) if node)))

    def _intensityWarningOf(self, volumeNode) -> str:
        imageData = volumeNode.GetImageData()
        key = (self.settings.model, self.settings.modelFolder, imageData.GetMTime() if imageData else None)
        cached = self._intensityWarnings.get(volumeNode.GetID())
        if cached is None or cached[0] != key:
            warning = self._computeIntensityWarning(volumeNode)
            if warning is None:
                return ""
            if warning:
                logging.warning(warning)
            cached = self._intensityWarnings[volumeNode.GetID()] = (key, warning)
        return cached[1]

    def _computeIntensityWarning(self, volumeNode) -> str | None:
        """The warning, '' for none, None while the engine's dependencies (installed on first use) are missing."""
        try:
            from LesionLocatorLib.intensity_check import expects_hounsfield_units, hu_warning  # torch, nnunetv2

            if not expects_hounsfield_units(self.modelRoot()):
                return ""
            return hu_warning(voxelArrayView(volumeNode), volumeNode.GetName())
        except ImportError:
            return None
        except LesionLocatorError:
            return ""  # no model or no voxels yet: segmenting says so itself

    # --- timepoints and lesions ----------------------------------------------------------------------------------
    def orderedTimepoints(self, volumeNodes: list) -> list:
        return self.timepointOrder(volumeNodes)[0]

    def timepointOrder(self, volumeNodes: list) -> tuple[list, str]:
        """(volumes in time order, how they were ordered)."""
        return orderTimepoints(volumeNodes, self.dicomDatabase())

    def dicomDatabase(self):
        """The DICOM database to read study dates from (Slicer's, in the module's Logic); None: not used."""
        return None

    def lesionIds(self) -> list[int]:
        return sorted({lesionId for node in self._timepointSegmentations() for lesionId in segments.lesionSegmentIds(node)})

    def timepointsWithLesions(self) -> list:
        """Volumes that have a LesionLocator segmentation, in time order."""
        volumes = [node.GetNodeReference(segments.VOLUME_REFERENCE_ROLE) for node in self._timepointSegmentations()]
        return self.orderedTimepoints([volume for volume in volumes if volume is not None])

    def _timepointSegmentations(self) -> list:
        return [node for node in segments.segmentationNodes(self.scene) if node.GetAttribute(segments.TIMEPOINT_ATTRIBUTE)]

    # --- segmentation -------------------------------------------------------------------------------------------
    def segmentLesion(self, volumeNode, pointRAS=None, boxRAS=None, markupsNode=None, lesionId: int | None = None,
                      onDone: OnDone | None = None):
        """Segment a lesion from one prompt (world RAS point, box corners (A, B) or a markups point list / ROI).

        A new lesion id is assigned unless `lesionId` is given: then that lesion is re-segmented on this volume
        (a prompt on a follow-up corrects its tracking there). Returns the lesion id (or the Job with `onDone`).
        """
        request = self.prepareSegmentation(volumeNode, pointRAS, boxRAS, markupsNode, lesionId)
        return self._run(request, self.computeSegmentation, self.applySegmentation, onDone)

    def prepareSegmentation(self, volumeNode, pointRAS=None, boxRAS=None, markupsNode=None,
                            lesionId: int | None = None) -> SegmentationRequest:
        from LesionLocatorLib.prompts import validate_prompt

        image = imageVolumeFromVolumeNode(volumeNode)
        prompt = validate_prompt(promptFromInputs(image, pointRAS, boxRAS, markupsNode), image.shape_zyx)
        self.intensityWarning([volumeNode])
        lesionId = lesionId if lesionId is not None else max(self.lesionIds(), default=0) + 1
        return SegmentationRequest(volumeNode.GetID(), lesionId, image, prompt, self.modelRoot(), replace(self.settings))

    def computeSegmentation(self, request: SegmentationRequest, progress, cancelEvent: threading.Event) -> np.ndarray:
        segmenter = self.engines.segmenter(request.modelRoot, request.settings)
        result = segmenter.segment(request.image, {request.lesionId: request.prompt}, progress=progress,
                                   cancel_event=cancelEvent)
        if request.lesionId in result.errors:
            raise PromptError(result.errors[request.lesionId])
        mask = result.masks[request.lesionId]
        if not mask.any():
            raise LesionLocatorError(emptyAnswerMessage(request.prompt))
        return mask

    def applySegmentation(self, request: SegmentationRequest, mask: np.ndarray) -> int:
        volumeNode = self._volumeNode(request.volumeNodeID)
        step = UndoStep(request.description)
        self._writeLesion(step, volumeNode, request.lesionId, mask, segments.PROMPTED)
        self._pushUndo(step)
        return request.lesionId

    # --- tracking --------------------------------------------------------------------------------------------------
    def trackLesion(self, lesionId: int, volumeNodes: list, onDone: OnDone | None = None):
        """Find a lesion in `volumeNodes` (follow-ups; the scans where it is segmented are added automatically)."""
        return self.trackLesions([lesionId], volumeNodes, onDone)

    def trackAll(self, volumeNodes: list, onDone: OnDone | None = None):
        """Find every lesion in every one of `volumeNodes` where the user has not segmented it himself."""
        return self.trackLesions(self.lesionIds(), volumeNodes, onDone)

    def trackLesions(self, lesionIds: list[int], volumeNodes: list, onDone: OnDone | None = None):
        """Returns {lesion id: {volume node ID: LesionAtTimepoint}} (or the Job with `onDone`)."""
        request = self.prepareTracking(lesionIds, volumeNodes)
        return self._run(request, self.computeTracking, self.applyTracking, onDone)

    def prepareTracking(self, lesionIds: list[int], volumeNodes: list) -> TrackingRequest:
        if not lesionIds:
            raise LesionLocatorError("There is no lesion to track yet: segment one with a point or a box first.")
        sources = {lesionId: self._lesionMasks(lesionId) for lesionId in lesionIds}
        for lesionId, byVolume in sources.items():
            if not byVolume:
                raise LesionLocatorError(f"{segments.lesionName(lesionId)} is empty in every scan: segment it first.")
        given = [node for node in volumeNodes if node is not None]
        timepoints = self._trackingTimepoints(sources, given)
        targets = [(lesionId, node.GetID()) for node in timepoints if node in given for lesionId in lesionIds
                   if not self._isPinned(lesionId, node)]
        if len(timepoints) < 2 or not targets:
            raise LesionLocatorError("Choose at least one follow-up scan where the lesion is not segmented or "
                                     "confirmed absent already.")
        masks = {(lesionId, volumeID): mask for lesionId, byVolume in sources.items() for volumeID, mask in byVolume.items()}
        images = {node.GetID(): imageVolumeFromVolumeNode(node) for node in timepoints}
        self.intensityWarning(timepoints)
        return TrackingRequest(list(lesionIds), [node.GetID() for node in timepoints], images, masks, targets,
                               self.modelRoot(), replace(self.settings))

    def _trackingTimepoints(self, sources: dict[int, dict[str, np.ndarray]], given: list) -> list:
        """The given scans plus those the lesions are segmented on, in time order (given order without dates)."""
        segmented = [self._volumeNode(volumeID) for byVolume in sources.values() for volumeID in byVolume]
        return self.orderedTimepoints(_unique([node for node in segmented if node not in given] + given))

    def computeTracking(self, request: TrackingRequest, progress, cancelEvent: threading.Event) -> dict:
        tracker = self.engines.tracker(request.modelRoot, request.settings)
        masks = dict(request.masks)
        results: dict[tuple[int, str], Any] = {}
        steps = trackingTargetsInTimeOrder(request)
        for number, (targetID, lesionIds) in enumerate(steps):
            groups = groupBySource(request.timepointIDs, targetID, lesionIds, masks)
            for part, (sourceID, fromSource) in enumerate(groups.items()):
                report = _scaledProgress(progress, number, len(steps), request.images[targetID].name, part, len(groups))
                found = tracker.track_step(request.images[sourceID], request.images[targetID],
                                           {lesionId: masks[(lesionId, sourceID)] for lesionId in fromSource},
                                           progress=report, cancel_event=cancelEvent)
                results.update({(lesionId, targetID): record for lesionId, record in found.items()})
                updateKnownMasks(masks, targetID, found)
        return results

    def applyTracking(self, request: TrackingRequest, results: dict) -> dict[int, dict[str, Any]]:
        step = UndoStep(request.description)
        summary: dict[int, dict[str, Any]] = {}
        for (lesionId, volumeID), record in results.items():
            found = hasLesionMask(record)
            status = segments.TRACKED if found else segments.NOT_FOUND
            self._writeLesion(step, self._volumeNode(volumeID), lesionId, record.mask if found else None, status)
            summary.setdefault(lesionId, {})[volumeID] = record
        self._pushUndo(step)
        return summary

    # --- editing -------------------------------------------------------------------------------------------------
    def deleteLesion(self, lesionId: int) -> None:
        """Remove the lesion's segment from every timepoint (undoable)."""
        step = UndoStep(f"deleting {segments.lesionName(lesionId)}")
        for node, segmentId in self._lesionSegments(lesionId):
            step.snapshots.append(segments.snapshotLesion(node, lesionId))
            node.GetSegmentation().RemoveSegment(segmentId)
        self._pushUndo(step)

    # --- the reader's statements: lymph nodes, lesions gone (stored on the segments, saved with the scene) --------
    def lymphNodeIds(self) -> list[int]:
        """The lesions marked as lymph nodes (on any of their segments)."""
        return sorted({lesionId for node in self._timepointSegmentations()
                       for lesionId, segmentId in segments.lesionSegmentIds(node).items()
                       if segments.isLymphNode(node.GetSegmentation().GetSegment(segmentId))})

    def setLymphNode(self, lesionId: int, isLymphNode: bool = True) -> str | None:
        """Mark the lesion as a lymph node (or not) on its segments at every scan; undoable. RECIST 1.1 then measures
        it by its largest short axis: a target from 15 mm, normal (gone) under 10 mm. Returns what was done, None
        when it already was so."""
        isLymphNode = bool(isLymphNode)
        changing = [(node, segmentId) for node, segmentId in self._lesionSegments(lesionId)
                    if segments.isLymphNode(node.GetSegmentation().GetSegment(segmentId)) != isLymphNode]
        if not changing:
            return None
        step = UndoStep(f"marking {segments.lesionName(lesionId)} as {'a' if isLymphNode else 'not a'} lymph node")
        for node, segmentId in changing:
            step.snapshots.append(segments.snapshotLesion(node, lesionId))
            segments.setLymphNode(node.GetSegmentation().GetSegment(segmentId), isLymphNode)
        self._pushUndo(step)
        return step.description

    def setConfirmedAbsent(self, lesionId: int, volumeNode, absent: bool = True) -> str | None:
        """Confirm that the lesion is gone on this scan (or withdraw that); undoable.

        Confirmed absent, it counts 0 mm there in the report (a target is no longer not evaluable, a new lesion no
        longer progression; confirmed on the scans before it appears, it is a new lesion) and tracking leaves that
        scan alone. A segment that tracking made there is cleared; voxels the user made there (prompted or edited)
        are refused, never deleted. Withdrawn, the scan shows 'not found' and tracking may look there again.
        Returns what was done, None when it already was so."""
        self._lesionSegments(lesionId)  # refuses an unknown lesion
        checkScan(volumeNode, self.scene)
        cell = lesionCell(volumeNode, lesionId)
        if (cell.status == segments.ABSENT) == bool(absent):
            return None
        name, scan = segments.lesionName(lesionId), volumeNode.GetName()
        if absent and cell.holdsUserVoxels:
            raise LesionLocatorError(
                f"{name} on '{scan}' holds {cell.volumeMl:.2f} ml that you segmented ({cell.status}); nothing was "
                "changed. If the lesion is really gone there, erase that segment's voxels (Segment Editor) or undo "
                "your prompt, then confirm it absent.")
        if not absent:
            description = f"withdrawing that {name} is absent on '{scan}'"
        else:
            cleared = f", clearing its tracked segment ({cell.volumeMl:.2f} ml)" if cell.volumeMl else ""
            description = f"confirming {name} absent on '{scan}'{cleared}"
        step = UndoStep(description)
        self._writeLesion(step, volumeNode, lesionId, None, segments.ABSENT if absent else segments.NOT_FOUND)
        self._pushUndo(step)
        return description

    def undo(self) -> str | None:
        """Undo the last LesionLocator edit; returns what was undone (None when there is nothing to undo)."""
        if not self._undoSteps:
            return None
        step = self._undoSteps.pop()
        for snapshot in reversed(step.snapshots):
            segments.restoreLesion(self.scene, snapshot)
        for nodeID in step.createdNodeIDs:
            node = self.scene.GetNodeByID(nodeID)
            if node is not None and node.GetSegmentation().GetNumberOfSegments() == 0:
                segments.removeNodeAndHelpers(node)
        return step.description

    @property
    def canUndo(self) -> bool:
        return bool(self._undoSteps)

    # --- table -------------------------------------------------------------------------------------------------------
    def lesionTable(self, volumeNodes: list | None = None) -> LesionTable:
        """Lesion x timepoint: status, volume (ml) and world centre of every lesion at every timepoint."""
        timepoints = self.orderedTimepoints(volumeNodes) if volumeNodes is not None else self.timepointsWithLesions()
        rows, lymphNodes = [], self.lymphNodeIds()
        for lesionId in self.lesionIds():
            cells = [lesionCell(node, lesionId) for node in timepoints]
            name, colour = self._lesionNameAndColour(lesionId)
            rows.append(LesionRow(lesionId, name, colour, cells, lesionId in lymphNodes))
        return LesionTable([node.GetID() for node in timepoints], [node.GetName() for node in timepoints], rows)

    def _lesionNameAndColour(self, lesionId: int) -> tuple[str, tuple]:
        for node in self._timepointSegmentations():
            segmentId = segments.lesionSegmentIds(node).get(lesionId)
            if segmentId is not None:
                segment = node.GetSegmentation().GetSegment(segmentId)
                return segment.GetName(), tuple(segment.GetColor())
        return segments.lesionName(lesionId), segments.lesionColour(lesionId)

    # --- measurements, report, files ------------------------------------------------------------------------------
    def longitudinalReport(self, volumeNodes: list | None = None):
        """Every lesion measured at every scan (LesionLocatorLib.report.build.Report), scans in time order, with
        the lymph nodes and confirmed absences the user marked."""
        from LesionLocatorLib.report.build import build_report

        timepoints = self._reportTimepoints(volumeNodes)
        lesionIds = self.lesionIds()
        atScans = {lesionId: [self._lesionAt(lesionId, node) for node in timepoints] for lesionId in lesionIds}
        masks = {lesionId: [mask for mask, _ in entries] for lesionId, entries in atScans.items()}
        absent = {lesionId: [t for t, (_, isAbsent) in enumerate(entries) if isAbsent]
                  for lesionId, entries in atScans.items()}
        return build_report(
            [imageVolumeFromVolumeNode(node) for node in timepoints],
            masks,
            timepoint_names=[node.GetName() for node in timepoints],
            study_dates=[studyDate(node, self.dicomDatabase()) or None for node in timepoints],
            lesion_names={lesionId: self._lesionNameAndColour(lesionId)[0] for lesionId in lesionIds},
            lymph_nodes=self.lymphNodeIds(),
            first_timepoints=firstTimepoints(masks, absent),
            confirmed_absent=absent,
            intensity_unit=intensityUnit(timepoints),
        )

    def showMeasurements(self, volumeNodes: list | None = None):
        """Replace the measurement nodes: a table, a volume-over-time chart and RECIST lines. Returns the chart."""
        timepoints = self._reportTimepoints(volumeNodes)
        report = self.longitudinalReport(timepoints)
        colours = {lesionId: self._lesionNameAndColour(lesionId)[1] for lesionId in self.lesionIds()}
        measurements.removeMeasurementNodes(self.scene)
        measurements.measurementsTableNode(self.scene, report, timepoints)
        measurements.diameterLineNodes(self.scene, report, timepoints, colours)
        return measurements.volumeChartNode(self.scene, report, colours)

    def exportReport(self, volumeNodes: list | None, folder: Path, overwrite: bool = False) -> Path:
        """Write the report (HTML, CSV, JSON, PNG) into `folder`; returns the HTML page."""
        from LesionLocatorLib.report.output import write_report

        return write_report(self.longitudinalReport(volumeNodes), folder, overwrite=overwrite)["html"]

    def saveSegmentations(self, volumeNodes: list | None, folder: Path) -> list[Path]:
        """Each scan's lesion segmentation as '<scan> lesions.seg.nrrd' (lesion ids, statuses and lymph node markers
        in its tags)."""
        written = []
        for volumeNode in self._reportTimepoints(volumeNodes):
            node = segments.timepointSegmentationNode(volumeNode)
            if node is None:
                continue
            path = Path(folder) / f"{volumeNode.GetName()} lesions.seg.nrrd"
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise LesionLocatorError(f"Could not write {path}; check that the folder is writable.")
            written.append(path)
        return written

    def _reportTimepoints(self, volumeNodes: list | None) -> list:
        timepoints = self.orderedTimepoints(volumeNodes) if volumeNodes else self.timepointsWithLesions()
        if not timepoints:
            raise LesionLocatorError("There is nothing to measure yet: segment a lesion first.")
        return timepoints

    def _lesionAt(self, lesionId: int, volumeNode) -> tuple[np.ndarray | None, bool]:
        """The lesion's mask on the scan (empty: not found there; None: never analysed there) and whether it is
        confirmed absent there."""
        node, segmentId = lesionSegmentAt(volumeNode, lesionId)
        if segmentId is None:
            return None, False
        mask = segments.lesionMaskArray(node, segmentId, volumeNode)
        return mask, segments.isConfirmedAbsent(node.GetSegmentation().GetSegment(segmentId), mask)

    # --- helpers ---------------------------------------------------------------------------------------------------
    def _run(self, request, compute, apply, onDone: OnDone | None):
        job = functools.partial(compute, request)
        if onDone is None:
            return apply(request, self.worker.runSync(job, request.description))

        def finish(finishedJob: Job) -> None:
            try:
                value = apply(request, finishedJob.resultOrRaise())
            except Exception as error:  # noqa: BLE001 - shown to the user by onDone
                onDone(None, error)
                return
            onDone(value, None)

        return self.worker.submit(job, request.description, finish)

    def _volumeNode(self, volumeNodeID: str):
        node = self.scene.GetNodeByID(volumeNodeID)
        if node is None:
            raise LesionLocatorError("A scan used by this operation was removed from the scene meanwhile.")
        return node

    def _lesionMasks(self, lesionId: int) -> dict[str, np.ndarray]:
        """{volume node ID: mask} of the timepoints where the lesion is segmented (non-empty)."""
        masks = {}
        for node in self._timepointSegmentations():
            segmentId = segments.lesionSegmentIds(node).get(lesionId)
            volumeNode = node.GetNodeReference(segments.VOLUME_REFERENCE_ROLE)
            if segmentId is not None and volumeNode is not None:
                mask = segments.lesionMaskArray(node, segmentId, volumeNode)
                if mask.any():
                    masks[volumeNode.GetID()] = mask
        return masks

    def _lesionSegments(self, lesionId: int) -> list[tuple[Any, str]]:
        """[(segmentation node, segment id)] of the lesion at every scan; refuses a lesion that does not exist."""
        found = [(node, segments.lesionSegmentIds(node)[lesionId]) for node in self._timepointSegmentations()
                 if lesionId in segments.lesionSegmentIds(node)]
        if not found:
            raise LesionLocatorError(f"There is no lesion {lesionId!r}; the lesions are {self.lesionIds()} "
                                     "(logic.lesionIds()).")
        return found

    def _isPinned(self, lesionId: int, volumeNode) -> bool:
        """Set by the user there (prompted, edited or confirmed absent): tracking does not overwrite it."""
        node, segmentId = lesionSegmentAt(volumeNode, lesionId)
        if segmentId is None:
            return False
        segment = node.GetSegmentation().GetSegment(segmentId)
        voxels = segments.segmentVoxels(node, segmentId, volumeNode)
        return segments.lesionStatus(segment, voxels) in segments.PINNED_STATUSES

    def _writeLesion(self, step: UndoStep, volumeNode, lesionId: int, mask, status: str) -> None:
        """Write the lesion's segment on the scan; a new segment of a lymph node is marked as one too."""
        node = segments.timepointSegmentationNode(volumeNode)
        if node is None:
            node = segments.timepointSegmentationNode(volumeNode, create=True)
            step.createdNodeIDs.append(node.GetID())
        segments.syncTransform(node, volumeNode)
        step.snapshots.append(segments.snapshotLesion(node, lesionId))
        isLymphNode = lesionId in self.lymphNodeIds()
        segmentId = segments.writeLesionMask(node, volumeNode, lesionId, mask, status)
        if isLymphNode:
            segments.setLymphNode(node.GetSegmentation().GetSegment(segmentId), True)

    def _pushUndo(self, step: UndoStep) -> None:
        self._undoSteps = (self._undoSteps + [step])[-UNDO_DEPTH:]


# --- pure helpers ----------------------------------------------------------------------------------------------------
def lesionForPrompt(volumeNode, orderedTimepoints: list, currentLesion: int) -> int | None:
    """The lesion a GUI prompt is for: on the baseline a new one (None); on a follow-up the current lesion, whose
    tracking the prompt corrects there (a new one if none is selected)."""
    onBaseline = not orderedTimepoints or volumeNode is orderedTimepoints[0]
    return currentLesion if currentLesion and not onBaseline else None


def promptFromInputs(image: ImageVolume, pointRAS=None, boxRAS=None, markupsNode=None):
    given = [value is not None for value in (pointRAS, boxRAS, markupsNode)]
    if sum(given) != 1:
        raise PromptError("Give exactly one prompt: pointRAS, boxRAS (two opposite corners) or markupsNode.")
    if pointRAS is not None:
        return pointPromptFromWorld(image, worldPoints(pointRAS, (3,), "pointRAS", "one point (R, A, S)"))
    if boxRAS is not None:
        cornerA, cornerB = worldPoints(boxRAS, (2, 3), "boxRAS", "two opposite corners ((R, A, S), (R, A, S))")
        return boxPromptFromWorldCorners(image, boxCornersFromTwoPoints(cornerA, cornerB))
    return promptFromMarkups(image, markupsNode)


def lesionSegmentAt(volumeNode, lesionId: int) -> tuple[Any, str | None]:
    """(the scan's LesionLocator segmentation or None, the lesion's segment id there or None)."""
    node = segments.timepointSegmentationNode(volumeNode)
    return node, segments.lesionSegmentIds(node).get(lesionId) if node is not None else None


def checkScan(volumeNode, scene) -> None:
    """A scan that a lesion can be stated about: a volume node with voxels in this scene."""
    if not isinstance(volumeNode, slicer.vtkMRMLScalarVolumeNode) or not scene.IsNodePresent(volumeNode):
        raise LesionLocatorError(f"Give a scan of this scene as a volume node (e.g. slicer.util.getNode('CT "
                                 f"follow-up')); got {volumeNode!r}.")
    if volumeNode.GetImageData() is None:
        raise LesionLocatorError(f"Volume '{volumeNode.GetName()}' has no voxels. Load an image first.")


def firstTimepoints(masks: dict[int, list], absent: dict[int, list[int]]) -> dict[int, int]:
    """Each lesion's first scan where it was analysed and not confirmed absent (the report's default skips only
    scans never analysed): a lesion confirmed absent on the scans before it appears is a new lesion (RECIST)."""
    first = {}
    for lesionId, lesionMasks in masks.items():
        seen = [t for t, mask in enumerate(lesionMasks) if mask is not None and t not in absent[lesionId]]
        if seen:
            first[lesionId] = seen[0]
    return first


def lesionCell(volumeNode, lesionId: int) -> LesionCell:
    cell = LesionCell(volumeNode.GetID())
    node, segmentId = lesionSegmentAt(volumeNode, lesionId)
    if segmentId is None:
        return cell
    voxels = segments.segmentVoxels(node, segmentId, volumeNode)
    cell.status = segments.lesionStatus(node.GetSegmentation().GetSegment(segmentId), voxels)
    cell.centreRAS = voxels.centreRAS
    # the voxels on the volume's grid in world units, as the report measures them
    cell.volumeMl = voxels.count * worldVoxelVolumeMm3(volumeNode, voxels.centroidIJK) / 1000.0 if voxels.count else 0.0
    return cell


def intensityUnit(volumeNodes: list) -> str:
    """'HU' when every scan is a CT series (DICOM modality in the subject hierarchy), else 'unknown'."""
    if not volumeNodes:
        return "unknown"
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volumeNodes[0].GetScene())
    attribute = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    items = [shNode.GetItemByDataNode(node) for node in volumeNodes]
    modalities = {shNode.GetItemAttribute(item, attribute) if item else "" for item in items}
    return "HU" if modalities == {"CT"} else "unknown"


def ijkToWorldPoint(volumeNode, pointIJK) -> tuple[float, float, float]:
    """Through the volume's IJKToRAS and its parent transforms (linear or not)."""
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    localRAS = ijkToRAS.MultiplyPoint([*map(float, pointIJK), 1.0])[:3]
    worldRAS = [0.0, 0.0, 0.0]
    volumeNode.TransformPointToWorld(localRAS, worldRAS)
    return tuple(worldRAS)


def worldVoxelVolumeMm3(volumeNode, pointIJK) -> float:
    """World volume of the voxel at `pointIJK`: its IJK steps through the IJKToRAS and the parent transforms
    (a scaling transform scales it, as in the engine's world geometry; a non-linear one is measured there)."""
    steps = np.vstack([np.zeros(3), np.eye(3)])
    origin, *axes = (np.array(ijkToWorldPoint(volumeNode, np.add(pointIJK, step))) for step in steps)
    return abs(float(np.linalg.det(np.array(axes) - origin)))


def trackingTargetsInTimeOrder(request: TrackingRequest) -> list[tuple[str, list[int]]]:
    """[(target volume ID, lesion ids to find there)] in time order."""
    steps = []
    for volumeID in request.timepointIDs:
        lesionIds = [lesionId for lesionId, targetID in request.targets if targetID == volumeID]
        if lesionIds:
            steps.append((volumeID, lesionIds))
    return steps


def groupBySource(timepointIDs: list[str], targetID: str, lesionIds: list[int],
                  masks: dict[tuple[int, str], np.ndarray]) -> dict[str, list[int]]:
    """Each lesion is tracked from the nearest earlier scan where it is known, else from the nearest later one;
    a lesion known nowhere else is left out."""
    targetIndex = timepointIDs.index(targetID)
    earlierFirst = timepointIDs[targetIndex - 1::-1] if targetIndex else []
    candidates = earlierFirst + timepointIDs[targetIndex + 1:]
    groups: dict[str, list[int]] = {}
    for lesionId in lesionIds:
        source = next((volumeID for volumeID in candidates if (lesionId, volumeID) in masks), None)
        if source is not None:
            groups.setdefault(source, []).append(lesionId)
    return groups


def hasLesionMask(record) -> bool:
    """Whether a tracking record (LesionLocatorLib.tracking.LesionAtTimepoint) holds a non-empty mask."""
    return bool(record.found and record.mask is not None and record.mask.any())


def updateKnownMasks(masks: dict, targetID: str, found: dict) -> None:
    """A lesion found on the target scan is tracked on from there; one not found there no longer is."""
    for lesionId, record in found.items():
        masks.pop((lesionId, targetID), None)
        if hasLesionMask(record):
            masks[(lesionId, targetID)] = record.mask


def _scaledProgress(progress, number: int, count: int, targetName: str, part: int = 0, parts: int = 1):
    """A tracking step's progress: scan `number` of `count` gets an equal share, split between the `parts` sources it
    is tracked from, so that progress never goes backwards."""
    def report(fraction: float, stage: str) -> None:
        progress((number + (part + fraction) / parts) / count, f"{stage} ({targetName}, scan {number + 1}/{count})")

    return report


def _unique(nodes: list) -> list:
    unique = []
    for node in nodes:
        if node not in unique:
            unique.append(node)
    return unique


def checkpointMegabytes(modelRoot: Path) -> float:
    from LesionLocatorLib.models.layout import CHECKPOINT_NAME, validate_model_root

    folder = validate_model_root(modelRoot).task_folders.get("point")
    checkpoints = sorted(folder.glob(f"fold_*/{CHECKPOINT_NAME}")) if folder else []
    return checkpoints[0].stat().st_size / 1e6 if checkpoints else 0.0


def runsOnCPU(device: str) -> bool:
    """True when the engine will use the CPU; 'auto' is checked only if torch is already installed."""
    if device == "cpu":
        return True
    if device != "auto" or importlib.util.find_spec("torch") is None:
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
