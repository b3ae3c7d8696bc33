"""The report's numbers as rows (CSV) and as one JSON document."""
from __future__ import annotations

import csv
from pathlib import Path

from ..response import CATEGORY_NAMES, Change, LesionChange, TimepointResponse
from .build import Report

REPORT_FORMAT = "lesionlocator-report/1"
_DECIMALS = 4


def measurement_rows(report: Report) -> list[dict]:
    """One row per lesion and timepoint: measurements and changes (empty cells where undefined)."""
    rows = []
    for series in report.series:
        for change in report.response.lesion_changes(series.lesion_id):
            info = report.timepoints[change.timepoint]
            measurement = series.measurements[change.timepoint]
            found = measurement is not None and measurement.found
            row = {
                "lesion_id": series.lesion_id,
                "lesion_name": series.name,
                "role": report.role(series.lesion_id),
                "lymph_node": series.is_lymph_node,
                "timepoint": info.index,
                "timepoint_name": info.name,
                "study_date": info.study_date,
                "status": change.status,
                "volume_ml": change.volume_ml.value,
                "recist_diameter_mm": change.diameter_mm.value,
                "long_axis_mm": measurement.long_axis_mm if found else None,
                "short_axis_mm": measurement.short_axis_mm if found else None,
                "largest_short_axis_mm": measurement.largest_short_axis_mm if found else None,
                "parts_long_axis_sum_mm": measurement.parts_long_axis_sum_mm if found else None,
                "max_diameter_3d_mm": measurement.max_diameter_3d_mm if found else None,
                "axial_plane_z_lps": measurement.axial_plane_z_lps if found else None,
                **_xyz("centroid_lps", measurement.centroid_lps if found else None),
                **_xyz("centroid_ras", measurement.centroid_ras if found else None),
                "intensity_mean": measurement.intensity_mean if found else None,
                "intensity_min": measurement.intensity_min if found else None,
                "intensity_max": measurement.intensity_max if found else None,
                "intensity_unit": report.intensity_unit,
                "n_components": measurement.n_components if found else None,
                "voxel_count": measurement.voxel_count if found else None,
                **_change_columns("volume", "ml", change.volume_ml),
                **_change_columns("diameter", "mm", change.diameter_mm),
            }
            rows.append(_rounded(row))
    return rows


def response_rows(report: Report) -> list[dict]:
    """One row per timepoint: sum of target diameters, its changes and the RECIST category."""
    return [_rounded(_response_row(row)) for row in report.response.timepoints]


def report_document(report: Report) -> dict:
    """All numbers of the report as one JSON-ready dict."""
    return _rounded(
        {
            "format": REPORT_FORMAT,
            "title": report.title,
            "created_utc": report.created_utc,
            "engine_version": report.engine_version,
            "intensity_unit": report.intensity_unit,
            "timepoints": [vars(info) for info in report.timepoints],
            "target_ids": list(report.response.target_ids),
            "non_target_ids": list(report.response.non_target_ids),
            "new_lesion_ids": list(report.response.new_lesion_ids),
            "excluded_ids": list(report.response.excluded_ids),
            "notes": report.response.notes,
            "response": [_response_row(row) for row in report.response.timepoints],
            "lesions": [_lesion_document(report, series.lesion_id) for series in report.series],
        }
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _lesion_document(report: Report, lesion_id: int) -> dict:
    series = report.lesion(lesion_id)
    return {
        "lesion_id": lesion_id,
        "name": series.name,
        "role": report.role(lesion_id),
        "is_lymph_node": series.is_lymph_node,
        "first_timepoint": series.first_timepoint,
        "confirmed_absent": sorted(series.confirmed_absent),
        "timepoints": [
            _lesion_timepoint(series.measurements[c.timepoint], c) for c in report.response.lesion_changes(lesion_id)
        ],
    }


def _lesion_timepoint(measurement, change: LesionChange) -> dict:
    return {
        "timepoint": change.timepoint,
        "status": change.status,
        "measurement": None if measurement is None else measurement.to_dict(),
        "volume_ml": vars(change.volume_ml),
        "recist_diameter_mm": vars(change.diameter_mm),
    }


def _response_row(row: TimepointResponse) -> dict:
    return {
        "timepoint": row.timepoint.index,
        "timepoint_name": row.timepoint.name,
        "study_date": row.timepoint.study_date,
        "category": row.category,
        "category_name": CATEGORY_NAMES[row.category],
        "sum_diameters_mm": row.sum_diameters.value,
        "sum_is_complete": row.sum_is_complete,
        "baseline_sum_mm": row.sum_diameters.baseline,
        "nadir_sum_mm": row.sum_diameters.nadir,
        **_change_columns("sum", "mm", row.sum_diameters, with_references=False),
        "new_lesion_ids": " ".join(map(str, row.new_lesion_ids)),
        "missing_target_ids": " ".join(map(str, row.missing_target_ids)),
        "reason": row.reason,
    }


def _change_columns(prefix: str, unit: str, change: Change, with_references: bool = True) -> dict:
    columns = {
        f"{prefix}_change_from_baseline_{unit}": change.change_from_baseline,
        f"{prefix}_change_from_baseline_pct": change.change_from_baseline_pct,
        f"{prefix}_change_from_nadir_{unit}": change.change_from_nadir,
        f"{prefix}_change_from_nadir_pct": change.change_from_nadir_pct,
    }
    if with_references:
        columns = {f"{prefix}_baseline_{unit}": change.baseline, f"{prefix}_nadir_{unit}": change.nadir, **columns}
    return columns


def _xyz(prefix: str, point) -> dict:
    return {f"{prefix}_{axis}": None if point is None else point[i] for i, axis in enumerate("xyz")}


def _rounded(value):
    """Floats rounded for readable files (0.1 µm / 0.1 µL resolution is far below any voxel)."""
    if isinstance(value, float):
        return round(value, _DECIMALS)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(item) for item in value]
    return value
