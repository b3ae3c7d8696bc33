"""Command line: `lesionlocator <subcommand>` plus the official drop-in `LesionLocator_segment/_track`.

Each subcommand lives in its concern's module (`configure_parser(parser)`, `run(args) -> int`) and is imported
only when used, so `lesionlocator models list` does not load torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LesionLocatorError

SUBCOMMANDS = {
    "segment": ("LesionLocatorLib.segment_cli", "segment lesions from point/box/mask prompts"),
    "track": ("LesionLocatorLib.track_cli", "track lesions from a baseline through follow-up scans"),
    "demo": ("LesionLocatorLib.demo", "run segmentation, tracking and the report on the bundled sample case"),
    "report": ("LesionLocatorLib.report.cli", "measurements, RECIST response and an HTML/CSV/JSON report"),
    "models": ("LesionLocatorLib.models.cli", "list, download, locate or clear models"),
    "train": ("LesionLocatorLib.training.cli", "train a LesionLocator-Lite model on synthetic data"),
    "evaluate": ("LesionLocatorLib.training.evaluate", "validate a model (Dice, CPM@25, MED, time per call)"),
    "fit-point-search": ("LesionLocatorLib.training.point_selector",
                         "fit how a model's point search picks among its candidates"),
    "fit-box-refinement": ("LesionLocatorLib.training.box_refiner",
                           "fit the correction of a model's box answers from the image in the box"),
    "fit-point-extent": ("LesionLocatorLib.training.point_extent",
                         "fit the network that predicts a clicked lesion's box for a model's point search"),
}


def _run_module(module_name: str, argv: list[str], prog: str, description: str = "") -> int:
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.configure_parser(parser)
    args = parser.parse_args(argv)
    return _guarded(module.run, args)


def _guarded(function, args) -> int:
    try:
        return int(function(args) or 0)
    except LesionLocatorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:16s} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
        print("usage: lesionlocator <subcommand> [options]\n\nsubcommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module_name, help_text = SUBCOMMANDS[argv[0]]
    return _run_module(module_name, argv[1:], f"lesionlocator {argv[0]}", help_text)


def segment_entry() -> None:
    sys.exit(_run_module("LesionLocatorLib.segment_cli", sys.argv[1:], "LesionLocator_segment"))


def track_entry() -> None:
    sys.exit(_run_module("LesionLocatorLib.track_cli", sys.argv[1:], "LesionLocator_track"))


if __name__ == "__main__":
    sys.exit(main())
