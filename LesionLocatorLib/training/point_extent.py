"""`lesionlocator fit-point-extent`: fit a model's point extent network (see point_extent.py) on synthetic clicks of
training backgrounds (plus your annotated lesions), then the predicted box size above which a click is answered by
the predicted box instead of the point search's cubes, chosen on clicks of other synthetic cases.

The network and its threshold go into the model root (`point_extent.pth`, the point search's 'extent' entry); a
replaced manifest is kept as `lesionlocator_model.previous.json` and a replaced weights file as
`point_extent.previous.pth`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import LesionLocatorError, require_at_least, require_positive
from ..image import ImageVolume
from ..point_extent import (DEFAULT_CHANNELS, DEFAULT_GRID, DEFAULT_SCALES_MM, ENTRY_KEY, MIN_FACE_MM, ExtentNetwork,
                            PointExtent, box_from_faces, box_size_mm, click_samples,
                            faces_of_mask, mirrored)
from ..point_search import MANIFEST_KEY
from ..prompts import PointPrompt
from .manifest_fitting import add_data_arguments, check_fit_settings, progress_printer, write_manifest
from .point_selector import own_data_clicks, synthetic_clicks

WEIGHTS_FILE = "point_extent.pth"
PREVIOUS_WEIGHTS_FILE = "point_extent.previous.pth"
# The networks' training range of lesion diameters: the extent network must size lesions beyond the validation range.
DIAMETER_RANGE_MM = (3.0, 80.0)
# Thresholds tried for min_size_mm (mm); infinity keeps every click on the point search.
THRESHOLDS_MM = (0.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 25.0, 30.0, 40.0, float("inf"))
MIN_CLICKS = 50
CASES_AT_ONCE = 16


@dataclass
class ExtentData:
    """Samples around clicks (clicks, scales, grid, grid, grid; float16, normalized) and their lesions' FACES
    distances (clicks, 6) in mm."""

    samples: np.ndarray
    faces: np.ndarray


def extent_data(clicks: Iterable[tuple[ImageVolume, np.ndarray, PointPrompt]], scales_mm, grid: int,
                normalize: Callable[[np.ndarray], np.ndarray], progress: Callable[[int], None] | None = None
                ) -> ExtentData:
    samples, faces = [], []
    for image, mask, click in clicks:
        cubes = click_samples(image.array, image.spacing_zyx, click.index_zyx, scales_mm, grid)
        samples.append(normalize(cubes).astype(np.float16))
        faces.append(faces_of_mask(mask, image.spacing_zyx, click.index_zyx))
        if progress is not None:
            progress(len(faces))
    if not faces:
        return ExtentData(np.zeros((0, len(scales_mm), grid, grid, grid), np.float16), np.zeros((0, 6), np.float32))
    return ExtentData(np.stack(samples), np.stack(faces))


def augmented(samples: np.ndarray, faces: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One click's samples mirrored along random axes and y and x swapped at random (`mirrored`; its faces reordered
    to match), intensities scaled and shifted a little."""
    axes = [axis for axis in range(3) if rng.random() < 0.5]
    samples, order = mirrored(samples.astype(np.float32), axes, swap_yx=rng.random() < 0.5)
    faces = faces[order]
    samples = samples * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    return np.ascontiguousarray(samples, np.float32), faces


def fit_extent_network(data: ExtentData, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                       channels: int = DEFAULT_CHANNELS, progress: Callable[[int, float], None] | None = None
                       ) -> ExtentNetwork:
    """Smooth L1 on log face distances, AdamW with poly decay, random clicks per step (each augmented)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    network = ExtentNetwork(data.samples.shape[1], data.samples.shape[2], channels)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / steps) ** 0.9)
    running = None
    for step in range(steps):
        batch = [augmented(data.samples[i], data.faces[i], rng) for i in rng.integers(len(data.faces), size=batch_size)]
        inputs = torch.from_numpy(np.stack([b[0] for b in batch]))
        targets = torch.from_numpy(np.log(np.maximum(np.stack([b[1] for b in batch]), MIN_FACE_MM)))
        loss = torch.nn.functional.smooth_l1_loss(network(inputs), targets, beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if progress is not None:
            progress(step + 1, running)
    return network.eval()


def best_threshold(sizes_mm: np.ndarray, extent_dice: np.ndarray, search_dice: np.ndarray) -> tuple[float, dict]:
    """The THRESHOLDS_MM value whose choice (predicted box size at least it: the extent's box, else the search)
    has the highest mean Dice, and every threshold's mean."""
    means = {t: float(np.where(sizes_mm >= t, extent_dice, search_dice).mean()) for t in THRESHOLDS_MM}
    return max(means, key=lambda t: (means[t], -t)), means  # ties: the lower threshold, one network pass


def tuning_dice(segmenter, extent: PointExtent, clicks, progress: Callable[[int], None]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per click: the predicted box's size, the Dice of the answer to it and of the point search's answer
    (`segmenter` must search without an extent network)."""
    from ..training.validation import dice_score

    normalize = segmenter.model_for("box").preprocessor.normalize
    sizes, extent_dice, search_dice = [], [], []
    for image, mask, click in clicks:
        faces = extent.predict_faces(image.array, image.spacing_zyx, click.index_zyx, normalize)
        box = box_from_faces(click.index_zyx, faces, image.spacing_zyx, image.shape_zyx)
        answers = segmenter.segment(image, {1: box, 2: click})
        sizes.append(box_size_mm(faces))
        extent_dice.append(dice_score(answers.masks.get(1), mask))
        search_dice.append(dice_score(answers.masks.get(2), mask))
        progress(len(sizes))
    return np.asarray(sizes), np.asarray(extent_dice), np.asarray(search_dice)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, "point extent network (it must ask for a point search)")
    parser.set_defaults(cases_per_background=96)
    parser.add_argument("--clicks-per-lesion", type=int, default=4, help="clicks anywhere in each lesion's core")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tuning-cases-per-background", type=int, default=6,
                        help="cases of another seed whose clicks choose the size threshold (0: keep every click on "
                             "the predicted box)")


def fitting_clicks(args: argparse.Namespace, seed: int, cases_per_background: int, clicks_per_lesion: int
                   ) -> Iterator[tuple[ImageVolume, np.ndarray, PointPrompt]]:
    """Synthetic clicks on the training backgrounds (lesions of DIAMETER_RANGE_MM), each lesion clicked
    `clicks_per_lesion` times anywhere in its core; the cases are made CASES_AT_ONCE at a time, to bound memory."""
    from ..synthetic.cases import make_validation_set

    if cases_per_background <= 0:
        return
    rng = np.random.default_rng(seed + 1)
    for number, background in enumerate(args.backgrounds):
        for first in range(0, cases_per_background, CASES_AT_ONCE):
            cases = make_validation_set(seed + 1000 * number + first, [background],
                                        min(CASES_AT_ONCE, cases_per_background - first), args.lesions_per_case,
                                        DIAMETER_RANGE_MM)
            yield from _clicked(cases, clicks_per_lesion, rng)


def _clicked(cases, clicks_per_lesion: int, rng: np.random.Generator
             ) -> Iterator[tuple[ImageVolume, np.ndarray, PointPrompt]]:
    from ..synthetic.prompts import sample_point_prompt

    for image, mask, click in synthetic_clicks(cases):
        yield image, mask, click
        for _ in range(clicks_per_lesion - 1):
            again = sample_point_prompt(mask, rng, image.spacing_zyx)
            yield image, mask, PointPrompt(tuple(float(v) for v in again))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_model_manifest
    from ..segment_cli import resolve_model_root
    from ..segmentation import Segmenter

    check_fit_settings(args, {"--steps": args.steps, "--clicks-per-lesion": args.clicks_per_lesion,
                              "--batch-size": args.batch_size})
    require_at_least(0, {"--tuning-cases-per-background": args.tuning_cases_per_background})
    require_positive({"--lr": args.lr})
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    root = resolve_model_root(args.model)
    segmenter = Segmenter(root, device=args.device, preset="fast", point_extent=False)
    if segmenter.point_search is None:
        raise LesionLocatorError(f"{root} asks for no point search; add one first "
                                 "(`lesionlocator train --point-search ...` writes it).")
    normalize = segmenter.model_for("box").preprocessor.normalize
    clicks: Iterable = fitting_clicks(args, args.seed, args.cases_per_background, args.clicks_per_lesion)
    if args.own_data is not None:
        clicks = chain(clicks, own_data_clicks(args.own_data, args.clicks_per_lesion, args.seed))
    data = extent_data(clicks, DEFAULT_SCALES_MM, DEFAULT_GRID, normalize, progress_printer("samples of clicks"))
    print(file=sys.stderr)
    if len(data.faces) < MIN_CLICKS:
        raise LesionLocatorError(f"only {len(data.faces)} clicks to fit on; use at least {MIN_CLICKS} (more "
                                 "--cases-per-background, --backgrounds or --clicks-per-lesion).")
    report_step = progress_printer("steps")
    network = fit_extent_network(data, args.steps, args.batch_size, args.lr, args.seed,
                                 progress=lambda step, loss: report_step(f"{step}/{args.steps}, loss {loss:.3f}"))
    print(file=sys.stderr)
    extent = PointExtent(network, WEIGHTS_FILE)
    report: dict = {"clicks": len(data.faces)}
    if args.tuning_cases_per_background > 0:
        tuning = fitting_clicks(args, args.seed + 1, args.tuning_cases_per_background, 1)
        sizes, extent_dice, search_dice = tuning_dice(segmenter, extent, tuning, progress_printer("tuning clicks"))
        print(file=sys.stderr)
        extent.min_size_mm, means = best_threshold(sizes, extent_dice, search_dice)
        report.update(tuning_clicks=len(sizes), point_search=float(search_dice.mean()),
                      predicted_box=float(extent_dice.mean()), chosen=means[extent.min_size_mm],
                      min_size_mm=extent.min_size_mm)
    print("mean Dice on the tuning clicks:", json.dumps(report, indent=1))
    if args.dry_run:
        return 0
    if not np.isfinite(extent.min_size_mm):
        print("the predicted box answered no size of tuning clicks better than the point search; the manifest is "
              "left as it is", file=sys.stderr)
        return 0
    return _write(root, extent, read_model_manifest(root))


def _write(root: Path, extent: PointExtent, manifest: dict) -> int:
    import torch

    from ..segmentation import Segmenter

    weights = root / WEIGHTS_FILE
    replaces = ENTRY_KEY in manifest[MANIFEST_KEY]
    if weights.is_file():
        shutil.copyfile(weights, root / PREVIOUS_WEIGHTS_FILE)
    torch.save(extent.network.state_dict(), weights)
    manifest[MANIFEST_KEY][ENTRY_KEY] = extent.manifest_entry()
    done = write_manifest(root, manifest, replaces)
    Segmenter(root, device="cpu")  # the written entry loads
    print(f"{done} with the point search's extent network ({weights})", file=sys.stderr)
    return 0
