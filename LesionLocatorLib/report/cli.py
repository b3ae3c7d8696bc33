"""`lesionlocator report`: longitudinal report (CSV, JSON, HTML, PNG) from a tracking result."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import LesionLocatorError
from ..measurements import INTENSITY_UNITS
from .build import ReportError, build_report
from .inputs import ReportInputs, load_images_and_masks, load_tracking_result
from .output import write_report


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure every tracked lesion at every timepoint (volume, RECIST diameters, intensities), compute the "
        "RECIST 1.1 target-lesion response and write measurements.csv, response.csv, report.json, report.html "
        "and summary.png."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("tracking", nargs="?", type=Path, help="lesions.json written by `lesionlocator track`")
    source.add_argument("--images", nargs="+", type=Path, help="timepoint images instead, baseline first")
    parser.add_argument(
        "--masks-dir",
        type=Path,
        help="with --images: folder holding <image stem>_lesion_<id>.nii.gz masks (its prompts/ subfolder too)",
    )
    parser.add_argument("--study-dates", nargs="+", help="with --images: one study date per image (shown as given)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the report files")
    parser.add_argument(
        "--lymph-nodes", nargs="+", type=int, default=[], metavar="ID", help="lesion ids that are lymph nodes"
    )
    parser.add_argument(
        "--confirmed-absent",
        nargs="+",
        default=[],
        metavar="ID:TIMEPOINT",
        help="lesions a reader confirmed gone at a timepoint (count 0 mm instead of not evaluable), e.g. 3:2",
    )
    parser.add_argument(
        "--intensity-unit", choices=INTENSITY_UNITS, default="unknown", help="HU for CT, SUV for SUV-scaled PET"
    )
    parser.add_argument("--title", default="Longitudinal lesion report", help="title of the HTML page and figure")
    parser.add_argument("--overwrite", action="store_true", help="replace report files already in the output folder")


def run(args: argparse.Namespace) -> int:
    try:
        inputs = _load_inputs(args)
        inputs.lymph_nodes |= set(args.lymph_nodes)
        for lesion_id, timepoint in _parse_confirmed_absent(args.confirmed_absent):
            inputs.confirmed_absent.setdefault(lesion_id, set()).add(timepoint)
        report = build_report(
            inputs.images,
            inputs.masks,
            timepoint_names=inputs.timepoint_names,
            study_dates=inputs.study_dates,
            lesion_names=inputs.lesion_names,
            lymph_nodes=inputs.lymph_nodes,
            first_timepoints=inputs.first_timepoints,
            confirmed_absent=inputs.confirmed_absent,
            intensity_unit=args.intensity_unit,
            title=args.title,
        )
        paths = write_report(report, args.output, overwrite=args.overwrite)
    except LesionLocatorError as error:
        print(f"lesionlocator report: error: {error}", file=sys.stderr)
        return 1
    for row in report.response.timepoints:
        print(f"{row.timepoint.name}: {row.category} ({row.reason})")
    print(f"Report written to {paths['html']}")
    return 0


def _load_inputs(args: argparse.Namespace) -> ReportInputs:
    if args.tracking is not None:
        if args.masks_dir is not None or args.study_dates is not None:
            raise ReportError("--masks-dir and --study-dates go with --images; the tracking result holds both.")
        return load_tracking_result(args.tracking)
    if args.masks_dir is None:
        raise ReportError("--images needs --masks-dir, the folder holding the <image stem>_lesion_<id>.nii.gz masks.")
    inputs = load_images_and_masks(args.images, args.masks_dir)
    if args.study_dates is not None:
        if len(args.study_dates) != len(args.images):
            raise ReportError(
                f"Give one study date per image: {len(args.study_dates)} dates for {len(args.images)} images."
            )
        inputs.study_dates = list(args.study_dates)
    return inputs


def _parse_confirmed_absent(values: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for value in values:
        lesion, _, timepoint = value.partition(":")
        if not (lesion.isdigit() and timepoint.isdigit()):
            raise ReportError(f"--confirmed-absent takes LESION_ID:TIMEPOINT_INDEX pairs such as 3:2; got '{value}'.")
        pairs.append((int(lesion), int(timepoint)))
    return pairs
