"""A longitudinal report shown in MRML: a measurements table, a volume-over-time chart, RECIST diameter lines.

The numbers come from LesionLocatorLib.report (measure_lesion on the world-geometry images), so the module, the
exported report and the command line agree. Nodes made here carry MEASUREMENT_ATTRIBUTE and are replaced, not
added to, when the user measures again.
"""
from __future__ import annotations

from datetime import date

import numpy as np
import vtk

from LesionLocatorLib.image import LPS_TO_RAS

from . import segments

MEASUREMENT_ATTRIBUTE = "LesionLocator.Measurement"
VOLUME_ATTRIBUTE = "LesionLocator.Volume"  # on a diameter line: the scan it was measured on
TABLE_NAME = "LesionLocator measurements"
VOLUMES_TABLE_NAME = "LesionLocator volumes over time"
CHART_NAME = "LesionLocator volume over time"
NUMBER_COLUMNS = (("Volume (ml)", "volume_ml"), ("RECIST diameter (mm)", "recist_diameter_mm"),
                  ("Long axis (mm)", "long_axis_mm"), ("Short axis (mm)", "short_axis_mm"),
                  ("Largest short axis (mm)", "largest_short_axis_mm"), ("Max 3D diameter (mm)", "max_diameter_3d_mm"),
                  ("Mean intensity", "intensity_mean"))


def removeMeasurementNodes(scene) -> None:
    nodes = [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]
    for node in nodes:
        if node.GetAttribute(MEASUREMENT_ATTRIBUTE):
            segments.removeNodeAndHelpers(node)


def _addNode(scene, className: str, name: str, kind: str):
    node = scene.AddNewNodeByClass(className, name)
    node.SetAttribute(MEASUREMENT_ATTRIBUTE, kind)
    return node


def _column(table: vtk.vtkTable, name: str, arrayClass, values=()):
    """A new named column; a table that has rows only takes columns with as many values."""
    array = arrayClass()
    array.SetName(name)
    for value in values:
        array.InsertNextValue(value)
    table.AddColumn(array)
    return array


def measurementsTableNode(scene, report, volumeNodes: list):
    """One row per lesion and scan: kind, status and the numbers of LesionLocatorLib.measurements, with the RECIST
    diameter (a lymph node's largest short axis; 0 where confirmed absent)."""
    tableNode = _addNode(scene, "vtkMRMLTableNode", TABLE_NAME, "table")
    table = tableNode.GetTable()
    lesions, kinds, scans, statuses = (_column(table, name, vtk.vtkStringArray)
                                       for name in ("Lesion", "Kind", "Scan", "Status"))
    numbers = [(_column(table, title, vtk.vtkDoubleArray), field) for title, field in NUMBER_COLUMNS]
    for series in report.series:
        for index, volumeNode in enumerate(volumeNodes):
            lesions.InsertNextValue(series.name)
            kinds.InsertNextValue("lymph node" if series.is_lymph_node else "non-nodal lesion")
            scans.InsertNextValue(volumeNode.GetName())
            statuses.InsertNextValue(series.status(index))
            for array, field in numbers:
                array.InsertNextValue(_number(series, index, field))
    tableNode.Modified()
    return tableNode


def _number(series, index: int, field: str) -> float:
    """NaN (a gap) where there is no value: an empty segmentation is 0 ml and 0 mm only when the lesion is confirmed
    absent."""
    if field == "volume_ml":
        value = series.volume_ml(index)
    elif field == "recist_diameter_mm":
        value = series.diameter_mm(index)
    else:
        value = getattr(series.measurements[index], field, None)
    return np.nan if value is None else float(value)


def timeAxis(report) -> tuple[str, list[float]]:
    """Days since the baseline when every scan has a study date, else the scan number."""
    dates = [info.study_date for info in report.timepoints]
    if all(dates):
        parsed = [date(int(d[:4]), int(d[4:6]), int(d[6:8])) for d in dates]
        return "Days since baseline", [float((day - parsed[0]).days) for day in parsed]
    return "Scan", [float(index + 1) for index in range(len(dates))]


def volumeChartNode(scene, report, colours: dict[int, tuple]):
    """A chart with one line per lesion: its volume (ml) at each scan (a gap where it was not segmented or found)."""
    axisTitle, times = timeAxis(report)
    tableNode = _addNode(scene, "vtkMRMLTableNode", VOLUMES_TABLE_NAME, "volumes")
    _column(tableNode.GetTable(), axisTitle, vtk.vtkDoubleArray, times)
    chartNode = _addNode(scene, "vtkMRMLPlotChartNode", CHART_NAME, "chart")
    chartNode.SetTitle("Lesion volume over time")
    chartNode.SetXAxisTitle(axisTitle)
    chartNode.SetYAxisTitle("Volume (ml)")
    for series in report.series:
        volumes = [_number(series, index, "volume_ml") for index in range(len(series.measurements))]
        _column(tableNode.GetTable(), series.name, vtk.vtkDoubleArray, volumes)
        plotSeries = _addNode(scene, "vtkMRMLPlotSeriesNode", series.name, "series")
        plotSeries.SetAndObserveTableNodeID(tableNode.GetID())
        plotSeries.SetXColumnName(axisTitle)
        plotSeries.SetYColumnName(series.name)
        _styleAsScatterWithLines(plotSeries)
        plotSeries.SetColor(*colours.get(series.lesion_id, segments.lesionColour(series.lesion_id)))
        chartNode.AddAndObservePlotSeriesNodeID(plotSeries.GetID())
    tableNode.Modified()
    return chartNode


def _styleAsScatterWithLines(plotSeries) -> None:
    """A marker at each scan, joined over time."""
    plotSeries.SetPlotType(plotSeries.PlotTypeScatter)
    plotSeries.SetLineStyle(plotSeries.LineStyleSolid)
    plotSeries.SetMarkerStyle(plotSeries.MarkerStyleCircle)


def diameterLineNodes(scene, report, volumeNodes: list, colours: dict[int, tuple]) -> list:
    """The RECIST long and short axes as markups lines in world RAS, one pair per lesion and scan where found; a
    lymph node's largest short axis (its RECIST diameter) too when it lies on another slice."""
    lines = []
    for series in report.series:
        colour = colours.get(series.lesion_id, segments.lesionColour(series.lesion_id))
        for volumeNode, measurement in zip(volumeNodes, series.measurements):
            if measurement is None or not measurement.found:
                continue
            for axis, segmentLPS in _axes(measurement, series.is_lymph_node):
                name = f"{series.name} {axis} ({volumeNode.GetName()})"
                lines.append(_lineNode(scene, name, segmentLPS, colour, volumeNode))
    return lines


def _axes(measurement, isLymphNode: bool) -> list[tuple[str, tuple]]:
    axes = [("long axis", measurement.long_axis_lps), ("short axis", measurement.short_axis_lps)]
    largest = measurement.largest_short_axis_lps
    if isLymphNode and largest is not None and largest != measurement.short_axis_lps:
        axes.append(("largest short axis", largest))
    return [(axis, segmentLPS) for axis, segmentLPS in axes if segmentLPS is not None]


def _lineNode(scene, name: str, segmentLPS, colour: tuple, volumeNode):
    line = _addNode(scene, "vtkMRMLMarkupsLineNode", name, "diameter")
    line.SetAttribute(VOLUME_ATTRIBUTE, volumeNode.GetID())
    for pointLPS in segmentLPS:
        line.AddControlPoint(*(np.asarray(pointLPS, float) @ LPS_TO_RAS))
    line.SetLocked(True)
    line.CreateDefaultDisplayNodes()
    line.GetDisplayNode().SetSelectedColor(*colour)
    return line
