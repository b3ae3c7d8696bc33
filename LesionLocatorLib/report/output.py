"""Write a report's files: CSV and JSON numbers, the HTML page and the PNG summary figure."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .build import Progress, Report, ReportError
from .figures import lesion_plots_png, lesion_slices_png, summary_png
from .html import render_html
from .tables import measurement_rows, report_document, response_rows, write_csv

REPORT_FILES = {
    "measurements_csv": "measurements.csv",
    "response_csv": "response.csv",
    "json": "report.json",
    "html": "report.html",
    "summary_png": "summary.png",
}


def write_report(
    report: Report, out_dir: str | os.PathLike, overwrite: bool = False, progress: Progress | None = None
) -> dict[str, Path]:
    """Write the report's files into `out_dir` (created if needed); returns their paths by kind.

    Refuses, before writing anything, when any of the files exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    existing = [path.name for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ReportError(
            f"{', '.join(existing)} already exist(s) in {out_dir}; choose another output folder "
            "or allow overwriting (--overwrite on the command line, overwrite=True in Python)."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"The output path {out_dir} is a file; give a folder for the report.")
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = _render_figures(report, progress)
    write_csv(measurement_rows(report), paths["measurements_csv"])
    write_csv(response_rows(report), paths["response_csv"])
    paths["json"].write_text(json.dumps(report_document(report), indent=2), encoding="utf-8")
    paths["summary_png"].write_bytes(figures["summary"])
    paths["html"].write_text(render_html(report, figures), encoding="utf-8")
    if progress is not None:
        progress(1.0, "Report written")
    return paths


def _render_figures(report: Report, progress: Progress | None) -> dict[str, bytes]:
    figures = {"summary": summary_png(report)}
    for number, series in enumerate(report.series):
        if progress is not None:
            progress(number / len(report.series), f"Drawing {series.name}")
        figures[f"slices_{series.lesion_id}"] = lesion_slices_png(report, series.lesion_id)
        figures[f"plots_{series.lesion_id}"] = lesion_plots_png(report, series.lesion_id)
    return figures
