"""Write a report's files: CSV and JSON numbers, the HTML page and the PNG summary figure."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ..errors import require_folder_path
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

    Refuses, before writing anything, when any of the files exists and `overwrite` is False. Every file is made in
    memory first and lands through a rename, so a failure leaves no half-written report to block the next run.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    existing = [path.name for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ReportError(
            f"{', '.join(existing)} already exist(s) in {out_dir}; choose another output folder "
            "or allow overwriting (--overwrite on the command line, overwrite=True in Python)."
        )
    require_folder_path(out_dir, "The report folder", ReportError)
    _write_all(_render(report, progress), out_dir, paths)
    if progress is not None:
        progress(1.0, "Report written")
    return paths


def _render(report: Report, progress: Progress | None) -> dict[str, Callable[[Path], object]]:
    """How to write each file by kind, with everything computed now: a failure here leaves no file."""
    figures = _render_figures(report, progress)
    measurements, responses = measurement_rows(report), response_rows(report)
    document = json.dumps(report_document(report), indent=2)
    html = render_html(report, figures)
    return {
        "measurements_csv": lambda path: write_csv(measurements, path),
        "response_csv": lambda path: write_csv(responses, path),
        "json": lambda path: path.write_text(document, encoding="utf-8"),
        "html": lambda path: path.write_text(html, encoding="utf-8"),
        "summary_png": lambda path: path.write_bytes(figures["summary"]),
    }


def _write_all(writers: dict[str, Callable[[Path], object]], out_dir: Path, paths: dict[str, Path]) -> None:
    """Temporary files beside the targets, renamed into place once all are written; none is left behind."""
    temporary = {kind: path.with_name(f".{path.name}.partial") for kind, path in paths.items()}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for kind, write in writers.items():
            write(temporary[kind])
        for kind, path in paths.items():
            os.replace(temporary[kind], path)
    except OSError as error:
        raise ReportError(
            f"Could not write the report into {out_dir} ({error.strerror or error}); free disk space "
            "or choose another output folder."
        ) from error
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)


def _render_figures(report: Report, progress: Progress | None) -> dict[str, bytes]:
    figures = {"summary": summary_png(report)}
    for number, series in enumerate(report.series):
        if progress is not None:
            progress(number / len(report.series), f"Drawing {series.name}")
        figures[f"slices_{series.lesion_id}"] = lesion_slices_png(report, series.lesion_id)
        figures[f"plots_{series.lesion_id}"] = lesion_plots_png(report, series.lesion_id)
    return figures
