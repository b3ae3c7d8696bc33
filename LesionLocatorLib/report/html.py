"""A self-contained HTML page (inline CSS, images as base64 PNG) showing the whole report."""
from __future__ import annotations

import base64
from html import escape

from ..response import CATEGORY_NAMES, Change
from .build import Report
from .figures import CATEGORY_COLOURS, CONTOUR_COLOUR, LONG_AXIS_COLOUR, SHORT_AXIS_COLOUR

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #111827;
       background: #f3f4f6; margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 24px; }
header { background: #1f2937; color: #f9fafb; padding: 18px 24px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; color: #d1d5db; font-size: 13px; }
section { background: white; border-radius: 8px; padding: 16px 20px; margin-bottom: 20px;
          box-shadow: 0 1px 2px rgba(0,0,0,0.08); }
h2 { font-size: 17px; margin: 0 0 12px 0; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 8px; }
th, td { border-bottom: 1px solid #e5e7eb; padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: #f9fafb; font-weight: 600; }
td.text, th.text { text-align: left; white-space: normal; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 10px; color: white; font-weight: 600; }
.muted { color: #6b7280; font-size: 12px; }
.legend span { display: inline-block; width: 14px; height: 4px; margin: 0 4px 2px 12px; vertical-align: middle; }
img { display: block; margin: 8px 0; max-width: 100%; }
"""


def render_html(report: Report, figures: dict[str, bytes]) -> str:
    """The page; `figures` holds 'summary' and 'slices_<id>' / 'plots_<id>' PNG bytes per lesion."""
    lesion_sections = "".join(_lesion_section(report, s.lesion_id, figures) for s in report.series)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(report.title)}</title><style>{_STYLE}</style></head>
<body>
<header><h1>{escape(report.title)}</h1>
<p>{len(report.timepoints)} timepoints · {len(report.series)} lesions · created {escape(report.created_utc)}
 · LesionLocator for 3D Slicer {escape(report.engine_version)} · research use only, not for diagnosis</p></header>
<main>
{_response_section(report)}
<section><h2>Summary</h2>{_img(figures["summary"], "Summary of the response and all lesions over time")}</section>
{lesion_sections}
{_methods_section(report)}
</main></body></html>
"""


def _response_section(report: Report) -> str:
    header = _row(
        ["Timepoint", "Study date", "Sum of diameters (mm)", "vs baseline", "vs nadir", "Response", "Details"],
        cell="th",
        text_columns={0, 1, 5, 6},
    )
    rows = []
    for row in report.response.timepoints:
        total = _number(row.sum_diameters.value, 1) + ("" if row.sum_is_complete else " (partial)")
        rows.append(
            _row(
                [
                    escape(row.timepoint.name),
                    escape(str(row.timepoint.study_date or "–")),
                    total,
                    _change(row.sum_diameters, "baseline", "mm"),
                    _change(row.sum_diameters, "nadir", "mm"),
                    _badge(row.category),
                    escape(row.reason),
                ],
                text_columns={0, 1, 5, 6},
            )
        )
    notes = "".join(f"<p class='muted'>{escape(note)}</p>" for note in report.response.notes)
    targets, non_targets = (
        ", ".join(report.lesion(i).name for i in ids) or "none"
        for ids in (report.response.target_ids, report.response.non_target_ids)
    )
    return (
        "<section><h2>RECIST 1.1 response</h2>"
        f"<p class='muted'>Target lesions: {escape(targets)}. Non-target lesions: {escape(non_targets)}. "
        "Lymph nodes count with their largest short axis. Changes of a partial sum (a target not measured) are not "
        "shown.</p>"
        f"<table>{header}{''.join(rows)}</table>{notes}</section>"
    )


def _lesion_section(report: Report, lesion_id: int, figures: dict[str, bytes]) -> str:
    series = report.lesion(lesion_id)
    kind = "lymph node" if series.is_lymph_node else "non-nodal lesion"
    legend = (
        "<p class='legend muted'>"
        f"<span style='background:{CONTOUR_COLOUR}'></span>segmentation contour"
        f"<span style='background:{LONG_AXIS_COLOUR}'></span>long axis"
        f"<span style='background:{SHORT_AXIS_COLOUR}'></span>short axis"
        " — axial slice with the longest diameter (a lymph node: with its largest short axis), radiological view "
        "(patient's right on the left)</p>"
    )
    return (
        f"<section id='lesion-{lesion_id}'><h2>{escape(series.name)} "
        f"<span class='muted'>(id {lesion_id}, {report.role(lesion_id)}, {kind})</span></h2>"
        f"{_img(figures[f'slices_{lesion_id}'], f'Axial slices through {series.name}')}{legend}"
        f"{_img(figures[f'plots_{lesion_id}'], f'Volume and diameters of {series.name} over time')}"
        f"{_measurement_table(report, lesion_id)}</section>"
    )


def _measurement_table(report: Report, lesion_id: int) -> str:
    series = report.lesion(lesion_id)
    unit = report.intensity_unit if report.intensity_unit != "unknown" else "a.u."
    header = _row(
        ["Timepoint", "Status", "Volume (mL)", "vs baseline", "Long axis (mm)", "Short axis (mm)",
         "RECIST (mm)", "vs baseline", "vs nadir", "Max 3D (mm)", f"Mean ({unit})", "Min / max", "Parts"],
        cell="th",
        text_columns={0, 1},
    )
    rows = []
    for change in report.response.lesion_changes(lesion_id):
        m = series.measurements[change.timepoint]
        found = m is not None and m.found
        rows.append(
            _row(
                [
                    escape(report.timepoints[change.timepoint].name),
                    escape(change.status),
                    _number(change.volume_ml.value, 2),
                    _change(change.volume_ml, "baseline", "mL", decimals=2),
                    _number(m.long_axis_mm if found else None, 1),
                    _number(m.short_axis_mm if found else None, 1),
                    _number(change.diameter_mm.value, 1),
                    _change(change.diameter_mm, "baseline", "mm"),
                    _change(change.diameter_mm, "nadir", "mm"),
                    _number(m.max_diameter_3d_mm if found else None, 1),
                    _number(m.intensity_mean if found else None, 1),
                    f"{_number(m.intensity_min, 0)} / {_number(m.intensity_max, 0)}" if found else "–",
                    str(m.n_components) if found else "–",
                ],
                text_columns={0, 1},
            )
        )
    return f"<table>{header}{''.join(rows)}</table>"


def _methods_section(report: Report) -> str:
    return (
        "<section><h2>Methods</h2><p class='muted'>"
        "Volume: voxel count × voxel volume. Diameters are measured on the marching-cubes surface of each mask in "
        "physical space (accurate to within one voxel): the long axis is the longest diameter over the patient's "
        "axial planes (LPS z = const) through the lesion, the short axis the longest chord perpendicular to it in "
        "that plane, both on the cross-section's convex hull; the largest short axis is the longest such chord on "
        "any axial plane. RECIST 1.1: a lesion's diameter is its long axis (the long axes of its parts added when "
        "it broke into parts), a lymph node's its largest short axis. At baseline, lesions of at least 10 mm and "
        "nodes of at least 15 mm are measurable; the five largest are the target lesions (organs are not known, so "
        "the limit of two per organ is not applied), the others non-target lesions; nodes under 10 mm are normal "
        "and not followed. The sum of target diameters gives PR at ≤ −30 % from baseline, PD at ≥ +20 % and ≥ 5 mm "
        "from the nadir (the smallest earlier complete sum); any new lesion not confirmed absent, or a lesion "
        "coming back after a complete response, is PD. CR needs every lesion gone and every node under 10 mm; "
        "targets gone with non-target lesions left give PR; NE when a target was not measured and no progression "
        "is proven; with non-target lesions only, Non-CR/non-PD while one is present. Unequivocal progression of "
        "non-target lesions is a reader's judgement and is not assessed. "
        f"Intensities in {escape(report.intensity_unit)} units.</p></section>"
    )


def _row(cells: list[str], cell: str = "td", text_columns: set[int] = frozenset()) -> str:
    return "<tr>" + "".join(
        f"<{cell}{' class=text' if i in text_columns else ''}>{value}</{cell}>" for i, value in enumerate(cells)
    ) + "</tr>"


def _badge(category: str) -> str:
    return (
        f"<span class='badge' style='background:{CATEGORY_COLOURS[category]}' "
        f"title='{escape(CATEGORY_NAMES[category])}'>{category}</span> {escape(CATEGORY_NAMES[category])}"
    )


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def _change(change: Change, reference: str, unit: str, decimals: int = 1) -> str:
    absolute = getattr(change, f"change_from_{reference}")
    percent = getattr(change, f"change_from_{reference}_pct")
    if absolute is None:
        return "–"
    text = f"{absolute:+.{decimals}f} {unit}"
    return text if percent is None else f"{text} ({percent:+.0f} %)"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{data}'>"
