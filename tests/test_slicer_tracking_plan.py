"""How the Logic plans tracking and applies its results, with a recording tracker injected in place of the model
(the engine's own tracking is covered by test_slicer_logic_end_to_end.py)."""
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.errors import Cancelled, LesionLocatorError  # noqa: E402
from LesionLocatorSlicer import segments, selftest  # noqa: E402
from LesionLocatorSlicer.logic import LesionTrackingLogic, groupBySource, lesionForPrompt  # noqa: E402
from test_slicer_segments import addTimepoint, applyMask, cube, lesionSegment  # noqa: E402


@dataclass
class Found:
    """The fields of LesionLocatorLib.tracking.LesionAtTimepoint that the Logic reads."""

    found: bool
    mask: np.ndarray | None


class RecordingTracker:
    """Moves each mask one voxel along x per step; lesions listed in `lost` are not found."""

    def __init__(self, lost=()):
        self.calls, self.lost = [], set(lost)

    def track_step(self, earlier, later, masks, progress=None, cancel_event=None):
        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled("Cancelled by the user.")
        self.calls.append((earlier.name, later.name, sorted(masks)))
        progress(0.5, "registering 1/1")
        return {lesionId: Found(False, None) if lesionId in self.lost else Found(True, np.roll(mask, 1, axis=2))
                for lesionId, mask in masks.items()}


class InjectedEngines:
    def __init__(self, tracker):
        self._tracker = tracker

    def tracker(self, modelRoot, settings):
        return self._tracker


def logicWith(scene, tracker) -> LesionTrackingLogic:
    logic = LesionTrackingLogic(scene)
    logic.engines = InjectedEngines(tracker)
    logic.modelRoot = lambda: Path("unused")
    return logic


def test_lesion_chain_runs_from_the_nearest_earlier_scan_where_it_was_found(scene):
    tracker = RecordingTracker()
    logic = logicWith(scene, tracker)
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    results = logic.trackLesion(1, scans[1:])
    assert tracker.calls == [("t0", "t1", [1]), ("t1", "t2", [1])]
    assert sorted(results[1]) == sorted(scan.GetID() for scan in scans[1:])
    node, _ = lesionSegment(scans[2], 1)
    np.testing.assert_array_equal(segments.lesionMaskArray(node, segments.lesionSegmentIds(node)[1], scans[2]),
                                  np.roll(cube((2, 2, 2), (5, 5, 5)), 2, axis=2))


def test_a_lesion_lost_on_a_scan_is_tracked_on_from_the_last_scan_where_it_was_found(scene):
    tracker = RecordingTracker(lost={2})
    logic = logicWith(scene, tracker)
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    applyMask(logic, scans[0], cube((8, 8, 8), (10, 10, 10)))
    logic.trackAll(scans)
    assert tracker.calls[0] == ("t0", "t1", [1, 2])
    assert sorted(tracker.calls[1:]) == [("t0", "t2", [2]), ("t1", "t2", [1])]
    statuses = [[cell.status for cell in row.cells] for row in logic.lesionTable(scans).rows]
    assert statuses == [["prompted", "tracked", "tracked"], ["prompted", "not found", "not found"]]


def test_scans_the_user_segmented_are_not_retracked_and_seed_the_next_ones(scene):
    tracker = RecordingTracker()
    logic = logicWith(scene, tracker)
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    applyMask(logic, scans[1], cube((3, 3, 3), (6, 6, 6)), lesionId=1)  # a prompt on the follow-up
    logic.trackLesion(1, scans)
    assert tracker.calls == [("t1", "t2", [1])]


def test_a_lesion_first_segmented_on_a_follow_up_is_tracked_back_to_the_baseline(scene):
    tracker = RecordingTracker()
    logic = logicWith(scene, tracker)
    scans = [addTimepoint(scene, name) for name in ("t0", "t1")]
    applyMask(logic, scans[1], cube((2, 2, 2), (5, 5, 5)))
    logic.trackLesion(1, scans)
    assert tracker.calls == [("t1", "t0", [1])]


def test_tracking_is_one_undo_step_and_cancelling_changes_nothing(scene):
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    before = selftest.sceneState(scene)
    selftest.checkCancelLeavesSceneUnchanged(logic, 1, scans[1:])
    logic.trackLesion(1, scans[1:])
    assert logic.undo() == "tracking Lesion 1"
    assert selftest.sceneState(scene) == before


def test_progress_names_the_scan_and_the_step(scene):
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    request = logic.prepareTracking([1], scans[1:])
    reports = []
    logic.computeTracking(request, lambda fraction, stage: reports.append((fraction, stage)), threading.Event())
    assert reports == [(0.25, "registering 1/1 (t1, scan 1/2)"), (0.75, "registering 1/1 (t2, scan 2/2)")]


class StagedTracker(RecordingTracker):
    """Reports a whole step, from its start to done, as the engine does."""

    def track_step(self, earlier, later, masks, progress=None, cancel_event=None):
        progress(0.0, "registering")
        found = super().track_step(earlier, later, masks, progress, cancel_event)
        progress(1.0, "done")
        return found


def test_progress_never_goes_backwards_when_a_scan_is_tracked_from_two_sources(scene):
    logic = logicWith(scene, StagedTracker(lost={2}))
    scans = [addTimepoint(scene, name) for name in ("t0", "t1", "t2")]
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    applyMask(logic, scans[0], cube((8, 8, 8), (10, 10, 10)))
    request = logic.prepareTracking([1, 2], scans)
    reports = []
    logic.computeTracking(request, lambda fraction, stage: reports.append((fraction, stage)), threading.Event())
    assert [fraction for fraction, _ in reports[-6:]] == [0.5, 0.625, 0.75, 0.75, 0.875, 1.0]  # t2: from t0, from t1
    assert [fraction for fraction, _ in reports] == sorted(fraction for fraction, _ in reports)


def test_tracking_needs_a_segmented_lesion_and_a_follow_up(scene):
    logic = logicWith(scene, RecordingTracker())
    scans = [addTimepoint(scene, name) for name in ("t0", "t1")]
    with pytest.raises(LesionLocatorError, match="no lesion to track"):
        logic.trackAll(scans)
    applyMask(logic, scans[0], cube((2, 2, 2), (5, 5, 5)))
    with pytest.raises(LesionLocatorError, match="follow-up"):
        logic.trackLesion(1, scans[:1])


def test_source_is_the_nearest_earlier_scan_else_the_nearest_later_one():
    masks = {(1, "t0"): 1, (1, "t3"): 1, (2, "t3"): 1}
    assert groupBySource(["t0", "t1", "t2", "t3"], "t2", [1, 2, 3], masks) == {"t0": [1], "t3": [2]}


def test_a_prompt_on_the_baseline_starts_a_lesion_and_on_a_follow_up_corrects_the_current_one(scene):
    scans = [addTimepoint(scene, name) for name in ("t0", "t1")]
    assert lesionForPrompt(scans[0], scans, currentLesion=3) is None
    assert lesionForPrompt(scans[1], scans, currentLesion=3) == 3
    assert lesionForPrompt(scans[1], scans, currentLesion=0) is None


def test_tracking_starts_from_the_lesion_as_seen_after_the_volume_transform_was_hardened(scene):
    logic = logicWith(scene, RecordingTracker())
    baseline, followUp = addTimepoint(scene, "baseline", transformed=True), addTimepoint(scene, "follow-up")
    applyMask(logic, baseline, cube((2, 3, 4), (5, 7, 9)))
    baseline.HardenTransform()  # as GeometryError advises for transforms the engine cannot take
    request = logic.prepareTracking([1], [followUp])
    np.testing.assert_array_equal(request.masks[(1, baseline.GetID())], cube((2, 3, 4), (5, 7, 9)))
