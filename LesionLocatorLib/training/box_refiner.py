"""`lesionlocator fit-box-refinement`: fit the box refinement (box_refinement.py) on synthetic lesions (and yours).

Every lesion of a synthetic set made on training backgrounds (never the validation ones), and optionally every
lesion of your annotated CTs, gets a box jittered as in `lesionlocator evaluate` (each face up to 2 voxels) and the
model's box network answers it. The refinement's features are computed on the box's surroundings, and a TanhLayer
learns a correction of the network's logit (cross-entropy against the exact mask, every lesion weighted alike, on a
sample of its voxels). Each further stage is fitted the same way on the logits the stages before it corrected, and
a last, convolutional stage (conv_stage.py) on what they leave. A 5-fold cross-validation over lesions reports the
Dice it would reach.

    lesionlocator fit-box-refinement -m MODEL_ROOT              # fit and write it into the manifest
    lesionlocator fit-box-refinement -m MODEL_ROOT --dry-run    # only report what it would gain
    lesionlocator fit-box-refinement -m MODEL_ROOT --keep-stages --stages 0   # add a convolutional stage to the
                                                                              # manifest's per-voxel stages
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from itertools import chain, takewhile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from ..box_refinement import (FEATURES, MANIFEST_KEY, BoxRefiner, box_features, box_in_crop, correct,
                              refinement_features)
from ..conv_stage import ConvStage, fit_conv_stage, halo_box
from ..errors import LesionLocatorError
from ..image import ImageVolume
from ..prompts import BoxPrompt
from ..tanh_layer import TanhLayer, fit_tanh_layer
from .manifest_fitting import (
    add_data_arguments, check_fit_settings, own_lesions, progress_printer, synthetic_cases, write_manifest,
)

MIN_LESIONS = 10  # fewer cannot stand for the lesions a model meets
BOX_JITTER_VOXELS = 2  # as `lesionlocator evaluate`'s boxes


@dataclass
class RefinementExample:
    """One boxed lesion: the features where the refinement may change the answer (`reach` of the box's crop), the
    logits they were computed from, the image and the exact mask on the crop, the box in the crop's voxels, and voxel
    counts outside the crop (predicted, true, both)."""

    reach: np.ndarray           # bool (z, y, x) on the crop
    features: np.ndarray        # float32 (reach voxels, FEATURES)
    logits: np.ndarray          # float32 (z, y, x) on the crop: the network's, or those a stage left
    truth: np.ndarray           # bool (z, y, x) on the crop
    outside: tuple[int, int, int]
    image: np.ndarray           # (z, y, x) on the crop
    box_lo_zyx: np.ndarray      # the half-open box in the crop's voxels
    box_hi_zyx: np.ndarray
    spacing_zyx: tuple[float, ...]

    def dice(self, refiner: BoxRefiner | None) -> float:
        """The Dice of these logits, refined by `refiner` unless it is None."""
        logits = self.logits if refiner is None else refiner.refine_crop(
            self.image, self.logits, self.box_lo_zyx, self.box_hi_zyx, self.spacing_zyx, self.features, self.reach)
        mask = logits > 0
        predicted, true, both = self.outside
        total = int(mask.sum()) + predicted + int(self.truth.sum()) + true
        return 1.0 if total == 0 else 2.0 * (int((mask & self.truth).sum()) + both) / total

    def after(self, layer: TanhLayer) -> "RefinementExample":
        """The lesion as the next stage sees it: the logits corrected by `layer`, and the features on them."""
        logits, maps = self.corrected(layer)
        return replace(self, logits=logits, features=maps[self.reach])

    def corrected(self, layer: TanhLayer | None) -> tuple[np.ndarray, np.ndarray]:
        """The logits corrected by `layer` (as they are when None), and the feature maps (z, y, x, FEATURES) on
        them over the whole crop."""
        logits = self.logits.copy()
        if layer is not None:
            logits[self.reach] = correct(layer, self.features)
        return logits, refinement_features(self.image, logits, self.box_lo_zyx, self.box_hi_zyx, self.spacing_zyx)[0]


def make_example(segmenter, image: ImageVolume, truth_zyx: np.ndarray, box: BoxPrompt) -> RefinementExample:
    """The box network's answer to `box` and the refinement's features, as `BoxRefiner.refine` computes them."""
    score, region = segmenter.network_answer(image, box)
    crop, logits, features, reach = box_features(image.array, image.spacing_zyx, box, score, region)
    predicted = np.zeros(image.shape_zyx, bool)
    predicted[region] = score > 0
    truth = np.asarray(truth_zyx, bool)
    predicted[crop], truth_outside = False, truth.copy()
    truth_outside[crop] = False
    outside = (int(predicted.sum()), int(truth_outside.sum()), int((predicted & truth_outside).sum()))
    return RefinementExample(reach, features[reach], logits, truth[crop].copy(), outside,
                             image.array[crop].astype(np.float32), *box_in_crop(box, crop),
                             tuple(map(float, image.spacing_zyx)))


def synthetic_boxes(cases) -> Iterator[tuple[ImageVolume, np.ndarray, BoxPrompt]]:
    """(image, true mask, jittered box) for each lesion of validation-style synthetic cases."""
    for validation_case in cases:
        case = validation_case.case
        for lesion in case.lesions:
            lo, hi = validation_case.boxes_zyx[lesion.lesion_id]
            yield case.image, case.lesion_mask(lesion.lesion_id), BoxPrompt(tuple(map(float, lo)),
                                                                             tuple(map(float, hi)))


def own_data_boxes(dataset: Path, seed: int) -> Iterator[tuple[ImageVolume, np.ndarray, BoxPrompt]]:
    """(image, true mask, jittered box) for each lesion of an annotated nnU-Net raw dataset's training split."""
    from ..synthetic.prompts import jittered_box

    rng = np.random.default_rng(seed)
    for image, mask in own_lesions(dataset):
        lo, hi = jittered_box(mask, rng, BOX_JITTER_VOXELS)
        yield image, mask, BoxPrompt(tuple(map(float, lo)), tuple(map(float, hi)))


def collect(segmenter, boxes: Iterable[tuple[ImageVolume, np.ndarray, BoxPrompt]],
            progress: Callable[[int], None] | None = None) -> list[RefinementExample]:
    examples = []
    for image, truth, box in boxes:
        examples.append(make_example(segmenter, image, truth, box))
        if progress is not None:
            progress(len(examples))
    return examples


def fit_refiner(examples: list[RefinementExample], stages: int = 2, conv: bool = True,
                kept: Sequence[TanhLayer] = (), hidden: int = 16, seeds: int = 1, steps: int = 1000,
                voxels_per_lesion: int = 2000, lr: float = 0.01, weight_decay: float = 1e-4, seed: int = 0,
                conv_hidden: int = 16, conv_epochs: int = 4, conv_lr: float = 3e-3) -> BoxRefiner:
    """The `kept` per-voxel stages as they are, then `stages` new ones, each fitted on the logits the ones before it
    corrected (fit_stage), then a convolutional stage on what they all leave when `conv` (fit_conv)."""
    layers: list[TanhLayer | ConvStage] = []
    for _ in range(len(kept) + stages):
        if layers:
            examples = [example.after(layers[-1]) for example in examples]
        layers.append(kept[len(layers)] if len(layers) < len(kept) else
                      fit_stage(examples, hidden, seeds, steps, voxels_per_lesion, lr, weight_decay, seed))
    if conv:
        layers.append(fit_conv(examples, layers[-1] if layers else None, conv_hidden, conv_epochs, conv_lr,
                               weight_decay, seed))
    return BoxRefiner(layers)


def fit_conv(examples: list[RefinementExample], before: TanhLayer | None, hidden: int, epochs: int, lr: float,
             weight_decay: float, seed: int) -> ConvStage:
    """Minimize, per lesion, the cross-entropy of the corrected logits on its reach plus one minus its soft Dice (the
    voxels beyond the reach counted as they are), every lesion weighted alike. The examples' logits are first corrected
    by `before` (the stage the examples were made for), when given."""
    import torch

    samples, terms = [], []
    for example in examples:
        maps, reach, truth, unchanged = conv_input(example, before)
        samples.append((maps, reach))
        terms.append((torch.from_numpy(maps[..., FEATURES.index("logit")][reach]),
                      torch.from_numpy(truth[reach].astype(np.float32)), unchanged))

    def loss(index, corrections):
        logits, targets, (predicted, true, both) = terms[index]
        corrected = logits + corrections
        probability = torch.sigmoid(corrected)
        soft_dice = 2 * ((probability * targets).sum() + both) / (
            probability.sum() + predicted + targets.sum() + true + 1e-3)
        return torch.nn.functional.binary_cross_entropy_with_logits(corrected, targets) + 1 - soft_dice

    return fit_conv_stage(samples, loss, hidden, epochs, lr, weight_decay, seed)


def conv_input(example: RefinementExample, before: TanhLayer | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """For the example's logits corrected by `before`: the feature maps, reach and exact mask on the part of its crop
    that a convolutional stage reads (halo_box of the reach), and the voxels that the
    stage leaves as they are (beyond the reach, in the crop or outside it): predicted, true, both."""
    logits, maps = example.corrected(before)
    part = halo_box(example.reach)
    beyond = ~example.reach
    predicted, truth = (logits > 0) & beyond, example.truth & beyond
    unchanged = tuple(int(count) + outside for count, outside in zip(
        (predicted.sum(), truth.sum(), (predicted & truth).sum()), example.outside))
    return maps[part], example.reach[part], example.truth[part], unchanged


def fit_stage(examples: list[RefinementExample], hidden: int, seeds: int, steps: int, voxels_per_lesion: int,
              lr: float, weight_decay: float, seed: int) -> TanhLayer:
    """Minimize the cross-entropy of the corrected logits on up to `voxels_per_lesion` voxels of each lesion's
    reach, each lesion weighted alike."""
    import torch

    rng = np.random.default_rng(seed)
    rows, labels, weights = [], [], []
    for example in examples:
        chosen = rng.choice(len(example.features), min(voxels_per_lesion, len(example.features)), replace=False)
        rows.append(example.features[chosen])
        labels.append(example.truth[example.reach][chosen])
        weights.append(np.full(len(chosen), 1.0 / len(chosen)))
    features = np.concatenate(rows)
    given_logits, targets, weight = (torch.tensor(np.asarray(v, np.float32)) for v in (
        features[:, FEATURES.index("logit")], np.concatenate(labels), np.concatenate(weights)))
    weight = weight / weight.sum()

    def loss(corrections):
        entropy = torch.nn.functional.binary_cross_entropy_with_logits(given_logits + corrections, targets,
                                                                       reduction="none")
        return (entropy * weight).sum()

    return fit_tanh_layer(features, loss, hidden, seeds, steps, lr, weight_decay)


def cross_validated_dice(examples: list[RefinementExample], folds: int = 5, **fit_options) -> np.ndarray:
    """Each lesion's refined Dice by a refinement fitted without its fold."""
    order = np.random.default_rng(0).permutation(len(examples))
    refined = np.zeros(len(examples))
    for fold in range(folds):
        held_out = order[fold::folds]
        refiner = fit_refiner([examples[i] for i in np.setdiff1d(order, held_out)], **fit_options)
        refined[held_out] = [examples[i].dice(refiner) for i in held_out]
    return refined


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, "box refinement")
    parser.add_argument("--stages", type=int, default=2,
                        help="per-voxel stages, each fitted on the logits the ones before it corrected (each adds "
                             "minutes)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units per stage")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--voxels-per-lesion", type=int, default=2000, help="voxels sampled from each lesion's box")
    parser.add_argument("--conv-stage", action=argparse.BooleanOptionalAction, default=True,
                        help="end with a convolutional stage, which sees each voxel's 5x5x5 neighbourhood")
    parser.add_argument("--conv-epochs", type=int, default=4, help="passes over the lesions for that stage")
    parser.add_argument("--conv-hidden", type=int, default=16, help="channels of that stage's convolutions")
    parser.add_argument("--folds", type=int, default=5,
                        help="folds of the cross-validation that reports the refined Dice (0: skip it; it fits every "
                             "stage once per fold)")
    parser.add_argument("--keep-stages", action="store_true",
                        help="keep the per-voxel stages of the manifest's refinement and fit only what comes after "
                             "them (--stages more, and the convolutional stage)")


def kept_stages(manifest: dict, root) -> list[TanhLayer]:
    """The per-voxel stages that begin the manifest's refinement (a convolutional stage after them is fitted
    again)."""
    refiner = BoxRefiner.from_manifest(manifest, f"{root}'s manifest")
    kept = [] if refiner is None else list(takewhile(lambda stage: isinstance(stage, TanhLayer), refiner.stages))
    if not kept:
        raise LesionLocatorError(f"--keep-stages: {root}'s manifest has no fitted per-voxel box refinement stages to "
                                 "keep; run `lesionlocator fit-box-refinement` without --keep-stages.")
    return kept


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import read_model_manifest
    from ..segment_cli import resolve_model_root
    from ..segmentation import Segmenter

    if args.stages < 0 or (args.stages == 0 and not args.conv_stage):  # before minutes of boxes
        raise LesionLocatorError(f"--stages must be at least 1, or 0 with the convolutional stage; got {args.stages}"
                                 f"{'' if args.conv_stage else ' and --no-conv-stage'}.")
    check_fit_settings(args, {"--hidden": args.hidden, "--steps": args.steps,
                              "--voxels-per-lesion": args.voxels_per_lesion, "--conv-epochs": args.conv_epochs,
                              "--conv-hidden": args.conv_hidden})
    if args.folds == 1 or args.folds < 0:
        raise LesionLocatorError(f"--folds must be 0 (no cross-validation) or at least 2; got {args.folds}.")
    root = resolve_model_root(args.model)
    manifest = read_model_manifest(root)
    if "box" not in manifest.get("tasks", {}):
        raise LesionLocatorError(f"{root}'s manifest maps no 'box' task to a network; the refinement corrects the "
                                 "box network's answers.")
    kept = kept_stages(manifest, root) if args.keep_stages else []
    # the box network alone: an entry of an earlier version's features, which this fit replaces, must not stop it
    segmenter = Segmenter(root, device=args.device, preset="fast", box_refinement=False)
    boxes: Iterable = synthetic_boxes(synthetic_cases(args))
    if args.own_data is not None:
        boxes = chain(boxes, own_data_boxes(args.own_data, args.seed))
    examples = collect(segmenter, boxes, progress_printer("boxed lesions"))
    print(file=sys.stderr)
    if len(examples) < MIN_LESIONS:
        raise LesionLocatorError(f"only {len(examples)} lesions to fit on; use at least {MIN_LESIONS} (more "
                                 "--cases-per-background or --backgrounds, or --own-data).")
    options = dict(stages=args.stages, conv=args.conv_stage, kept=kept, hidden=args.hidden, steps=args.steps,
                   voxels_per_lesion=args.voxels_per_lesion, conv_hidden=args.conv_hidden,
                   conv_epochs=args.conv_epochs)
    report = {"lesions": len(examples), "box_network": float(np.mean([e.dice(None) for e in examples]))}
    if kept:
        report["kept_stages"] = float(np.mean([e.dice(BoxRefiner(list(kept))) for e in examples]))
    if args.folds:
        report["refined_cross_validated"] = float(cross_validated_dice(examples, args.folds, **options).mean())
    print("mean Dice of box prompts on the fitting lesions:", json.dumps(report, indent=1))
    refiner = fit_refiner(examples, **options)
    if args.dry_run:
        return 0
    replaces = MANIFEST_KEY in manifest
    manifest[MANIFEST_KEY] = refiner.manifest_entry()
    done = write_manifest(root, manifest, replaces)
    Segmenter(root, device="cpu")  # the written entry loads
    print(f"{done} with the box refinement", file=sys.stderr)
    if manifest.get("point_search", {}).get("selector") is not None:
        print(f"the point search refines its cubes too: `lesionlocator fit-point-search -m {args.model}` fits its "
              "selector again for the refined candidates", file=sys.stderr)
    return 0
