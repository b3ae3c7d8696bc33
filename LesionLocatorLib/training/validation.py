"""Validation of a model on held-out synthetic cases, through the engine's own Segmenter and Tracker.

Dice is computed per lesion on the original grid of the scan, between the engine's output mask and the exact
synthetic ground truth. Reusable by `lesionlocator evaluate`: build cases with
`synthetic.make_validation_set(seed, backgrounds)` and pass them here.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..prompts import BoxPrompt, PointPrompt
from ..synthetic.cases import ValidationCase
from ..synthetic.followup import PRESENT

if TYPE_CHECKING:  # the Segmenter imports torch
    from ..segmentation import Segmenter

SIZE_BINS_MM = (0.0, 10.0, 20.0, 40.0, np.inf)
BOOTSTRAP_RESAMPLES = 2000
Progress = Callable[[float, str], None]


@dataclass
class LesionScore:
    case: str
    lesion_id: int
    prompt: str  # point, box or track
    dice: float
    diameter_mm: float
    site: str
    shape: str
    seconds: float  # engine time per lesion (a whole call divided by its lesions)
    ceiling_dice: float | None = None  # what a perfect network could reach at the model's spacing


def dice_score(prediction: np.ndarray | None, truth: np.ndarray) -> float:
    truth = np.asarray(truth, bool)
    prediction = np.zeros_like(truth) if prediction is None else np.asarray(prediction, bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def spacing_ceiling_dice(mask_zyx: np.ndarray, spacing_zyx, preprocessor, margin_voxels: int = 4) -> float:
    """The Dice of a perfect network at the model's spacing: the exact mask resampled onto the model's grid as
    training targets are (the plans' label resampling), then hard logits resampled back as inference resamples
    them. Lesions a few voxels of that grid across lose their shape on the way, whatever the network. The grid is
    that of a crop around the lesion, not the whole image's, so for such lesions the value is an estimate."""
    truth = np.asarray(mask_zyx, bool)
    coords = np.argwhere(truth)
    if coords.size == 0:
        raise ValueError("The lesion mask is empty; a ceiling needs a lesion.")
    lo = np.maximum(coords.min(axis=0) - margin_voxels, 0)
    hi = np.minimum(coords.max(axis=0) + margin_voxels + 1, truth.shape)
    crop = truth[tuple(slice(a, b) for a, b in zip(lo, hi))]
    grid_shape = preprocessor.resampled_shape(crop.shape, spacing_zyx)
    on_grid = preprocessor.resample_segmentation(crop.astype(np.uint8), spacing_zyx, grid_shape) > 0
    hard_logits = np.where(on_grid, 10.0, -10.0).astype(np.float32)[None]
    back = preprocessor.resample_logits(hard_logits, crop.shape, spacing_zyx)
    return dice_score(back[0] > 0, crop)


def _prompts(case: ValidationCase, kind: str) -> dict:
    if kind == "point":
        return {k: PointPrompt(tuple(float(v) for v in p)) for k, p in case.points_zyx.items()}
    if kind == "box":
        return {k: BoxPrompt(tuple(map(float, lo)), tuple(map(float, hi))) for k, (lo, hi) in case.boxes_zyx.items()}
    raise ValueError(f"Unknown prompt kind '{kind}'; use 'point' or 'box'.")


def evaluate_segmentation(model_root: str | Path, cases: Sequence[ValidationCase], prompt_kinds=("point", "box"),
                          device: str = "cpu", mode: str = "roi", progress: Progress | None = None,
                          **segmenter_options) -> list[LesionScore]:
    """Dice per lesion and prompt kind with the engine's Segmenter (preset 'fast': one fold, no TTA; as the model
    asks, unless `segmenter_options` turn its point search, point extent, box refinement or fine grid off)."""
    from ..segmentation import Segmenter

    segmenter = Segmenter(model_root, device=device, preset="fast", mode=mode, **segmenter_options)
    return score_segmentation(segmenter, cases, prompt_kinds, progress)


def score_segmentation(segmenter: Segmenter, cases: Sequence[ValidationCase], prompt_kinds=("point", "box"),
                       progress: Progress | None = None) -> list[LesionScore]:
    """Dice per lesion and prompt kind with `segmenter`, as it is configured."""
    scores = []
    for number, validation_case in enumerate(cases):
        case = validation_case.case
        for kind in prompt_kinds:
            if progress is not None:
                progress(number / max(len(cases), 1), f"{case.name}: {kind}")
            prompts = _prompts(validation_case, kind)
            started = time.perf_counter()
            result = segmenter.segment(case.image, prompts)
            seconds = (time.perf_counter() - started) / max(len(prompts), 1)
            preprocessor = segmenter.model_for(kind).preprocessor
            for lesion in case.lesions:
                truth = case.lesion_mask(lesion.lesion_id)
                score = dice_score(result.masks.get(lesion.lesion_id), truth)
                ceiling = spacing_ceiling_dice(truth, case.image.spacing_zyx, preprocessor)
                scores.append(LesionScore(case.name, lesion.lesion_id, kind, score, lesion.diameter_mm, lesion.site,
                                          lesion.shape_kind, seconds, ceiling))
    return scores


def evaluate_tracking(model_root: str | Path, cases: Sequence[ValidationCase], device: str = "cpu",
                      registration: str = "classical", progress: Progress | None = None) -> list[LesionScore]:
    """Dice per lesion present in both scans: baseline ground-truth masks tracked into the synthetic follow-up by
    the engine's Tracker (registration + the model's track network)."""
    from ..tracking import Tracker

    tracker = Tracker(model_root, device=device, registration=registration)
    scores = []
    for number, validation_case in enumerate(cases):
        follow_up = validation_case.follow_up
        if follow_up is None:
            continue
        case = validation_case.case
        if progress is not None:
            progress(number / max(len(cases), 1), f"{case.name}: track")
        present = [lesion for lesion in case.lesions if follow_up.lesion(lesion.lesion_id).status == PRESENT]
        masks = {lesion.lesion_id: case.lesion_mask(lesion.lesion_id) for lesion in present}
        if not masks:
            continue
        started = time.perf_counter()
        records = tracker.track_step(case.image, follow_up.image, masks)
        seconds = (time.perf_counter() - started) / len(masks)
        tracker.clear_cache()
        for lesion in present:
            record = records[lesion.lesion_id]
            score = dice_score(record.mask if record.found else None, follow_up.lesion_mask(lesion.lesion_id))
            scores.append(LesionScore(case.name, lesion.lesion_id, "track", score, lesion.diameter_mm, lesion.site,
                                      lesion.shape_kind, seconds))
    return scores


def mean_ci95(values: Sequence[float], seed: int = 0) -> list[float]:
    """Bootstrap 95 % interval of the mean (percentile method): validation sets are small, and a difference
    between two models inside this interval is noise."""
    values = np.asarray(values, float)
    resamples = np.random.default_rng(seed).choice(values, size=(BOOTSTRAP_RESAMPLES, len(values)), replace=True)
    return [round(float(v), 4) for v in np.percentile(resamples.mean(axis=1), [2.5, 97.5])]


def size_bins() -> list[tuple[str, float, float]]:
    """(label, lowest mm, mm it stays under) of each lesion diameter bin of the summaries."""
    return [(f"{lo:.0f}-{hi:.0f}mm" if np.isfinite(hi) else f">={lo:.0f}mm", lo, hi)
            for lo, hi in zip(SIZE_BINS_MM[:-1], SIZE_BINS_MM[1:])]


def summarize(scores: Sequence[LesionScore]) -> dict:
    """Per prompt kind: lesions, mean Dice with its bootstrap 95 % interval, median Dice, share with Dice >= 0.5,
    mean seconds, mean Dice per size bin, and (where known) the mean spacing ceiling overall and per bin."""
    summary = {}
    for kind in sorted({s.prompt for s in scores}):
        chosen = [s for s in scores if s.prompt == kind]
        dice = np.array([s.dice for s in chosen])
        diameters = np.array([s.diameter_mm for s in chosen])
        ceilings = None if any(s.ceiling_dice is None for s in chosen) else np.array([s.ceiling_dice for s in chosen])
        bins = {}
        for label, lo, hi in size_bins():
            inside = (diameters >= lo) & (diameters < hi)
            if np.any(inside):
                bins[label] = {"lesions": int(inside.sum()), "mean_dice": round(float(dice[inside].mean()), 4)}
                if ceilings is not None:
                    bins[label]["spacing_ceiling"] = round(float(ceilings[inside].mean()), 4)
        summary[kind] = {
            "lesions": len(chosen),
            "mean_dice": round(float(dice.mean()), 4),
            "mean_dice_ci95": mean_ci95(dice),
            "median_dice": round(float(np.median(dice)), 4),
            "dice_at_least_0.5": round(float(np.mean(dice >= 0.5)), 4),
            "mean_seconds_per_lesion": round(float(np.mean([s.seconds for s in chosen])), 3),
            "by_diameter": bins,
        }
        if ceilings is not None:
            summary[kind]["spacing_ceiling"] = round(float(ceilings.mean()), 4)
    return summary


def summary_table(summary: dict) -> str:
    """`summarize`'s result as a table for the terminal: one row per prompt kind, mean Dice per size bin (lesions in
    parentheses; '-' where a bin is empty), the spacing ceiling where known."""
    bins = [label for label, _, _ in size_bins()]
    header = ["prompt", "lesions", "mean Dice [95 % CI]", "median", "Dice>=0.5", *bins, "ceiling", "s/lesion"]
    rows = [header]
    for kind, row in summary.items():
        low, high = row["mean_dice_ci95"]
        by_size = [f"{row['by_diameter'][b]['mean_dice']:.2f} ({row['by_diameter'][b]['lesions']})"
                   if b in row["by_diameter"] else "-" for b in bins]
        ceiling = f"{row['spacing_ceiling']:.3f}" if "spacing_ceiling" in row else "-"
        rows.append([kind, str(row["lesions"]), f"{row['mean_dice']:.3f} [{low:.3f}, {high:.3f}]",
                     f"{row['median_dice']:.3f}", f"{100 * row['dice_at_least_0.5']:.0f} %", *by_size, ceiling,
                     f"{row['mean_seconds_per_lesion']:.2f}"])
    if len(rows) == 1:
        return "no lesions scored"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(r, widths))).rstrip() for r in rows)


def scores_as_dicts(scores: Sequence[LesionScore]) -> list[dict]:
    return [{**asdict(s), "dice": round(s.dice, 4), "diameter_mm": round(s.diameter_mm, 2),
             "seconds": round(s.seconds, 3),
             "ceiling_dice": None if s.ceiling_dice is None else round(s.ceiling_dice, 4)} for s in scores]
