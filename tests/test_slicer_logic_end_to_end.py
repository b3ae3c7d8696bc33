"""The Logic driven end to end with the tiny official-format checkpoint: prompt, track, cancel, undo.

Runs the same flow as the module's self-test (LesionLocatorSlicer.selftest.endToEndFlow). CPU, preset fast,
classical registration by default; the GradICON network at 175^3 takes minutes on a CPU and is marked slow.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.image import read_image  # noqa: E402
from LesionLocatorSlicer import geometry, segments, selftest  # noqa: E402
from LesionLocatorSlicer.logic import MODEL_CUSTOM, EngineCache, LesionTrackingLogic  # noqa: E402
from test_slicer_geometry import addLinearTransform, rigid  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "official"
TINY_MODEL = FIXTURES / "tiny"
TRACKING_CASE = FIXTURES / "inputs" / "A_trk"
LESION_1_BASELINE_INDEX_ZYX = (24.15, 33.10, 19.97)  # inputs/A_trk/prompts/A_trk_bl_points.json, lesion 1

pytestmark = pytest.mark.skipif(not (TINY_MODEL.is_dir() and TRACKING_CASE.is_dir()),
                                reason=f"tiny checkpoint or tracking inputs missing under {FIXTURES}")


@pytest.fixture(scope="module")
def tinyLogicSettings():
    return dict(model=MODEL_CUSTOM, modelFolder=str(TINY_MODEL), device="cpu", preset="fast")


# One engine cache for the module: the models load once and the tracker's registration cache is reused (a Logic's
# engines are only used by its worker thread, and these tests run one Logic at a time).
SHARED_ENGINES = EngineCache()


def newLogic(scene, registration: str = "classical", **settings) -> LesionTrackingLogic:
    logic = LesionTrackingLogic(scene)
    logic.engines = SHARED_ENGINES
    for name, value in settings.items():
        setattr(logic.settings, name, value)
    logic.settings.registration = registration
    return logic


def loadTimepoints(scene, names):
    return [geometry.addVolumeNodeFromImage(scene, read_image(TRACKING_CASE / f"A_trk_{name}.nii.gz")) for name in names]


def lesionPointRAS(volumeNode):
    return geometry.imageVolumeFromVolumeNode(volumeNode).index_zyx_to_ras(LESION_1_BASELINE_INDEX_ZYX)


def dice(a, b) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def groundTruth(name: str, label: int) -> np.ndarray:
    return read_image(TRACKING_CASE / "gt" / f"A_trk_{name}_gt_inst.nii.gz").array == label


def trackedMask(volumeNode, lesionId: int) -> np.ndarray:
    node = segments.timepointSegmentationNode(volumeNode)
    return segments.lesionMaskArray(node, segments.lesionSegmentIds(node)[lesionId], volumeNode)


def test_two_timepoints_prompt_track_cancel_undo(tinyLogicSettings):
    scene = slicer.vtkMRMLScene()
    volumes = loadTimepoints(scene, ["bl", "fu1"])
    table = selftest.endToEndFlow(newLogic(scene, **tinyLogicSettings), volumes, lesionPointRAS(volumes[0]))
    assert table.rows[0].cells[1].status == segments.TRACKED


def test_segmentation_through_the_scene_matches_the_official_output(tinyLogicSettings):
    """Volume node -> engine -> segment -> array gives what the official code wrote for the same click
    (run A02: point, fold 0, no TTA; the baseline is the A_ts1 image, direction diag(-1, -1, 1))."""
    scene = slicer.vtkMRMLScene()
    (baseline,) = loadTimepoints(scene, ["bl"])
    lesionId = newLogic(scene, **tinyLogicSettings).segmentLesion(baseline, pointRAS=lesionPointRAS(baseline))
    official = read_image(FIXTURES / "outputs" / "A02_ts1_point_f0_notta" / "A_ts1_lesion_1.nii.gz").array > 0
    assert dice(trackedMask(baseline, lesionId), official) > 0.95


def test_three_timepoints_find_the_lesion_where_it_really_is(tinyLogicSettings):
    scene = slicer.vtkMRMLScene()
    volumes = loadTimepoints(scene, ["bl", "fu1", "fu2"])
    logic = newLogic(scene, **tinyLogicSettings)
    lesionId = logic.segmentLesion(volumes[0], pointRAS=lesionPointRAS(volumes[0]))
    results = logic.trackLesion(lesionId, volumes[1:])
    assert sorted(results[lesionId]) == sorted(node.GetID() for node in volumes[1:])
    for volume, name in zip(volumes[1:], ["fu1", "fu2"]):
        mask = trackedMask(volume, lesionId)
        # the official pipeline reaches Dice 0.5-0.6 with these toy weights (outputs/A20, A21)
        assert dice(mask, groundTruth(name, 1)) > 0.35, name
        assert not np.logical_and(mask, groundTruth(name, 2)).any(), f"{name}: the other lesion was taken"
    selftest.checkLesionAtEveryTimepoint(logic, volumes, lesionId)


def test_transform_on_a_follow_up_is_honoured(tinyLogicSettings):
    """The same follow-up voxels moved away by their origin and brought back by a parent transform: same result."""
    plain, moved = slicer.vtkMRMLScene(), slicer.vtkMRMLScene()
    plainVolumes, movedVolumes = loadTimepoints(plain, ["bl", "fu1"]), loadTimepoints(moved, ["bl", "fu1"])
    shift = rigid([0, 0, 1], 0, [30.0, -20.0, 15.0])
    ijkToRAS = geometry.ijkToWorldMatrix(movedVolumes[1])
    movedVolumes[1].SetIJKToRASMatrix(geometry.vtkMatrixFromArray(np.linalg.inv(shift) @ ijkToRAS))
    movedVolumes[1].SetAndObserveTransformNodeID(addLinearTransform(moved, shift).GetID())
    masks = []
    for scene, volumes in ((plain, plainVolumes), (moved, movedVolumes)):
        logic = newLogic(scene, **tinyLogicSettings)
        lesionId = logic.segmentLesion(volumes[0], pointRAS=lesionPointRAS(volumes[0]))
        logic.trackLesion(lesionId, volumes[1:])
        masks.append(trackedMask(volumes[1], lesionId))
    assert masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])


def test_reprompt_on_a_follow_up_pins_it_and_retracking_starts_from_there(tinyLogicSettings):
    scene = slicer.vtkMRMLScene()
    volumes = loadTimepoints(scene, ["bl", "fu1", "fu2"])
    logic = newLogic(scene, **tinyLogicSettings)
    lesionId = logic.segmentLesion(volumes[0], pointRAS=lesionPointRAS(volumes[0]))
    followUpImage = geometry.imageVolumeFromVolumeNode(volumes[1])
    followUpCentre = followUpImage.index_zyx_to_ras(np.argwhere(groundTruth("fu1", 1)).mean(axis=0))
    logic.segmentLesion(volumes[1], pointRAS=followUpCentre, lesionId=lesionId)
    results = logic.trackLesion(lesionId, volumes)
    assert list(results[lesionId]) == [volumes[2].GetID()]  # baseline and the corrected follow-up stay as they are
    statuses = [cell.status for cell in logic.lesionTable(volumes).rows[0].cells]
    assert statuses[:2] == [segments.PROMPTED, segments.PROMPTED]


def test_synthetic_self_test_flow_runs_headless(tinyLogicSettings):
    """The data the in-Slicer self-test uses, through the same flow."""
    scene = slicer.vtkMRMLScene()
    volumes, pointRAS = selftest.addSyntheticTimepoints(scene, count=2)
    selftest.endToEndFlow(newLogic(scene, **tinyLogicSettings), volumes, pointRAS)


@pytest.mark.slow
def test_three_timepoints_with_the_gradicon_network(tinyLogicSettings):
    scene = slicer.vtkMRMLScene()
    volumes = loadTimepoints(scene, ["bl", "fu1", "fu2"])
    selftest.endToEndFlow(newLogic(scene, "gradicon", **tinyLogicSettings), volumes, lesionPointRAS(volumes[0]))


def test_volumes_that_are_not_ct_in_hu_are_named_in_a_warning(tinyLogicSettings, tmp_path, caplog):
    scene = slicer.vtkMRMLScene()
    logic = newLogic(scene, **tinyLogicSettings)
    ct, = loadTimepoints(scene, ["bl"])
    image = read_image(TRACKING_CASE / "A_trk_bl.nii.gz")
    mrLike = geometry.addVolumeNodeFromImage(
        scene, replace(image, array=((image.array + 1000.0) * 0.4).astype(np.float32)), name="MR like")
    assert logic.intensityWarning([ct]) == ""
    # segmenting from the console logs it, once per scan and model
    for _ in range(2):
        logic.prepareSegmentation(mrLike, pointRAS=lesionPointRAS(mrLike))
    assert [r.getMessage()[:7] for r in caplog.records if "intensities" in r.getMessage()] == ["MR like"]
    warning = logic.intensityWarning([ct, mrLike, mrLike])
    assert warning.startswith("MR like's intensities do not look like CT in Hounsfield units") and "\n" not in warning
    # the voxels change in place (a filter): the warning follows them
    geometry.voxelArrayView(mrLike)[:] = image.array
    mrLike.GetImageData().Modified()
    assert logic.intensityWarning([mrLike]) == ""
    geometry.voxelArrayView(mrLike)[:] += 1024.0
    mrLike.GetImageData().Modified()
    assert "MR like's intensities" in logic.intensityWarning([mrLike])
    # a model that normalizes as MR (z-score) takes any intensities
    plans = json.loads((TINY_MODEL / "LesionLocatorTrack" / "plans.json").read_text())
    for configuration in plans["configurations"].values():
        configuration["normalization_schemes"] = ["ZScoreNormalization"]
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    logic.settings.modelFolder = str(tmp_path)
    assert logic.intensityWarning([mrLike]) == ""


def test_cpu_bfloat16_setting_reaches_both_engines_and_rebuilds_them():
    from LesionLocatorSlicer.logic import EngineSettings

    engines = EngineCache()
    settings = EngineSettings(model=MODEL_CUSTOM, modelFolder=str(TINY_MODEL), device="cpu", preset="fast",
                              registration="classical")
    fp32 = engines.tracker(TINY_MODEL, settings)
    assert not fp32.segmenter.cpu_bf16
    settings.cpuBfloat16 = True
    bf16 = engines.tracker(TINY_MODEL, settings)
    assert bf16 is not fp32 and bf16.segmenter.cpu_bf16 and bf16.folds[0].predictor.settings.cpu_bf16
    assert engines.segmenter(TINY_MODEL, settings) is bf16.segmenter


def test_point_search_setting_follows_the_model_and_rebuilds_the_segmenter():
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
    from LesionLocatorSlicer.logic import EngineSettings

    engines = EngineCache()
    settings = EngineSettings(device="cpu", preset="fast")  # the bundled Lite model asks for a point search
    searching = engines.segmenter(BUNDLED_LITE_DIR, settings)
    assert searching.point_search is not None
    settings.pointSearch = False
    plain = engines.segmenter(BUNDLED_LITE_DIR, settings)
    assert plain is not searching and plain.point_search is None
    settings.pointSearch = True
    assert engines.segmenter(TINY_MODEL, settings).point_search is None  # official layout: no manifest, no search


def test_box_refinement_setting_reaches_the_segmenter_and_the_tracker():
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
    from LesionLocatorSlicer.logic import EngineSettings

    engines = EngineCache()
    settings = EngineSettings(device="cpu", preset="fast", registration="classical")
    refining = engines.tracker(BUNDLED_LITE_DIR, settings)  # the bundled Lite model tracks with its box network
    assert refining.box_refiner is not None and refining.segmenter.box_refiner is not None
    settings.boxRefinement = False
    plain = engines.tracker(BUNDLED_LITE_DIR, settings)
    assert plain is not refining and plain.box_refiner is None and plain.segmenter.box_refiner is None


def test_the_module_follows_the_models_fine_grid_and_says_what_to_do_with_an_empty_answer():
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
    from LesionLocatorLib.prompts import BoxPrompt, PointPrompt
    from LesionLocatorSlicer.logic import EngineSettings, emptyAnswerMessage

    engines = EngineCache()
    assert engines.segmenter(BUNDLED_LITE_DIR, EngineSettings(device="cpu", preset="fast")).fine_grid is not None
    assert "draw a box" in emptyAnswerMessage(PointPrompt((1, 2, 3)))
    box_message = emptyAnswerMessage(BoxPrompt((0, 0, 0), (2, 2, 2)))
    assert "in this box" in box_message and "draw a box" not in box_message
