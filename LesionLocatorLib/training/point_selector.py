"""`lesionlocator fit-point-search`: fit the point search's candidate selector on synthetic lesions (and yours).

For every click on a lesion of a synthetic set made on training backgrounds (never the validation ones), and
optionally on lesions of your annotated CTs, the model's point search makes all its candidates (the point network's
answer and the box network's on each cube); each gets its features (point_search.FEATURES) and its Dice against the
exact mask. A small network (one tanh layer) learns to score the candidates so that a softmax over them puts its
weight on the best Dice; the kept candidate at inference is the highest score. Several seeds are fitted and averaged
(one wider hidden layer, stored as such).

    lesionlocator fit-point-search -m MODEL_ROOT                  # fit and write the selector into the manifest
    lesionlocator fit-point-search -m MODEL_ROOT --dry-run        # only report what it would gain
    lesionlocator fit-point-search -m MODEL_ROOT --own-data DATASET   # add clicks on your annotated CTs
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import LesionLocatorError, require_positive
from ..image import ImageVolume
from ..point_search import FEATURES, MANIFEST_KEY, Candidate, CandidateSelector, candidate_features
from ..prompts import PointPrompt
from ..tanh_layer import fit_tanh_layer
from .manifest_fitting import (
    add_data_arguments, check_fit_settings, own_lesions, progress_printer, synthetic_cases, write_manifest,
)

MIN_CLICKS = 10  # fewer cannot say which candidate to keep


def candidate_dice(candidate: Candidate, truth_zyx: np.ndarray, truth_voxels: int) -> float:
    mask = candidate.mask
    total = int(mask.sum()) + truth_voxels
    return 1.0 if total == 0 else 2.0 * int((truth_zyx[candidate.region] & mask).sum()) / total


def synthetic_clicks(cases) -> Iterator[tuple[ImageVolume, np.ndarray, PointPrompt]]:
    """(image, true mask, click) for each lesion of validation-style synthetic cases, with the click they hold."""
    for validation_case in cases:
        case = validation_case.case
        for lesion in case.lesions:
            click = PointPrompt(tuple(float(v) for v in validation_case.points_zyx[lesion.lesion_id]))
            yield case.image, case.lesion_mask(lesion.lesion_id), click


def own_data_clicks(dataset: Path, clicks_per_lesion: int, seed: int) -> Iterator[tuple[ImageVolume, np.ndarray,
                                                                                          PointPrompt]]:
    """(image, true mask, click) for each lesion of an annotated nnU-Net raw dataset's training split, clicked
    `clicks_per_lesion` times anywhere in its core (as the synthetic prompts are)."""
    from ..synthetic.prompts import sample_point_prompt

    rng = np.random.default_rng(seed)
    for image, mask in own_lesions(dataset):
        for _ in range(clicks_per_lesion):
            click = sample_point_prompt(mask, rng, image.spacing_zyx)
            yield image, mask, PointPrompt(tuple(float(v) for v in click))


def collect(segmenter, clicks: Iterable[tuple[ImageVolume, np.ndarray, PointPrompt]],
            progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (clicks, candidates, FEATURES) and Dice (clicks, candidates) of every click's candidates."""
    features, dice = [], []
    for image, truth, click in clicks:
        candidates = segmenter.point_candidates(image, click)
        features.append(candidate_features(image.array, image.spacing_zyx, candidates,
                                           segmenter.point_search.box_sizes_mm))
        truth = np.asarray(truth, bool)
        dice.append([candidate_dice(c, truth, int(truth.sum())) for c in candidates])
        if progress is not None:
            progress(len(dice))
    return np.asarray(features, float).reshape(-1, len(segmenter.point_search.box_sizes_mm) + 1, len(FEATURES)), \
        np.asarray(dice, float).reshape(-1, len(segmenter.point_search.box_sizes_mm) + 1)


def fit_selector(features: np.ndarray, dice: np.ndarray, hidden: int = 8, seeds: int = 10, steps: int = 600,
                 temperature: float = 0.2, weight_decay: float = 1e-3, lr: float = 0.02) -> CandidateSelector:
    """Maximize the softmax(score / temperature)-weighted Dice per lesion; `seeds` networks averaged into one. A
    selector fitted on a few hundred clicks varies from seed to seed; ten seeds and the softer temperature chose
    better on all three validation sets of the eleventh session (see the model card)."""
    import torch

    targets = torch.tensor(dice, dtype=torch.float32)

    def loss(scores):
        return -(torch.softmax(scores / temperature, dim=-1) * targets).sum(dim=-1).mean()

    return fit_tanh_layer(features, loss, hidden, seeds, steps, lr, weight_decay, CandidateSelector)


def chosen_dice(scores: np.ndarray, dice: np.ndarray) -> np.ndarray:
    """The Dice of the highest-scoring candidate per lesion (ties: the first)."""
    return dice[np.arange(len(dice)), np.argmax(scores, axis=1)]


def contrast_scores(features: np.ndarray) -> np.ndarray:
    return features[..., FEATURES.index("contrast")]


def cross_validated_dice(features: np.ndarray, dice: np.ndarray, folds: int = 5, **fit_options) -> np.ndarray:
    """Each lesion's chosen Dice by a selector fitted without its fold."""
    order = np.random.default_rng(0).permutation(len(dice))
    chosen = np.zeros(len(dice))
    for fold in range(folds):
        held_out = order[fold::folds]
        kept = np.setdiff1d(order, held_out)
        selector = fit_selector(features[kept], dice[kept], **fit_options)
        chosen[held_out] = chosen_dice(selector.scores(features[held_out]), dice[held_out])
    return chosen


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, "selector (it must ask for a point search)")
    parser.add_argument("--clicks-per-lesion", type=int, default=3,
                        help="clicks anywhere in each of your lesions' cores (--own-data)")
    parser.add_argument("--hidden", type=int, default=8, help="hidden units per seed")
    parser.add_argument("--seeds", type=int, default=10, help="networks fitted and averaged")
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="of the softmax over a click's candidates in the fitting loss (lower: closer to the best)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--features", type=Path, help="features .npz saved by an earlier run: skip the segmentation")
    parser.add_argument("--save-features", type=Path, help="save the features and Dice here (.npz)")


def collect_for(segmenter, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The candidates of the synthetic lesions and of the --own-data lesions the command line asks for."""
    clicks: Iterable = synthetic_clicks(synthetic_cases(args))
    if args.own_data is not None:
        clicks = chain(clicks, own_data_clicks(args.own_data, args.clicks_per_lesion, args.seed))
    features, dice = collect(segmenter, clicks, progress_printer("candidates of clicks"))
    print(file=sys.stderr)
    return features, dice


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_model_manifest
    from ..segment_cli import resolve_model_root
    from ..segmentation import Segmenter

    require_positive({"--temperature": args.temperature})  # before minutes of candidates
    check_fit_settings(args, {"--clicks-per-lesion": args.clicks_per_lesion, "--hidden": args.hidden,
                              "--seeds": args.seeds, "--steps": args.steps})
    root = resolve_model_root(args.model)
    segmenter = Segmenter(root, device=args.device, preset="fast")
    if segmenter.point_search is None:
        raise LesionLocatorError(f"{root} asks for no point search; add one first "
                                 "(`lesionlocator train --point-search ...` writes it).")
    if args.features is not None:
        with np.load(args.features) as saved:
            if list(saved["features_names"]) != list(FEATURES):
                raise LesionLocatorError(f"{args.features} holds other features than {list(FEATURES)}; run without "
                                         "--features to make them again.")
            features, dice = saved["features"], saved["dice"]
    else:
        features, dice = collect_for(segmenter, args)
    if features.shape[1:] != (len(segmenter.point_search.box_sizes_mm) + 1, len(FEATURES)):
        raise LesionLocatorError(f"the features are for another search than {root}'s "
                                 f"({len(segmenter.point_search.box_sizes_mm)} cubes).")
    if len(dice) < MIN_CLICKS:
        raise LesionLocatorError(f"only {len(dice)} clicks to fit on; use at least {MIN_CLICKS} (more "
                                 "--cases-per-background, --backgrounds or --clicks-per-lesion).")
    if args.save_features is not None:
        np.savez(args.save_features, features=features, dice=dice, features_names=np.asarray(FEATURES))
    options = dict(hidden=args.hidden, seeds=args.seeds, steps=args.steps, temperature=args.temperature)
    report = {"clicks": len(dice), "point_network": float(dice[:, 0].mean()),
              "contrast": float(chosen_dice(contrast_scores(features), dice).mean()),
              "selector_cross_validated": float(cross_validated_dice(features, dice, **options).mean()),
              "best_candidate": float(dice.max(axis=1).mean())}
    print("mean Dice of the kept candidate on the fitting clicks:", json.dumps(report, indent=1))
    selector = fit_selector(features, dice, **options)
    if args.dry_run:
        return 0
    manifest = read_model_manifest(root)
    replaces = "selector" in manifest[MANIFEST_KEY]
    manifest[MANIFEST_KEY]["selector"] = selector.manifest_entry()
    done = write_manifest(root, manifest, replaces)
    Segmenter(root, device="cpu")  # the written entry loads
    print(f"{done} with the point search's selector", file=sys.stderr)
    return 0
