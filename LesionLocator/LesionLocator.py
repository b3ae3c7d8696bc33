"""LesionLocator: promptable lesion segmentation and longitudinal tracking in 3D Slicer.

Module, parameter node, Widget, Logic and self-test. The Widget only wires the GUI to the Logic; the Logic
(LesionLocatorSlicer.logic.LesionTrackingLogic, headless-tested) converts MRML <-> engine objects and calls the
engine (LesionLocatorLib) on one persistent worker thread.
"""
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _extensionRoot() -> Path:
    """Where LesionLocatorLib/ and Resources/ are: next to this file once installed, one folder up in a checkout."""
    here = Path(__file__).resolve().parent
    return here if (here / "LesionLocatorLib").is_dir() else here.parent


EXTENSION_ROOT = _extensionRoot()
if str(EXTENSION_ROOT) not in sys.path:  # a source checkout; installed, the module folder is already on the path
    sys.path.insert(0, str(EXTENSION_ROOT))

from LesionLocatorLib.errors import Cancelled, LesionLocatorError  # noqa: E402
from LesionLocatorSlicer import measurements, segments, selftest  # noqa: E402
from LesionLocatorSlicer.logic import (  # noqa: E402
    DEVICES,
    PRESETS,
    REGISTRATIONS,
    EngineSettings,
    LesionTrackingLogic,
    ModelChoice,
    lesionForPrompt,
)
from LesionLocatorSlicer.prompts import deepenFlatROI  # noqa: E402

POLL_INTERVAL_MS = 100
PROMPT_COLOUR = (1.0, 0.85, 0.1)


def resourcePath(relativePath: str) -> str:
    return str(EXTENSION_ROOT / "Resources" / relativePath)


#
# LesionLocator
#
class LesionLocator(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LesionLocator")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionLocator for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Click a point (P) or draw a box (B) on a lesion: it is segmented in 3D within seconds. "
            "Track (T) finds the same lesion in every follow-up scan of the patient. "
            "Re-implementation of LesionLocator (Rokuss et al., CVPR 2025) for 3D Slicer."
        )
        self.parent.acknowledgementText = _(
            "LesionLocator: Zero-Shot Universal Tumor Segmentation and Tracking in 3D Whole-Body Imaging, "
            "M. Rokuss et al., CVPR 2025 (MIC-DKFZ). Please cite it when you use this module."
        )
        self.parent.icon = qt.QIcon(resourcePath("Icons/LesionLocator.png"))


#
# LesionLocatorParameterNode
#
@parameterNodeWrapper
class LesionLocatorParameterNode:
    """GUI state saved with the scene: the patient's scans, the scan being prompted, the lesion being corrected,
    and the engine settings."""

    timepoints: list[vtkMRMLScalarVolumeNode]
    activeVolume: vtkMRMLScalarVolumeNode
    currentLesion: int = 0  # 0: the next prompt makes a new lesion
    pointList: vtkMRMLMarkupsFiducialNode
    roi: vtkMRMLMarkupsROINode
    model: ModelChoice = ModelChoice.LITE
    modelFolder: Path
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    preset: Annotated[str, Choice(list(PRESETS))] = "fast"
    registration: Annotated[str, Choice(list(REGISTRATIONS))] = "auto"
    cpuBfloat16: bool = False
    pointSearch: bool = True
    boxRefinement: bool = True


#
# LesionLocatorWidget
#
class LesionLocatorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the Logic: prompts, shortcuts, the lesion table, progress and settings."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._placingROI = False
        self._lesionTable = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

    # --- setup -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/LesionLocator.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionLocatorLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.addTimepointButton.connect("clicked(bool)", self.onAddTimepoint)
        self.ui.removeTimepointButton.connect("clicked(bool)", self.onRemoveTimepoint)
        self.ui.timepointsListWidget.connect("currentRowChanged(int)", self.onTimepointSelected)
        self.ui.timepointsListWidget.model().connect("rowsMoved(QModelIndex,int,int,QModelIndex,int)", self.onTimepointsReordered)
        self.ui.pointButton.connect("toggled(bool)", self.onPointToggled)
        self.ui.boxButton.connect("toggled(bool)", self.onBoxToggled)
        self.ui.newLesionButton.connect("clicked(bool)", self.onNewLesion)
        self.ui.trackButton.connect("clicked(bool)", self.onTrack)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.deleteButton.connect("clicked(bool)", self.onDeleteLesion)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.lesionTableWidget.connect("cellClicked(int,int)", self.onLesionCellClicked)
        self.ui.lymphNodeButton.connect("clicked(bool)", self.onLymphNodeClicked)
        self.ui.confirmAbsentButton.connect("clicked(bool)", self.onConfirmAbsentClicked)
        self.ui.measureButton.connect("clicked(bool)", self.onMeasure)
        self.ui.exportReportButton.connect("clicked(bool)", self.onExportReport)
        self.ui.saveSegmentationsButton.connect("clicked(bool)", self.onSaveSegmentations)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._pollTimer.stop()
        if self.logic is not None:
            self.logic.worker.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        self._stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopPlacing()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node --------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self.logic.useSettingsOf(self._parameterNode)
        self._updateTimepointList()
        self._updateLesionTable()
        self._updateButtons()
        self._showWarning(self.ui.cpuWarningLabel, self.logic.largeModelOnCPUWarning())
        timepoints = list(self._parameterNode.timepoints)
        self._showWarning(self.ui.intensityWarningLabel, self.logic.intensityWarning(timepoints))
        self.ui.modelFolderPathLineEdit.enabled = self._parameterNode.model != ModelChoice.LITE

    @staticmethod
    def _showWarning(label, text: str) -> None:
        label.text = text
        label.visible = bool(text)

    # --- timepoints ------------------------------------------------------------------------------------------
    def onAddTimepoint(self) -> None:
        volume = self.ui.addTimepointSelector.currentNode()
        if volume is not None and volume not in self._parameterNode.timepoints:
            self._parameterNode.timepoints.append(volume)
            self._parameterNode.activeVolume = volume

    def onRemoveTimepoint(self) -> None:
        row = self.ui.timepointsListWidget.currentRow
        if 0 <= row < len(self._parameterNode.timepoints):
            del self._parameterNode.timepoints[row]

    def onTimepointsReordered(self, *args) -> None:
        """The user dragged scans into another order (used when the scans have no DICOM study date)."""
        byID = {node.GetID(): node for node in self._parameterNode.timepoints}
        listWidget = self.ui.timepointsListWidget
        ids = [listWidget.item(row).data(qt.Qt.UserRole) for row in range(listWidget.count)]
        self._parameterNode.timepoints = [byID[nodeID] for nodeID in ids if nodeID in byID]

    def onTimepointSelected(self, row: int) -> None:
        timepoints = self._orderedTimepoints()
        if 0 <= row < len(timepoints) and self._parameterNode.activeVolume is not timepoints[row]:
            self._parameterNode.activeVolume = timepoints[row]
            self.showTimepoint(timepoints[row])

    def _orderedTimepoints(self) -> list:
        return self.logic.orderedTimepoints(list(self._parameterNode.timepoints)) if self._parameterNode else []

    def _updateTimepointList(self) -> None:
        timepoints, how = self.logic.timepointOrder(list(self._parameterNode.timepoints))
        listWidget = self.ui.timepointsListWidget
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        for index, volume in enumerate(timepoints):
            item = qt.QListWidgetItem(f"{index + 1}. {volume.GetName()}" + (_(" (baseline)") if index == 0 else ""))
            item.setData(qt.Qt.UserRole, volume.GetID())
            listWidget.addItem(item)
            if volume is self._parameterNode.activeVolume:
                listWidget.setCurrentRow(index)
        listWidget.blockSignals(wasBlocked)
        self.ui.timepointOrderLabel.text = _("Scans ordered {how}.").format(how=how) if timepoints else ""

    def showTimepoint(self, volume) -> None:
        """Show the scan in the slice views with its own lesions and diameter lines only."""
        slicer.util.setSliceViewerLayers(background=volume, fit=False)
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if node.GetAttribute(segments.TIMEPOINT_ATTRIBUTE) and node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(node.GetNodeReference(segments.VOLUME_REFERENCE_ROLE) is volume)
        for line in slicer.util.getNodesByClass("vtkMRMLMarkupsLineNode"):
            if line.GetAttribute(measurements.VOLUME_ATTRIBUTE) and line.GetDisplayNode():
                line.GetDisplayNode().SetVisibility(line.GetAttribute(measurements.VOLUME_ATTRIBUTE) == volume.GetID())

    # --- prompts ---------------------------------------------------------------------------------------------
    def onPointToggled(self, checked: bool) -> None:
        if checked:
            self.ui.boxButton.checked = False
            self._startPlacing(self._promptNode("pointList", "vtkMRMLMarkupsFiducialNode"), persistent=True)
        elif not self.ui.boxButton.checked:
            self._stopPlacing()

    def onBoxToggled(self, checked: bool) -> None:
        if checked:
            self.ui.pointButton.checked = False
            roi = self._promptNode("roi", "vtkMRMLMarkupsROINode")
            roi.RemoveAllControlPoints()
            self._placingROI = True
            self._startPlacing(roi, persistent=False)
        elif not self.ui.pointButton.checked:
            self._stopPlacing()

    def _promptNode(self, parameter: str, className: str):
        """The hidden markups node that receives the clicks (one per prompt kind, saved with the scene)."""
        node = getattr(self._parameterNode, parameter)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(className, f"LesionLocator {parameter}")
            node.SetHideFromEditors(True)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*PROMPT_COLOUR)
            setattr(self._parameterNode, parameter, node)
        self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        if parameter == "pointList":
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        return node

    def _startPlacing(self, node, persistent: bool) -> None:
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(node.GetClassName())
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(1 if persistent else 0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)
        self.addObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionModeChanged)

    def _stopPlacing(self) -> None:
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.removeObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionModeChanged)
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)
        for button in (self.ui.pointButton, self.ui.boxButton):
            wasBlocked = button.blockSignals(True)
            button.checked = False
            button.blockSignals(wasBlocked)
        self._placingROI = False

    def onInteractionModeChanged(self, caller, event) -> None:
        """Placement ended: a completed ROI is a box prompt; Esc or another tool just unchecks the buttons."""
        if caller.GetCurrentInteractionMode() == caller.Place:
            return
        roi = self._parameterNode.roi if self._parameterNode else None
        placedROI = self._placingROI and roi is not None and roi.GetNumberOfDefinedControlPoints() > 0
        self._stopPlacing()
        if placedROI:
            deepenFlatROI(roi)
            self.segmentFromPrompt(roi)

    def onPointPlaced(self, caller, event) -> None:
        self.segmentFromPrompt(caller)

    def onNewLesion(self) -> None:
        self._parameterNode.currentLesion = 0

    def segmentFromPrompt(self, markupsNode) -> None:
        volume = self._parameterNode.activeVolume
        if volume is None or self.logic.worker.busy:
            markupsNode.RemoveAllControlPoints()
            slicer.util.showStatusMessage(_("Add the patient's scans first, then click on a lesion.") if volume is None
                                          else _("LesionLocator is still busy: wait for it or press Cancel."), 4000)
            return
        lesionId = lesionForPrompt(volume, self._orderedTimepoints(), self._parameterNode.currentLesion)
        self._runJob(lambda onDone: self.logic.segmentLesion(volume, markupsNode=markupsNode, lesionId=lesionId,
                                                             onDone=onDone),
                     self.onSegmentationDone, cleanup=markupsNode.RemoveAllControlPoints)

    def onSegmentationDone(self, lesionId) -> None:
        self._parameterNode.currentLesion = lesionId
        self.showTimepoint(self._parameterNode.activeVolume)

    # --- tracking and editing --------------------------------------------------------------------------------
    def onTrack(self) -> None:
        """Track the current lesion (or every lesion when none is selected) into every scan."""
        timepoints = self._orderedTimepoints()
        lesionIds = [self._parameterNode.currentLesion] if self._parameterNode.currentLesion else self.logic.lesionIds()
        self._runJob(lambda onDone: self.logic.trackLesions(lesionIds, timepoints, onDone=onDone),
                     lambda results: self._updateLesionTable())

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            undone = self.logic.undo()
            slicer.util.showStatusMessage(_("Undone: {what}").format(what=undone) if undone else _("Nothing to undo."), 3000)
            self._updateLesionTable()

    def onDeleteLesion(self) -> None:
        lesionId = self._parameterNode.currentLesion
        if not lesionId:
            slicer.util.showStatusMessage(_("Select a lesion in the table first."), 3000)
            return
        with slicer.util.tryWithErrorDisplay(_("Deleting the lesion failed."), waitCursor=True):
            self.logic.deleteLesion(lesionId)
            self._parameterNode.currentLesion = 0

    def onCancel(self) -> None:
        self.logic.worker.cancel()
        self.ui.statusLabel.text = _("Cancelling...")

    # --- engine jobs -----------------------------------------------------------------------------------------
    def _runJob(self, start, onSuccess, cleanup=lambda: None) -> None:
        """Start a Logic job with progress, Cancel and readable errors; `onSuccess(result)` runs on the main thread
        when the job is done, `cleanup()` in every case."""
        try:
            if not self.logic.ensureEngineDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                cleanup()
                return
            self.logic.useSettingsOf(self._parameterNode)
            job = start(lambda result, error: self._onJobDone(result, error, onSuccess, cleanup))
        except Exception as error:  # noqa: BLE001 - shown to the user
            cleanup()
            self._showError(error)
            return
        self.ui.statusLabel.text = job.description
        self._pollTimer.start()
        self._updateButtons()

    def _onJobDone(self, result, error, onSuccess, cleanup) -> None:
        cleanup()
        if error is None:
            onSuccess(result)
            self.ui.statusLabel.text = _("Done.")
        else:
            self._showError(error)
        self._updateLesionTable()
        self._updateButtons()

    def onPoll(self) -> None:
        job = self.logic.worker.currentJob
        if job is not None:
            fraction, stage = job.progress
            self.ui.progressBar.value = int(100 * fraction)
            self.ui.statusLabel.text = f"{job.description}: {stage}"
        self.logic.worker.poll()
        if not self.logic.worker.busy:
            self._pollTimer.stop()
            self.ui.progressBar.value = 0

    def _showError(self, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.ui.statusLabel.text = _("Cancelled: the scene is unchanged.")
        elif isinstance(error, LesionLocatorError):
            self.ui.statusLabel.text = str(error)
            slicer.util.errorDisplay(str(error), windowTitle=_("LesionLocator"))
        else:
            logging.error("LesionLocator failed", exc_info=error)
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            slicer.util.errorDisplay(_("Unexpected error: {error}\nSee the Python console for details.").format(error=error))

    def _updateButtons(self) -> None:
        busy = self.logic.worker.busy
        hasScans = bool(self._parameterNode and self._parameterNode.timepoints)
        for button in (self.ui.pointButton, self.ui.boxButton):
            button.enabled = hasScans and not busy
        self.ui.trackButton.enabled = hasScans and not busy and len(self._parameterNode.timepoints) > 1
        self.ui.undoButton.enabled = not busy and self.logic.canUndo
        self.ui.deleteButton.enabled = not busy and bool(self._parameterNode and self._parameterNode.currentLesion)
        self.ui.cancelButton.enabled = busy
        row, cell = self._selectedCell()
        self.ui.lymphNodeButton.enabled = not busy and row is not None
        self.ui.lymphNodeButton.checked = row is not None and row.isLymphNode
        self.ui.confirmAbsentButton.enabled = not busy and cell is not None and not cell.holdsUserVoxels
        self.ui.confirmAbsentButton.checked = cell is not None and cell.status == segments.ABSENT

    # --- lesion table ----------------------------------------------------------------------------------------
    def _updateLesionTable(self) -> None:
        table = self.logic.lesionTable(self._orderedTimepoints())
        widget = self.ui.lesionTableWidget
        widget.clear()
        widget.setColumnCount(len(table.timepointNames))
        widget.setRowCount(len(table.rows))
        widget.setHorizontalHeaderLabels(table.timepointNames)
        activeID = self._parameterNode.activeVolume.GetID() if self._parameterNode.activeVolume else None
        activeColumn = table.timepointIDs.index(activeID) if activeID in table.timepointIDs else -1
        for rowIndex, row in enumerate(table.rows):
            header = qt.QTableWidgetItem(row.name + (_(" (LN)") if row.isLymphNode else ""))
            header.setData(qt.Qt.DecorationRole, qt.QColor.fromRgbF(*row.colour))
            if row.isLymphNode:
                header.setToolTip(_("Lymph node: RECIST measures its largest short axis"))
            widget.setVerticalHeaderItem(rowIndex, header)
            for columnIndex, cell in enumerate(row.cells):
                volume = f"{cell.volumeMl:.2f} ml\n" if cell.volumeMl else ""
                item = qt.QTableWidgetItem(volume + (cell.status or "-"))
                item.setToolTip(_("Click to show {lesion} on this scan").format(lesion=row.name))
                widget.setItem(rowIndex, columnIndex, item)
            if row.lesionId == self._parameterNode.currentLesion:
                self._selectCell(rowIndex, activeColumn)
        self._lesionTable = table

    def _selectCell(self, rowIndex: int, columnIndex: int) -> None:
        """The selected lesion on the scan shown (its whole row when that scan is not in the table)."""
        if columnIndex < 0:
            self.ui.lesionTableWidget.selectRow(rowIndex)
        else:
            self.ui.lesionTableWidget.setCurrentCell(rowIndex, columnIndex)

    def _selectedCell(self) -> tuple:
        """(row of the selected lesion, its cell on the scan shown); None for what is not selected."""
        if self._parameterNode is None or self._lesionTable is None:
            return None, None
        row = next((r for r in self._lesionTable.rows if r.lesionId == self._parameterNode.currentLesion), None)
        volume = self._parameterNode.activeVolume
        if row is None or volume is None:
            return row, None
        return row, next((c for c in row.cells if c.volumeNodeID == volume.GetID()), None)

    def onLymphNodeClicked(self, checked: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Marking the lymph node failed."), waitCursor=True):
            self._showDone(self.logic.setLymphNode(self._parameterNode.currentLesion, checked))
        self._updateLesionTable()
        self._updateButtons()

    def onConfirmAbsentClicked(self, checked: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Confirming the lesion absent failed."), waitCursor=True):
            self._showDone(self.logic.setConfirmedAbsent(self._parameterNode.currentLesion,
                                                         self._parameterNode.activeVolume, checked))
        self._updateLesionTable()
        self._updateButtons()

    @staticmethod
    def _showDone(description: str | None) -> None:
        if description:
            slicer.util.showStatusMessage(_("Done: {what} (Ctrl+Z undoes it).").format(what=description), 5000)

    def onLesionCellClicked(self, rowIndex: int, columnIndex: int) -> None:
        """Select the lesion and show it on that scan, slices centred on it."""
        row = self._lesionTable.rows[rowIndex]
        cell = row.cells[columnIndex]
        self._parameterNode.currentLesion = row.lesionId
        volume = slicer.mrmlScene.GetNodeByID(cell.volumeNodeID)
        self._parameterNode.activeVolume = volume
        self.showTimepoint(volume)
        if cell.centreRAS is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*cell.centreRAS, True)

    # --- measurements ----------------------------------------------------------------------------------------
    def onMeasure(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Measuring failed."), waitCursor=True):
            if not self.logic.ensureEngineDependencies(confirm=slicer.util.confirmOkCancelDisplay):
                return
            chart = self.logic.showMeasurements(self._orderedTimepoints())
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            if self._parameterNode.activeVolume is not None:
                self.showTimepoint(self._parameterNode.activeVolume)

    def onExportReport(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the LesionLocator report"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Exporting the report failed."), waitCursor=True):
                path = self.logic.exportReport(self._orderedTimepoints(), Path(folder))
                slicer.util.showStatusMessage(_("Report written to {path}").format(path=path), 5000)

    def onSaveSegmentations(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the lesion segmentations"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Saving the segmentations failed."), waitCursor=True):
                written = self.logic.saveSegmentations(self._orderedTimepoints(), Path(folder))
                slicer.util.showStatusMessage(_("{count} files written to {folder}").format(count=len(written), folder=folder), 5000)

    # --- shortcuts -------------------------------------------------------------------------------------------
    def _installShortcuts(self) -> None:
        """Active while the module is shown; the keys are also written on the buttons."""
        self._removeShortcuts()
        bindings = (("P", self.ui.pointButton.toggle), ("B", self.ui.boxButton.toggle), ("T", self.onTrack),
                    ("Ctrl+Z", self.onUndo), ("Del", self.onDeleteLesion), ("N", self.onNewLesion))
        for keys, handler in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.connect("activated()", handler)
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []


#
# LesionLocatorLogic
#
class LesionLocatorLogic(ScriptedLoadableModuleLogic, LesionTrackingLogic):
    """The scripting API (same code paths as the GUI), e.g. from the Python console:

        logic = slicer.util.getModuleLogic("LesionLocator")  # or LesionLocatorLogic()
        lesionId = logic.segmentLesion(volumeNode, pointRAS=[x, y, z])     # or boxRAS=(cornerA, cornerB)
        logic.trackLesion(lesionId, [followUp1, followUp2])
        logic.setLymphNode(lesionId); logic.setConfirmedAbsent(lesionId, followUp2)  # for RECIST; undoable
        logic.lesionTable(); logic.undo(); logic.deleteLesion(lesionId)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        LesionTrackingLogic.__init__(self, slicer.mrmlScene)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return LesionLocatorParameterNode(super().getParameterNode())

    def dicomDatabase(self):
        return getattr(slicer, "dicomDatabase", None)

    def useSettingsOf(self, parameterNode) -> None:
        folder = str(parameterNode.modelFolder) if str(parameterNode.modelFolder) not in ("", ".") else ""
        self.settings = EngineSettings(parameterNode.model.value, folder, parameterNode.device,
                                       parameterNode.preset, parameterNode.registration, parameterNode.cpuBfloat16,
                                       parameterNode.pointSearch, parameterNode.boxRefinement)

    def ensureEngineDependencies(self, confirm=None) -> bool:
        """Install what the engine needs on first use (PyTorch through the PyTorch extension, the rest with pip),
        after one confirmation. Returns False when the user declines."""
        if self._dependenciesChecked:
            return True
        from LesionLocatorLib.models.requirements import installed_versions, plan_installation

        plan = plan_installation(installed_versions(), (slicer.app.majorVersion, slicer.app.minorVersion))
        if plan.conflicts:
            raise LesionLocatorError(plan.summary())
        if plan.torch_action != "none" or plan.needs_pip:
            if confirm is not None and not confirm(plan.summary()):
                return False
            self._installEngineDependencies(plan)
        self._dependenciesChecked = True
        return True

    def saveSegmentations(self, volumeNodes, folder: Path) -> list[Path]:
        """.seg.nrrd for every scan, and DICOM SEG for scans loaded from DICOM."""
        return super().saveSegmentations(volumeNodes, folder) + self._exportDicomSegmentations(volumeNodes, folder)

    def _exportDicomSegmentations(self, volumeNodes, folder: Path) -> list[Path]:
        dicomScans = [node for node in self._reportTimepoints(volumeNodes) if node.GetAttribute("DICOM.instanceUIDs")]
        if not dicomScans:
            return []
        try:
            import DICOMSegmentationPlugin  # from the QuantitativeReporting extension
        except ImportError:
            slicer.util.warningDisplay(_("DICOM SEG files were not written: install the QuantitativeReporting "
                                         "extension for that. The .seg.nrrd files were saved."))
            return []
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        written = []
        for volume in dicomScans:
            node = segments.timepointSegmentationNode(volume)
            if node is None:
                continue
            target = Path(folder) / f"{volume.GetName()} lesions DICOM SEG"
            target.mkdir(exist_ok=True)
            exportables = exporter.examineForExport(shNode.GetItemByDataNode(node))
            for exportable in exportables:
                exportable.directory = str(target)
            error = exporter.export(exportables)
            if error:
                raise LesionLocatorError(f"DICOM SEG export of {volume.GetName()} failed: {error}")
            written.append(target)
        return written

    @staticmethod
    def _installEngineDependencies(plan) -> None:
        if plan.torch_action != "none":
            import PyTorchUtils

            if not PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                 torchVersionRequirement=plan.torch_requirement):
                raise LesionLocatorError("PyTorch could not be installed. Install it from the PyTorch module, then retry.")
        pipInstall = slicer.packaging.pip_install if hasattr(slicer, "packaging") else slicer.util.pip_install
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            Path(constraints).write_text(plan.constraints_text())
            with slicer.util.WaitCursor():
                for arguments in plan.pip_commands(constraints):
                    pipInstall(arguments)


#
# LesionLocatorTest
#
class LesionLocatorTest(ScriptedLoadableModuleTest):
    """Runs LesionLocatorSlicer.selftest.endToEndFlow, the flow tests/test_slicer_logic_end_to_end.py runs headless,
    with the bundled Lite model on synthetic scans."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_endToEnd()

    def test_endToEnd(self) -> None:
        self.delayDisplay("Creating three synthetic scans of one patient")
        volumes, pointRAS = selftest.addSyntheticTimepoints(slicer.mrmlScene, count=3)
        logic = LesionLocatorLogic()
        logic.settings = EngineSettings(device="cpu", preset="fast")
        self.assertTrue(logic.ensureEngineDependencies(confirm=slicer.util.confirmOkCancelDisplay))
        self.delayDisplay("Segmenting, tracking, cancelling and undoing (CPU: about a minute)")
        table = selftest.endToEndFlow(logic, volumes, pointRAS)
        logic.worker.shutdown()
        self.delayDisplay(f"Test passed: {len(table.rows)} lesion tracked over {len(table.timepointIDs)} scans")
