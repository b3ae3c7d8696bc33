"""Measurements in MRML (table, volume chart, RECIST lines), the exported report and the saved segmentations."""
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LesionLocator"))

from LesionLocatorLib.image import ImageVolume  # noqa: E402
from LesionLocatorSlicer import geometry, measurements, segments  # noqa: E402
from LesionLocatorSlicer.logic import LesionTrackingLogic  # noqa: E402
from test_slicer_geometry import addLinearTransform, rigid  # noqa: E402
from test_slicer_segments import SHAPE_ZYX, addTimepoint, applyMask, cube  # noqa: E402


@pytest.fixture
def twoScansTwoLesions(scene):
    """Lesion 1 on both scans (grows), lesion 2 only on the baseline; the follow-up is under a transform."""
    logic = LesionTrackingLogic(scene)
    baseline, followUp = addTimepoint(scene, "baseline"), addTimepoint(scene, "follow-up", transformed=True)
    applyMask(logic, baseline, cube((2, 2, 2), (6, 8, 10)))
    applyMask(logic, followUp, cube((2, 2, 2), (7, 10, 12)), lesionId=1)
    applyMask(logic, baseline, cube((8, 10, 12), (10, 14, 18)))
    return logic, [baseline, followUp]


def tableColumns(tableNode) -> dict[str, list]:
    table = tableNode.GetTable()
    columns = {}
    for index in range(table.GetNumberOfColumns()):
        array = table.GetColumn(index)
        columns[array.GetName()] = [array.GetValue(row) for row in range(array.GetNumberOfTuples())]
    return columns


def nodesWithAttribute(scene, attribute) -> list:
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()) if scene.GetNthNode(i).GetAttribute(attribute)]


def test_measurement_table_has_every_lesion_at_every_scan(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    logic.showMeasurements(scans)
    columns = tableColumns(slicer.util.getFirstNodeByClassByName("vtkMRMLTableNode", measurements.TABLE_NAME, scene))
    assert columns["Lesion"] == ["Lesion 1", "Lesion 1", "Lesion 2", "Lesion 2"]
    assert columns["Scan"] == ["baseline", "follow-up"] * 2
    assert columns["Status"] == ["found", "found", "found", "not segmented"]
    voxelMl = 0.8 * 0.9 * 2.0 / 1000
    np.testing.assert_allclose(columns["Volume (ml)"][:3], [4 * 6 * 8 * voxelMl, 5 * 8 * 10 * voxelMl, 2 * 4 * 6 * voxelMl])
    assert np.isnan(columns["Volume (ml)"][3]) and columns["Long axis (mm)"][0] > 0


def test_volume_chart_has_one_series_per_lesion_in_its_colour(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    chart = logic.showMeasurements(scans)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetYColumnName() == "Lesion 1" and series.GetXColumnName() == "Scan"
    assert series.GetColor() == pytest.approx(segments.lesionColour(1))
    volumes = tableColumns(series.GetTableNode())
    assert volumes["Scan"] == [1.0, 2.0] and volumes["Lesion 1"][1] > volumes["Lesion 1"][0]


def test_recist_lines_are_the_reports_diameters_in_world_ras(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    logic.showMeasurements(scans)
    report = logic.longitudinalReport(scans)
    lines = [node for node in nodesWithAttribute(scene, measurements.MEASUREMENT_ATTRIBUTE)
             if node.IsA("vtkMRMLMarkupsLineNode")]
    assert len(lines) == 2 * 3  # long and short axis where a lesion is found: lesion 1 twice, lesion 2 once
    followUpLong = next(line for line in lines if line.GetName() == "Lesion 1 long axis (follow-up)")
    assert followUpLong.GetAttribute(measurements.VOLUME_ATTRIBUTE) == scans[1].GetID()
    expected = report.lesion(1).measurements[1]
    assert followUpLong.GetLineLengthWorld() == pytest.approx(expected.long_axis_mm, rel=1e-6)
    endsRAS = slicer.util.arrayFromMarkupsControlPoints(followUpLong, world=True)
    np.testing.assert_allclose(endsRAS, np.asarray(expected.long_axis_lps) * [-1, -1, 1], atol=1e-6)


def test_measuring_again_replaces_the_nodes(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    logic.showMeasurements(scans)
    count = scene.GetNumberOfNodes()
    logic.showMeasurements(scans)
    assert scene.GetNumberOfNodes() == count


def test_chart_uses_days_when_every_scan_has_a_study_date(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for volume, day in zip(scans, ("20240110", "20240409")):
        study = shNode.CreateStudyItem(shNode.GetSceneItemID(), day)
        shNode.SetItemAttribute(study, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMStudyDateAttributeName(), day)
        shNode.SetItemParent(segments.subjectHierarchyItem(shNode, volume), study)
    series = logic.showMeasurements(scans).GetNthPlotSeriesNode(0)
    assert tableColumns(series.GetTableNode())["Days since baseline"] == [0.0, 90.0]


def test_report_export_writes_the_html_page(scene, twoScansTwoLesions, tmp_path):
    logic, scans = twoScansTwoLesions
    page = logic.exportReport(scans, tmp_path / "report")
    assert page.is_file() and "Lesion 2" in page.read_text()
    assert (tmp_path / "report" / "measurements.csv").is_file()


def test_saved_segmentations_read_back_with_their_lesion_tags(scene, twoScansTwoLesions, tmp_path):
    logic, scans = twoScansTwoLesions
    written = logic.saveSegmentations(scans, tmp_path)
    assert [path.name for path in written] == ["baseline lesions.seg.nrrd", "follow-up lesions.seg.nrrd"]
    reloaded = slicer.vtkMRMLScene()
    node = reloaded.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = reloaded.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(written[0]))
    assert storage.ReadData(node)
    assert sorted(segments.lesionSegmentIds(node)) == [1, 2]


def test_diameters_are_measured_in_world_space_under_a_transform(scene):
    """A scaling parent transform doubles the lengths the engine measures (it sees the world geometry)."""
    logic = LesionTrackingLogic(scene)
    volume = addTimepoint(scene, "scaled")
    applyMask(logic, volume, cube((2, 2, 2), (6, 8, 10)))
    plain = logic.longitudinalReport([volume]).lesion(1).measurements[0].long_axis_mm
    scaling = addLinearTransform(scene, np.diag([2.0, 2.0, 2.0, 1.0]) @ rigid([0, 0, 1], 0, [0, 0, 0]))
    for node in (volume, segments.timepointSegmentationNode(volume)):  # the user moves the scan and its lesions
        node.SetAndObserveTransformNodeID(scaling.GetID())
    scaled = logic.longitudinalReport([volume]).lesion(1).measurements[0].long_axis_mm
    assert scaled == pytest.approx(2 * plain, rel=1e-6)


def test_lesion_table_volume_is_in_world_units_like_the_report(scene):
    logic = LesionTrackingLogic(scene)
    volume = addTimepoint(scene, "scaled")
    scaling = addLinearTransform(scene, np.diag([2.0, 2.0, 2.0, 1.0]) @ rigid([0, 0, 1], 10, [1, 2, 3]))
    volume.SetAndObserveTransformNodeID(scaling.GetID())
    applyMask(logic, volume, cube((2, 2, 2), (6, 8, 10)))
    reportMl = logic.longitudinalReport([volume]).lesion(1).measurements[0].volume_ml
    assert reportMl == pytest.approx(8 * 4 * 6 * 8 * 0.8 * 0.9 * 2.0 / 1000)
    assert logic.lesionTable([volume]).rows[0].cells[0].volumeMl == pytest.approx(reportMl)


def test_a_lesion_not_found_is_a_gap_not_zero_ml(scene, twoScansTwoLesions):
    logic, scans = twoScansTwoLesions
    segments.writeLesionMask(segments.timepointSegmentationNode(scans[1]), scans[1], 2, None, segments.NOT_FOUND)
    chart = logic.showMeasurements(scans)
    columns = tableColumns(slicer.util.getFirstNodeByClassByName("vtkMRMLTableNode", measurements.TABLE_NAME, scene))
    assert columns["Status"][3] == "not found" and np.isnan(columns["Volume (ml)"][3])
    volumes = tableColumns(chart.GetNthPlotSeriesNode(1).GetTableNode())["Lesion 2"]
    assert volumes[0] > 0 and np.isnan(volumes[1])


def test_a_lymph_nodes_largest_short_axis_gets_its_own_line_when_on_another_slice(scene):
    """A thin 18 mm slab above a 10 mm square: the long and short axes lie on the slab's slice, a node's RECIST
    diameter (largest short axis) on the square's; only a lymph node gets that third line."""
    logic = LesionTrackingLogic(scene)
    volume = geometry.addVolumeNodeFromImage(scene, ImageVolume(np.zeros(SHAPE_ZYX, np.int16), (1.0, 1.0, 2.0),
                                                                (0.0, 0.0, 0.0), np.eye(3)), "scan")
    mask = cube((2, 2, 0), (4, 4, 18))
    mask[4:8, 2:12, 2:12] = 1
    applyMask(logic, volume, mask)

    def diameterLines() -> dict[str, float]:
        logic.showMeasurements([volume])
        lines = nodesWithAttribute(scene, measurements.VOLUME_ATTRIBUTE)
        return {line.GetName(): line.GetLineLengthWorld() for line in lines}

    assert sorted(diameterLines()) == ["Lesion 1 long axis (scan)", "Lesion 1 short axis (scan)"]
    logic.setLymphNode(1)
    lines = diameterLines()
    node = logic.longitudinalReport([volume]).lesion(1).measurements[0]
    assert node.largest_short_axis_lps != node.short_axis_lps
    assert lines["Lesion 1 largest short axis (scan)"] == pytest.approx(node.largest_short_axis_mm, rel=1e-6)
    assert lines["Lesion 1 short axis (scan)"] < node.largest_short_axis_mm < lines["Lesion 1 long axis (scan)"]
