"""`lesionlocator evaluate`: validate a model through the engine's Segmenter and Tracker.

- Segmentation: Dice per lesion for point and box prompts on a held-out synthetic set (background scans and seed
  that training never uses).
- Tracking: each baseline lesion tracked into its synthetic follow-up; Dice per follow-up, CPM@25 (share of lesions
  whose predicted centre lies within 25 mm of the true centre; a lesion not found counts as missed) and MED (mean
  distance of predicted to true centres in mm, over the lesions found).
- Real data: the open_ms longitudinal MR pairs; each lesion of the expert mask (common space, mapped into the raw
  study-2 scan with the shipped transform) is segmented from a point in its core.
- Your own annotated CTs (`--own-data`, an nnU-Net raw dataset, its test split by default): each lesion is
  segmented from a point at its deepest voxel and from its bounding box.
- Time per call for all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from ..errors import LesionLocatorError, require_at_least
from ..image import ImageVolume, read_image
from ..prompts import PointPrompt
from .validation import (
    LesionScore, dice_score, mean_ci95, score_segmentation, scores_as_dicts, spacing_ceiling_dice, summarize,
    summary_table,
)

if TYPE_CHECKING:  # the Segmenter imports torch
    from ..segmentation import Segmenter

CPM_RADIUS_MM = 25.0
OPEN_MS_PATIENTS = ("01", "03", "12", "19")


@dataclass
class TrackScore:
    case: str
    lesion_id: int
    found: bool
    dice: float
    centre_distance_mm: float | None
    seconds: float


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default=None, help="model root or name (default: bundled LesionLocator-Lite)")
    parser.add_argument("--seed", type=int, default=20261126, help="seed of the held-out synthetic set")
    parser.add_argument("--backgrounds", nargs="+", default=None, help="background names (default: validation set)")
    parser.add_argument("--cases-per-background", type=int, default=2)
    parser.add_argument("--lesions-per-case", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=("segmentation", "tracking", "open_ms"))
    parser.add_argument("--registration", default="auto", choices=("auto", "gradicon", "classical"))
    parser.add_argument("--own-data", type=Path, metavar="DATASET",
                        help="also score your annotated CTs (nnU-Net raw dataset, see `lesionlocator train --own-data`)")
    parser.add_argument("--own-data-split", default="Ts", choices=("Ts", "Tr"),
                        help="imagesTs/labelsTs (held out, default) or imagesTr/labelsTr")
    parser.add_argument("--disable-point-search", action="store_true",
                        help="score points with the point network alone, even where the model asks for a point search")
    parser.add_argument("--disable-point-extent", action="store_true",
                        help="answer every click by the point search's cubes, even where the model holds an extent "
                             "network")
    parser.add_argument("--disable-box-fine-grid", action="store_true",
                        help="score boxes on the box network's planned grid, even where the model asks for a finer "
                             "one for small boxes")
    parser.add_argument("--disable-box-refinement", action="store_true",
                        help="score boxes with the box network alone, even where the model holds a box refinement")
    parser.add_argument("-device", "--device", default="cpu")
    parser.add_argument("-o", "--output", default=None, help="write all numbers as JSON here")


def centre_lps(image: ImageVolume, mask: np.ndarray) -> np.ndarray:
    return image.index_zyx_to_lps(np.asarray(ndimage.center_of_mass(mask)))


def evaluate_tracking_centres(model_root, cases, device: str, registration: str) -> list[TrackScore]:
    """Baseline truth masks tracked into the follow-up: Dice and distance between predicted and true centres."""
    from ..synthetic.followup import PRESENT
    from ..tracking import Tracker

    tracker = Tracker(model_root, device=device, preset="fast", registration=registration)
    scores = []
    for validation_case in cases:
        case, follow_up = validation_case.case, validation_case.follow_up
        present = [l for l in case.lesions if follow_up.lesion(l.lesion_id).status == PRESENT
                   and np.any(follow_up.lesion_mask(l.lesion_id))]
        if not present:
            continue
        started = time.perf_counter()
        records = tracker.track_step(case.image, follow_up.image, {l.lesion_id: case.lesion_mask(l.lesion_id) for l in present})
        seconds = time.perf_counter() - started
        tracker.clear_cache()
        for lesion in present:
            truth = follow_up.lesion_mask(lesion.lesion_id)
            record = records[lesion.lesion_id]
            distance = (float(np.linalg.norm(np.asarray(record.centre_lps) - centre_lps(follow_up.image, truth)))
                        if record.found else None)
            scores.append(TrackScore(case.name, lesion.lesion_id, record.found,
                                     dice_score(record.mask if record.found else None, truth), distance, seconds))
    return scores


def summarize_tracking(scores: list[TrackScore]) -> dict:
    if not scores:
        return {}
    distances = [s.centre_distance_mm for s in scores if s.centre_distance_mm is not None]
    within = [s for s in scores if s.centre_distance_mm is not None and s.centre_distance_mm <= CPM_RADIUS_MM]
    return {"lesions": len(scores), "found": sum(s.found for s in scores),
            "mean_dice": round(float(np.mean([s.dice for s in scores])), 4),
            "mean_dice_ci95": mean_ci95([s.dice for s in scores]),
            f"CPM@{CPM_RADIUS_MM:.0f}": round(len(within) / len(scores), 4),
            "MED_mm": round(float(np.mean(distances)), 2) if distances else None,
            "mean_seconds_per_step": round(float(np.mean([s.seconds for s in scores])), 2)}


def tracking_line(summary: dict) -> str:
    """`summarize_tracking`'s result in one line for the terminal."""
    if not summary:
        return "no lesion was tracked (no follow-up holds a lesion of its baseline)"
    low, high = summary["mean_dice_ci95"]
    med = "-" if summary["MED_mm"] is None else f"{summary['MED_mm']:.2f} mm"
    cpm = f"CPM@{CPM_RADIUS_MM:.0f}"
    return (f"{summary['found']} of {summary['lesions']} lesions found, mean Dice {summary['mean_dice']:.3f} "
            f"[{low:.3f}, {high:.3f}], {cpm} {summary[cpm]:.3f}, MED {med}, {summary['mean_seconds_per_step']:.2f} s "
            "per step")


def open_ms_lesions(patient_folder: Path) -> tuple[ImageVolume, dict[int, np.ndarray]]:
    """Study-2 FLAIR and the expert lesions (connected components of gt.nii.gz) on its raw grid. The shipped
    transform maps common-space points to raw-study points, so raw -> common is its inverse."""
    import SimpleITK as sitk

    study = read_image(patient_folder / "study2_FLAIR.nii.gz")
    gt = sitk.ReadImage(str(patient_folder / "gt.nii.gz"))
    common_to_raw = sitk.ReadTransform(str(patient_folder / "study2_FLAIR_to_common_space.txt"))
    raw_to_common = common_to_raw.GetInverse()
    on_study = sitk.Resample(gt, study.to_sitk(np.zeros(study.shape_zyx, np.uint8)), raw_to_common,
                             sitk.sitkNearestNeighbor, 0)
    labels, count = ndimage.label(sitk.GetArrayFromImage(on_study) > 0)
    return study, {k: labels == k for k in range(1, count + 1)}


def core_point(mask: np.ndarray) -> tuple[float, float, float]:
    """The voxel deepest inside the lesion: a click a reader would place."""
    depth = ndimage.distance_transform_edt(mask)
    return tuple(float(v) for v in np.unravel_index(int(np.argmax(depth)), mask.shape))


def evaluate_open_ms(segmenter: Segmenter, data_root: Path) -> list[dict]:
    rows = []
    for patient in OPEN_MS_PATIENTS:
        folder = data_root / "open_ms_longitudinal" / "raw" / f"patient{patient}"
        if not (folder / "gt.nii.gz").is_file():
            continue
        study, lesions = open_ms_lesions(folder)
        prompts = {k: PointPrompt(core_point(mask)) for k, mask in lesions.items()}
        started = time.perf_counter()
        result = segmenter.segment(study, prompts)
        seconds = (time.perf_counter() - started) / max(len(prompts), 1)
        for lesion_id, truth in lesions.items():
            rows.append({"patient": patient, "lesion_id": lesion_id, "voxels": int(truth.sum()),
                         "dice": round(dice_score(result.masks.get(lesion_id), truth), 4), "seconds": round(seconds, 3)})
    return rows


def equivalent_diameter_mm(mask: np.ndarray, spacing_zyx) -> float:
    """Diameter of the sphere with the lesion's volume."""
    volume = float(mask.sum()) * float(np.prod(spacing_zyx))
    return (6.0 * volume / np.pi) ** (1.0 / 3.0)


def evaluate_own_data(segmenter: Segmenter, dataset: Path, split: str) -> list[LesionScore]:
    """Dice per lesion of a labelled dataset, from a point at the lesion's deepest voxel and from its bounding box."""
    from ..prompts import BoxPrompt
    from ..synthetic.prompts import bounding_box
    from .own_data import dataset_cases, read_case

    scores = []
    for case, image_path, label_path in dataset_cases(dataset, split):
        image, masks = read_case(image_path, label_path)
        lesions = dict(enumerate(masks, start=1))
        kinds = {"point": {k: PointPrompt(core_point(m)) for k, m in lesions.items()},
                 "box": {k: BoxPrompt(*(tuple(map(float, b)) for b in bounding_box(m))) for k, m in lesions.items()}}
        for kind, prompts in kinds.items():
            started = time.perf_counter()
            result = segmenter.segment(image, prompts)
            seconds = (time.perf_counter() - started) / max(len(prompts), 1)
            preprocessor = segmenter.model_for(kind).preprocessor
            scores.extend(LesionScore(case, k, kind, dice_score(result.masks.get(k), m),
                                      equivalent_diameter_mm(m, image.spacing_zyx), "own", "", seconds,
                                      spacing_ceiling_dice(m, image.spacing_zyx, preprocessor))
                          for k, m in lesions.items())
    return scores


def _check_settings(args: argparse.Namespace) -> None:
    """Mistakes that would otherwise score nothing, or fail only after minutes of scoring."""
    if {"segmentation", "tracking", "open_ms"} <= set(args.skip) and args.own_data is None:
        raise LesionLocatorError("Nothing to evaluate: --skip names segmentation, tracking and open_ms, and no "
                                 "--own-data is given. Skip fewer, or give --own-data.")
    require_at_least(0, {"--seed": args.seed})
    require_at_least(1, {"--cases-per-background": args.cases_per_background,
                         "--lesions-per-case": args.lesions_per_case})


def run(args: argparse.Namespace) -> int:
    from ..segment_cli import resolve_model_root
    from ..segmentation import Segmenter
    from ..synthetic.backgrounds import check_background_name, default_data_root
    from ..synthetic.cases import VALIDATION_BACKGROUNDS, make_validation_set

    _check_settings(args)
    for name in args.backgrounds or ():
        check_background_name(name)
    root = resolve_model_root(args.model)
    # one Segmenter (preset 'fast': one fold, no TTA) answers every prompt and reports what the model asked for
    segmenter = Segmenter(root, device=args.device, preset="fast", point_search=not args.disable_point_search,
                          point_extent=not args.disable_point_extent, box_refinement=not args.disable_box_refinement,
                          box_fine_grid=not args.disable_box_fine_grid)
    search = segmenter.point_search
    results: dict = {"model": str(root), "seed": args.seed,
                     "point_search_box_sizes_mm": list(search.box_sizes_mm) if search else None,
                     "point_search_selector": bool(search and search.selector),
                     "point_extent_min_size_mm": search.extent.min_size_mm if search and search.extent else None,
                     "box_fine_grid": segmenter.fine_grid.manifest_entry() if segmenter.fine_grid else None,
                     "box_refinement": segmenter.box_refiner is not None}
    needs_cases = {"segmentation", "tracking"} - set(args.skip)
    cases = make_validation_set(args.seed, args.backgrounds or VALIDATION_BACKGROUNDS, args.cases_per_background,
                                args.lesions_per_case, with_follow_up="tracking" not in args.skip) if needs_cases else []
    if "segmentation" not in args.skip:
        scores = score_segmentation(segmenter, cases)
        results["segmentation"] = {"summary": summarize(scores), "lesions": scores_as_dicts(scores)}
        print(f"segmentation ({len(cases)} synthetic cases, seed {args.seed}):\n"
              f"{summary_table(results['segmentation']['summary'])}")
    if "tracking" not in args.skip:
        track_scores = evaluate_tracking_centres(root, cases, args.device, args.registration)
        results["tracking"] = {"summary": summarize_tracking(track_scores), "lesions": [asdict(s) for s in track_scores]}
        print("tracking:", tracking_line(results["tracking"]["summary"]))
    if "open_ms" not in args.skip:
        rows = evaluate_open_ms(segmenter, default_data_root())
        results["open_ms"] = {"lesions": rows, "mean_dice": round(float(np.mean([r["dice"] for r in rows])), 4) if rows else None}
        print(f"open_ms (real MR, point in each study-2 lesion): {len(rows)} lesions, mean Dice {results['open_ms']['mean_dice']}"
              if rows else "open_ms: data not found, skipped", file=sys.stdout)
    if args.own_data is not None:
        own_scores = evaluate_own_data(segmenter, args.own_data, args.own_data_split)
        results["own_data"] = {"dataset": str(args.own_data), "split": args.own_data_split,
                               "summary": summarize(own_scores), "lesions": scores_as_dicts(own_scores)}
        print(f"own data ({args.own_data_split}):\n{summary_table(results['own_data']['summary'])}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"every lesion's scores: {args.output}")
    else:
        print("add -o FILE.json to keep every lesion's scores")
    return 0
