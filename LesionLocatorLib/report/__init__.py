"""Longitudinal lesion report: measurements, RECIST 1.1 response, CSV/JSON/HTML/PNG output."""
from .build import Report, ReportError, build_report
from .output import REPORT_FILES, write_report

__all__ = ["REPORT_FILES", "Report", "ReportError", "build_report", "write_report"]
