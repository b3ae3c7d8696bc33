"""What the reader states about a lesion through the Logic: a lymph node (at every scan), gone on one scan
(confirmed absent). Both are stored on the lesion's segments, are undoable, survive a saved scene, and reach the
report's RECIST response; tracking leaves a confirmed-absent scan alone."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.errors import LesionLocatorError  # noqa: E402
from LesionLocatorSlicer import measurements, segments, selftest  # noqa: E402
from LesionLocatorSlicer.logic import LesionTrackingLogic  # noqa: E402
from test_slicer_measurements import tableColumns  # noqa: E402
from test_slicer_segments import (addTimepoint, applyMask, cube, lesionMask, lesionSegment,  # noqa: E402
                                  saveAndReloadBundle)
from test_slicer_tracking_plan import InjectedEngines, RecordingTracker, logicWith  # noqa: E402

TARGET = cube((2, 2, 2), (6, 10, 18))  # 12.8 mm along x, 7.2 mm along y: a target, or as a node a normal-size one


def statuses(logic, scans) -> list[str]:
    return [cell.status for cell in logic.lesionTable(scans).rows[0].cells]


def categories(report) -> list[str]:
    return [row.category for row in report.response.timepoints]


@pytest.fixture
def trackedTwice(scene):
    """A target lesion prompted on t0, tracked onto t1 (found) and t2 (not found)."""
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], TARGET)
    logic.trackLesion(1, scans[1:2])
    logic.engines = InjectedEngines(RecordingTracker(lost={1}))
    logic.trackLesion(1, scans[2:])
    assert statuses(logic, scans) == ["prompted", "tracked", "not found"]
    return logic, scans


# --- lymph nodes -----------------------------------------------------------------------------------------------
def test_a_lymph_node_is_marked_on_its_segments_at_every_scan_and_measured_by_its_short_axis(scene, trackedTwice):
    logic, scans = trackedTwice
    assert logic.longitudinalReport(scans).role(1) == "target" and logic.lymphNodeIds() == []
    assert logic.setLymphNode(1) == "marking Lesion 1 as a lymph node"
    assert logic.lymphNodeIds() == [1] and logic.lesionTable(scans).rows[0].isLymphNode
    assert all(segments.isLymphNode(lesionSegment(scan, 1)[1]) for scan in scans)
    report = logic.longitudinalReport(scans)
    node = report.lesion(1)
    assert node.is_lymph_node and node.diameter_mm(0) == node.measurements[0].largest_short_axis_mm < 10
    assert report.role(1) == "excluded"  # a node under 10 mm short axis is normal for RECIST 1.1
    logic.showMeasurements(scans)
    columns = tableColumns(slicer.util.getFirstNodeByClassByName("vtkMRMLTableNode", measurements.TABLE_NAME, scene))
    assert columns["Kind"] == ["lymph node"] * 3
    assert columns["RECIST diameter (mm)"][0] == pytest.approx(node.diameter_mm(0))


def test_marking_again_changes_nothing_and_unmarking_and_undo_restore_the_marker(scene, trackedTwice):
    logic, scans = trackedTwice
    before = selftest.sceneState(scene)
    logic.setLymphNode(1)
    marked = selftest.sceneState(scene)
    assert logic.setLymphNode(1, True) is None  # no second undo step
    assert logic.setLymphNode(1, False) == "marking Lesion 1 as not a lymph node" and logic.lymphNodeIds() == []
    assert selftest.sceneState(scene) == before
    assert logic.undo() == "marking Lesion 1 as not a lymph node" and selftest.sceneState(scene) == marked
    assert logic.undo() == "marking Lesion 1 as a lymph node" and selftest.sceneState(scene) == before
    assert logic.undo() == "tracking Lesion 1"


def test_a_segment_made_later_for_a_lymph_node_is_marked_too(scene):
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], TARGET)
    logic.setLymphNode(1)
    logic.trackLesion(1, scans[1:2])
    applyMask(logic, scans[2], cube((3, 3, 3), (6, 8, 12)), lesionId=1)
    assert all(segments.isLymphNode(lesionSegment(scan, 1)[1]) for scan in scans)


def test_an_unknown_lesion_is_refused(scene, trackedTwice):
    logic, scans = trackedTwice
    for call in (lambda: logic.setLymphNode(7), lambda: logic.setConfirmedAbsent(7, scans[1]),
                 lambda: logic.setLymphNode("1")):
        with pytest.raises(LesionLocatorError, match=r"There is no lesion .*the lesions are \[1\]"):
            call()


# --- confirmed absent ------------------------------------------------------------------------------------------
def test_a_target_confirmed_absent_counts_0_mm_and_the_response_is_no_longer_not_evaluable(scene, trackedTwice):
    logic, scans = trackedTwice
    assert categories(logic.longitudinalReport(scans)) == ["BL", "SD", "NE"]
    assert logic.setConfirmedAbsent(1, scans[2]) == "confirming Lesion 1 absent on 't2'"
    assert statuses(logic, scans) == ["prompted", "tracked", "absent"]
    report = logic.longitudinalReport(scans)
    assert report.lesion(1).status(2) == "absent" and report.lesion(1).diameter_mm(2) == 0.0
    assert categories(report)[2] == "CR"
    logic.showMeasurements(scans)
    columns = tableColumns(slicer.util.getFirstNodeByClassByName("vtkMRMLTableNode", measurements.TABLE_NAME, scene))
    assert columns["Status"] == ["found", "found", "absent"]
    assert columns["Volume (ml)"][2] == 0.0 and columns["RECIST diameter (mm)"][2] == 0.0


def test_a_tracked_segment_is_cleared_by_confirming_absence_and_undo_brings_it_back(scene, trackedTwice):
    logic, scans = trackedTwice
    tracked, before = lesionMask(scans[1], 1), selftest.sceneState(scene)
    description = logic.setConfirmedAbsent(1, scans[1])
    assert description.startswith("confirming Lesion 1 absent on 't1', clearing its tracked segment (")
    assert not lesionMask(scans[1], 1).any() and statuses(logic, scans)[1] == "absent"
    assert logic.setConfirmedAbsent(1, scans[1]) is None  # already so: no undo step
    assert logic.undo() == description and selftest.sceneState(scene) == before
    np.testing.assert_array_equal(lesionMask(scans[1], 1), tracked)


def test_voxels_the_user_made_are_never_cleared(scene, trackedTwice):
    logic, scans = trackedTwice
    node, segment = lesionSegment(scans[1], 1)
    painted = cube((2, 2, 2), (6, 10, 19))  # the user paints one more column of voxels
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        segments.boundingBoxLabelmap(painted, scans[1]), node, segments.lesionSegmentIds(node)[1],
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before = selftest.sceneState(scene)
    for scan, status in ((scans[0], "prompted"), (scans[1], "edited")):
        with pytest.raises(LesionLocatorError, match=rf"holds .* ml that you segmented \({status}\); nothing was"):
            logic.setConfirmedAbsent(1, scan)
    assert selftest.sceneState(scene) == before
    assert logic.undo() == "tracking Lesion 1"  # no undo step was added
    assert logic.lesionTable(scans).rows[0].cells[1].holdsUserVoxels


def test_a_scan_that_is_not_a_volume_of_the_scene_is_refused(scene, trackedTwice):
    logic, scans = trackedTwice
    otherScene = slicer.vtkMRMLScene()
    other = addTimepoint(otherScene, "elsewhere")
    for scan in (None, "t1", segments.timepointSegmentationNode(scans[1]), other):
        with pytest.raises(LesionLocatorError, match="Give a scan of this scene as a volume node"):
            logic.setConfirmedAbsent(1, scan)


def test_confirming_absence_where_the_lesion_was_never_analysed_is_undone_whole(scene, trackedTwice):
    logic, scans = trackedTwice
    later = addTimepoint(scene, "t3")
    before = selftest.sceneState(scene)
    logic.setConfirmedAbsent(1, later)
    assert statuses(logic, scans + [later])[3] == "absent"
    logic.undo()
    assert segments.timepointSegmentationNode(later) is None and selftest.sceneState(scene) == before


def test_painting_into_a_confirmed_absent_segment_makes_it_edited_not_absent(scene, trackedTwice):
    logic, scans = trackedTwice
    logic.setConfirmedAbsent(1, scans[2])
    node, _ = lesionSegment(scans[2], 1)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        segments.boundingBoxLabelmap(cube((3, 3, 3), (5, 6, 8)), scans[2]), node, segments.lesionSegmentIds(node)[1],
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert statuses(logic, scans)[2] == "edited"
    assert logic.longitudinalReport(scans).lesion(1).status(2) == "found"


def test_withdrawing_the_confirmation_leaves_the_scan_to_tracking_again(scene, trackedTwice):
    logic, scans = trackedTwice
    logic.setConfirmedAbsent(1, scans[2])
    assert logic.setConfirmedAbsent(1, scans[2], False) == "withdrawing that Lesion 1 is absent on 't2'"
    assert statuses(logic, scans)[2] == "not found" and categories(logic.longitudinalReport(scans))[2] == "NE"
    assert logic.setConfirmedAbsent(1, scans[1], False) is None  # not confirmed there: nothing to withdraw
    logic.engines = InjectedEngines(RecordingTracker())  # the lesion shows up on t2 this time
    logic.trackLesion(1, scans[2:])
    assert statuses(logic, scans) == ["prompted", "tracked", "tracked"]


def test_tracking_does_not_overwrite_a_scan_where_the_lesion_is_confirmed_absent(scene):
    tracker = RecordingTracker()
    logic = logicWith(scene, tracker)
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], TARGET)
    logic.setConfirmedAbsent(1, scans[1])
    logic.trackAll(scans)
    assert tracker.calls == [("t0", "t2", [1])]
    assert statuses(logic, scans) == ["prompted", "absent", "tracked"]
    logic.setConfirmedAbsent(1, scans[2])
    with pytest.raises(LesionLocatorError, match="not segmented or confirmed absent already"):
        logic.trackAll(scans)


def test_a_new_lesion_stays_progression_until_confirmed_absent(scene):
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], TARGET)
    logic.trackLesion(1, scans[1:])
    applyMask(logic, scans[1], cube((8, 12, 2), (10, 15, 6)))  # lesion 2, first seen on t1
    logic.engines = InjectedEngines(RecordingTracker(lost={2}))
    logic.trackLesion(2, scans[2:])
    assert categories(logic.longitudinalReport(scans)) == ["BL", "PD", "PD"]
    logic.setConfirmedAbsent(2, scans[2])
    report = logic.longitudinalReport(scans)
    assert report.role(2) == "new" and categories(report) == ["BL", "PD", "SD"]


def test_a_lesion_confirmed_absent_before_it_appears_is_a_new_lesion(scene):
    """Tracked back to the baseline and not found there it is left out (unknown); confirmed absent there, new."""
    logic = logicWith(scene, RecordingTracker(lost={1}))
    scans = [addTimepoint(scene, name) for name in ("t0", "t1")]
    applyMask(logic, scans[1], TARGET)
    logic.trackLesion(1, scans)
    assert logic.longitudinalReport(scans).role(1) == "excluded"
    logic.setConfirmedAbsent(1, scans[0])
    report = logic.longitudinalReport(scans)
    assert report.role(1) == "new" and report.lesion(1).status(0) == "not yet present" and categories(report)[1] == "PD"


def test_lymph_nodes_and_absences_survive_a_saved_and_reloaded_scene(scene, trackedTwice, tmp_path):
    logic, scans = trackedTwice
    logic.setLymphNode(1)
    logic.setConfirmedAbsent(1, scans[2])
    before = logic.longitudinalReport(scans)

    reloaded = saveAndReloadBundle(scene, tmp_path)
    reloadedLogic = LesionTrackingLogic(reloaded)
    reloadedScans = [reloaded.GetFirstNodeByName(name) for name in ("t0", "t1", "t2")]
    assert reloadedLogic.lymphNodeIds() == [1]
    assert statuses(reloadedLogic, reloadedScans) == ["prompted", "tracked", "absent"]
    after = reloadedLogic.longitudinalReport(reloadedScans)
    assert after.lesion(1).is_lymph_node and after.lesion(1).confirmed_absent == frozenset({2})
    assert categories(after) == categories(before)
    with pytest.raises(LesionLocatorError, match="confirmed absent already"):
        reloadedLogic.trackLesion(1, reloadedScans[2:])


def test_the_exported_report_shows_the_lymph_node_and_the_absence(scene, trackedTwice, tmp_path):
    logic, scans = trackedTwice
    logic.setLymphNode(1)
    logic.setConfirmedAbsent(1, scans[2])
    page = logic.exportReport(scans, tmp_path / "report").read_text()
    assert "excluded, lymph node)" in page and "<td class=text>absent</td>" in page
    rows = (tmp_path / "report" / "measurements.csv").read_text().splitlines()
    assert rows[-1].split(",")[:8] == ["1", "Lesion 1", "excluded", "True", "2", "t2", "", "absent"]
