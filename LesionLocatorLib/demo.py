"""`lesionlocator demo`: the main job end to end on the bundled sample case with the bundled model.

The sample case is made on the fly by the project's own generator (a procedural body phantom with three synthetic
lesions and two synthetic follow-ups, fixed seed), so it needs no download and no shared data. The demo then runs
what a user runs: `lesionlocator track -t point` (baseline segmented from clicks, lesions tracked through both
follow-ups) and `lesionlocator report`, and prints the volumes with the Dice against the known truth.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .errors import LesionLocatorError, require_folder_path
from .image import read_image, write_volume

SAMPLE_SEED = 7
GROWTH_PER_FOLLOW_UP = ({1: 1.25, 2: 0.8, 3: 1.0}, {1: 1.5, 2: 0.6, 3: 1.1})


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("-m", "--model", default=None, help="model root or name (default: bundled LesionLocator-Lite)")
    parser.add_argument("-device", "--device", default="auto")
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED, help="seed of the sample case")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo output")


def write_sample_case(folder: Path, seed: int) -> tuple[list[Path], Path]:
    """Baseline + two follow-ups with known lesions; returns the image paths and the point-prompt JSON."""
    from .synthetic.backgrounds import load_background
    from .synthetic.cases import make_case
    from .synthetic.followup import FollowUpOptions, make_follow_up

    rng = np.random.default_rng(seed)
    case = make_case(load_background(f"body_phantom:{seed}"), rng, lesion_count=3, diameter_range_mm=(15.0, 35.0),
                     sites=("liver", "lung", "soft_tissue"), name="baseline")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "baseline.nii.gz"]
    write_volume(case.image.array.astype(np.int16), case.image, paths[0])
    write_volume(case.instance_map.astype(np.uint16), case.image, folder / "baseline_truth.nii.gz")
    options = FollowUpOptions(new_lesion_range=(0, 0), disappear_probability=0.0, slice_spacing_choices_mm=())
    for number, growth in enumerate(GROWTH_PER_FOLLOW_UP, start=1):
        growth = {k: v for k, v in growth.items() if any(lesion.lesion_id == k for lesion in case.lesions)}
        follow_up = make_follow_up(case, rng, options, growth_factors=growth)
        paths.append(folder / f"followup{number}.nii.gz")
        write_volume(follow_up.image.array.astype(np.int16), follow_up.image, paths[-1])
        write_volume(follow_up.instance_map.astype(np.uint16), follow_up.image, folder / f"followup{number}_truth.nii.gz")
    points = {}
    for lesion in case.lesions:
        centre = np.round(case.image.lps_to_index_zyx(lesion.center_lps)).astype(int)
        points[str(lesion.lesion_id)] = {"point": [int(v) for v in centre]}
    prompt_path = folder / "baseline_points.json"
    prompt_path.write_text(json.dumps(points, indent=1))
    return paths, prompt_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def print_summary(output: Path, sample: Path) -> None:
    tracking = json.loads((output / "tracking" / "lesions.json").read_text())
    names = [t["name"] for t in tracking["timepoints"]]
    truths = [read_image(sample / f"{name}_truth.nii.gz").array for name in names]
    print("\nlesion  timepoint   found  volume (mL)  Dice vs truth")
    for lesion_id, lesion in tracking["lesions"].items():
        for entry in lesion["timepoints"]:
            t = entry["timepoint"]
            mask = read_image(output / "tracking" / entry["mask"]).array > 0 if entry["mask"] else None
            score = dice(mask, truths[t] == int(lesion_id)) if mask is not None else 0.0
            print(f"{lesion_id:>6}  {names[t]:>10}  {str(entry['found']):>6}  {entry['volume_ml']:11.2f}  {score:13.3f}")
    print(f"\nreport: {output / 'report' / 'report.html'}")


def _make_output_folder(output: Path) -> None:
    """Made before minutes of work; a file at or on the path is a clear error, never replaced."""
    require_folder_path(output, "-o")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a part of the path is a file, or no permission
        raise LesionLocatorError(f"Cannot make the output folder {output} ({error.strerror}); give -o a folder "
                                 "you can write to, with no file on its path.") from error


def run(args: argparse.Namespace) -> int:
    from .report import cli as report_cli
    from . import track_cli

    output = Path(args.output)
    _make_output_folder(output)
    if any(output.iterdir()) and not args.overwrite:
        raise LesionLocatorError(f"{output} already holds files; nothing was overwritten. Use --overwrite or another -o.")
    sample = output / "sample"
    print(f"making the sample case in {sample} ...")
    paths, prompts = write_sample_case(sample, args.seed)
    track_parser = argparse.ArgumentParser()
    track_cli.configure_parser(track_parser)
    track_args = ["-bl", str(paths[0]), "-fu", *map(str, paths[1:]), "-p", str(prompts), "-t", "point",
                  "-o", str(output / "tracking"), "-device", args.device, "--preset", "fast"]
    track_args += (["-m", args.model] if args.model else []) + (["--overwrite"] if args.overwrite else [])
    status = track_cli.run(track_parser.parse_args(track_args))
    report_parser = argparse.ArgumentParser()
    report_cli.configure_parser(report_parser)
    report_args = [str(output / "tracking" / "lesions.json"), "-o", str(output / "report"), "--intensity-unit", "HU"]
    status = max(status, report_cli.run(report_parser.parse_args(report_args + (["--overwrite"] if args.overwrite else []))))
    print_summary(output, sample)
    return status
