"""Segmenter: an image and prompts in, one binary lesion mask per prompt out (on the input's grid).

Modes:
- `roi` (default): crop a region around the prompt from the original image, preprocess only that, predict, and
  resample the logits back only inside it. Cost grows with the lesion, not with the scan.
- `exact`: preprocess the whole image and resample whole-image logits back, as the official code does.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .box_refinement import BoxRefiner
from .checkpoint import ModelFolder, available_folds, load_checkpoint_folder, read_model_manifest, resolve_task_folder
from .errors import Cancelled, CheckpointError, LesionLocatorError, PromptError
from .fine_grid import FineGrid
from .image import ImageVolume, without_nan
from .prediction import PatchPredictor, PredictionSettings, check_cancel, resolve_device
from .point_search import OUTSIDE_LOGIT, Candidate, PointSearch, sigmoid
from .preprocessing import (
    PreprocessedImage, Preprocessor, Region, centred_region, nonzero_bounding_box, region_shape,
)
from .prompts import (
    BOX_MARGIN_VOXELS, BoxPrompt, PointPrompt, Prompt, plain_numbers, box_to_preprocessed, dense_box, dense_point,
    mask_statistics, point_to_preprocessed, prompt_kind, validate_prompt,
)

Progress = Callable[[float, str], None]
PRESETS = {"fast": {"all_folds": False, "use_tta": False}, "accurate": {"all_folds": True, "use_tta": True}}
MODES = ("roi", "exact")
# Logit difference (foreground - background) outside the predicted patches: background, finite so that
# interpolation near the patch border stays well defined (the official code leaves NaN there). The point search
# assumes the same value outside a candidate's region.
OUTSIDE_FG_MINUS_BG = OUTSIDE_LOGIT
# Extra context around the patch in roi mode, so that resampling near the patch sees the same neighbours as in
# the whole image: preprocessed voxels + original voxels.
ROI_MARGIN_TARGET_VOXELS = 4
ROI_MARGIN_ORIGINAL_VOXELS = 2


@dataclass
class SegmentationResult:
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # uint8 (z, y, x) on the input grid
    errors: dict[int, str] = field(default_factory=dict)  # lesion id -> why it could not be segmented
    probabilities: dict[int, np.ndarray] | None = None  # float32 foreground probability, on request


def choose_folds(folder: Path, preset: str, folds) -> list[int]:
    present = available_folds(folder)
    if not present:
        raise CheckpointError(f"No fold_N/checkpoint_final.pth in {folder}.")
    if folds is not None:
        try:
            return [int(f) for f in folds]
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"Folds are numbers; got {list(folds)} (available: {present}).") from error
    return present if PRESETS[preset]["all_folds"] else present[:1]


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise LesionLocatorError(f"Unknown preset '{preset}'; use one of {sorted(PRESETS)}.")


class SegmentationModel:
    """One model folder ready to predict: its preprocessor and its fold networks."""

    def __init__(self, model: ModelFolder, settings: PredictionSettings):
        if model.num_classes != 2:
            raise CheckpointError(f"{model.path}: expected 2 labels (background, lesion), found {model.num_classes}.")
        self.model = model
        self.preprocessor = Preprocessor(model)
        self.predictor = PatchPredictor(model.build_network(), model.fold_weights, model.patch_size_zyx, settings,
                                        str(model.path))

    @property
    def patch_size_zyx(self) -> tuple[int, ...]:
        return self.model.patch_size_zyx

    def fg_minus_bg(self, pre: PreprocessedImage, dense_prompts: list[np.ndarray],
                    cancel_event=None) -> list[np.ndarray]:
        """Foreground-minus-background logits over the preprocessed window (background outside the patches), one
        array per prompt. Tiles follow the whole grid's sliding-window steps, so a window predicts what the whole
        image would."""
        differences = []
        for logits, region in self.predictor.predict_many(pre.data, dense_prompts, cancel_event,
                                                          grid=(pre.window_start_zyx, pre.grid_shape_zyx)):
            difference = np.full(pre.shape_zyx, OUTSIDE_FG_MINUS_BG, dtype=np.float32)
            difference[region] = logits[1] - logits[0]
            differences.append(difference)
        return differences

    def to_original(self, difference: np.ndarray, pre: PreprocessedImage, whole_grid: bool) -> tuple[np.ndarray, Region]:
        """Resample the logit difference onto original voxels (linear resampling of the difference equals the
        difference of the resampled logits, so one channel is enough for two classes)."""
        if whole_grid:
            return self.preprocessor.logits_to_original(difference[None], pre)[0], pre.nonzero_region
        return self.preprocessor.changed_window_to_original(difference, pre, OUTSIDE_FG_MINUS_BG)


class Segmenter:
    """Promptable lesion segmentation with an official-format LesionLocator model root."""

    def __init__(self, model_root: str | Path, device="auto", preset: str = "fast", folds=None,
                 use_tta: bool | None = None, mode: str = "roi", step_size: float = 0.5, cpu_bf16: bool = False,
                 mask_prompt_as: str = "box", point_search: bool = True, box_refinement: bool = True,
                 point_extent: bool = True, box_fine_grid: bool = True):
        """`point_search`: answer clicks by the point search when the model root's manifest asks for one
        (see point_search.py); False uses the point network alone. `point_extent`: within the search, answer a
        click by the box its fitted extent network predicts when the manifest holds one (see point_extent.py).
        `box_refinement`: refine the box network's answer to boxes when the manifest holds a fitted refinement
        (see box_refinement.py). `box_fine_grid`: answer small boxes on a finer grid when the manifest asks for it
        (roi mode; see fine_grid.py)."""
        check_preset(preset)
        if mode not in MODES:
            raise LesionLocatorError(f"Unknown mode '{mode}'; use 'roi' (fast) or 'exact' (whole image, as official).")
        if mask_prompt_as not in ("box", "point"):
            raise LesionLocatorError("mask_prompt_as must be 'box' or 'point'.")
        if not 0 < step_size <= 1:
            raise LesionLocatorError(f"step_size must be in (0, 1]; got {step_size}.")
        self.model_root = Path(model_root)
        self.device = resolve_device(device)
        self.preset = preset
        self.folds = folds
        self.use_tta = PRESETS[preset]["use_tta"] if use_tta is None else bool(use_tta)
        self.mode = mode
        self.step_size = step_size
        self.cpu_bf16 = cpu_bf16
        self.mask_prompt_as = mask_prompt_as
        self._models: dict[tuple[str, bool], SegmentationModel] = {}  # (task, on the fine grid)
        if not self.model_root.is_dir():  # fail early on a wrong folder; weights load lazily per task
            raise CheckpointError(f"Model folder not found: {self.model_root}")
        manifest = read_model_manifest(self.model_root)
        self.point_search = PointSearch.from_manifest(manifest, str(self.model_root), self.model_root,
                                                      point_extent) if point_search else None
        self.box_refiner = BoxRefiner.from_manifest(manifest, str(self.model_root)) if box_refinement else None
        # exact mode runs the official whole-image pipeline, on the plans' grid
        self.fine_grid = FineGrid.from_manifest(manifest, str(self.model_root)) \
            if box_fine_grid and mode == "roi" else None
        # the point search's cubes get the per-voxel stages; only the kept cube gets the convolutional one
        self._cube_refiner, self._kept_cube_refiner = (
            self.box_refiner.split_at_conv() if self.box_refiner is not None else (None, None))

    @classmethod
    def from_folder(cls, model_root: str | Path, **options) -> "Segmenter":
        return cls(model_root, **options)

    def model_for(self, task: str, fine: bool = False) -> SegmentationModel:
        """The task's model, on the plans' grid or (`fine`) on the manifest's fine grid."""
        if (task, fine) not in self._models:
            if fine:
                model = self.fine_grid.folder(self.model_for(task).model)
            else:
                folder = resolve_task_folder(self.model_root, task)
                model = load_checkpoint_folder(folder, choose_folds(folder, self.preset, self.folds))
            settings = PredictionSettings(self.device, self.use_tta, model.mirroring_axes, self.step_size, self.cpu_bf16)
            self._models[task, fine] = SegmentationModel(model, settings)
        return self._models[task, fine]

    def task_for(self, prompt: Prompt) -> str:
        kind = prompt_kind(prompt)
        return self.mask_prompt_as if kind == "mask" else kind

    # --- public API --------------------------------------------------------------------------------------------
    def segment(self, image: ImageVolume, prompts: dict[int, Prompt], progress: Progress | None = None,
                cancel_event: threading.Event | None = None, return_probabilities: bool = False) -> SegmentationResult:
        """Segment every prompted lesion. A lesion whose prompt is unusable gets an entry in `errors`; the others
        still run. NaN voxels count as the image's minimum (with a warning). Cancelling raises `Cancelled`."""
        result = SegmentationResult(probabilities={} if return_probabilities else None)
        image = without_nan(image)
        whole_image_cache: dict[str, PreprocessedImage] = {}
        report = progress or (lambda fraction, stage: None)
        for number, (lesion_id, prompt) in enumerate(prompts.items()):
            check_cancel(cancel_event)
            report(number / max(len(prompts), 1), f"lesion {lesion_id} ({number + 1}/{len(prompts)})")
            try:
                prompt = validate_prompt(prompt, image.shape_zyx)
                score, region = self._segment_one(image, prompt, whole_image_cache, cancel_event)
            except PromptError as error:
                result.errors[lesion_id] = str(error)
                continue
            mask = np.zeros(image.shape_zyx, np.uint8)
            mask[region] = score > 0
            result.masks[lesion_id] = mask
            if return_probabilities:
                probability = np.full(image.shape_zyx, sigmoid(np.float32(OUTSIDE_FG_MINUS_BG)), np.float32)
                probability[region] = sigmoid(score)
                result.probabilities[lesion_id] = probability
        report(1.0, "done")
        return result

    def _segment_one(self, image: ImageVolume, prompt: Prompt, cache: dict,
                     cancel_event) -> tuple[np.ndarray, Region]:
        """Foreground-minus-background logits on the region of the original grid (z,y,x) that the prediction covers;
        the rest is background. Only that region is returned: whole-image score arrays cost more than the roi
        pipeline besides the network."""
        if self.point_search is not None and isinstance(prompt, PointPrompt):
            return self._search_point(image, prompt, cache, cancel_event)
        score, region = self._predict_one(image, prompt, cache, cancel_event)
        if isinstance(prompt, BoxPrompt):
            return self._refine_box(image, prompt, score, region, cancel_event, self.box_refiner)
        return score, region

    def network_answer(self, image: ImageVolume, prompt: Prompt, cancel_event=None) -> tuple[np.ndarray, Region]:
        """The prompt's network alone (no point search, no box refinement; a small box on the fine grid, as segment
        answers it): foreground-minus-background logits on a region of the original grid (z, y, x); background
        outside it."""
        return self._predict_one(image, validate_prompt(prompt, image.shape_zyx), {}, cancel_event)

    def _search_point(self, image: ImageVolume, prompt: PointPrompt, cache: dict,
                      cancel_event) -> tuple[np.ndarray, Region]:
        """The answer to the box that the extent network predicts for the click, when the search has one and the box
        is large enough; otherwise the candidate that the point search keeps (see point_search.py)."""
        box = self.extent_box(image, prompt)
        if box is not None:
            try:
                return self._segment_one(image, box, cache, cancel_event)  # as a user's box
            except PromptError as error:
                raise click_in_zero_border(prompt) from error
        candidates = self.point_candidates(image, prompt, cache, cancel_event)
        kept = candidates[self.point_search.choose(image.array, image.spacing_zyx, candidates)]
        if isinstance(kept.prompt, BoxPrompt):
            return self._refine_box(image, kept.prompt, kept.score, kept.region, cancel_event, self._kept_cube_refiner)
        return kept.score, kept.region

    def extent_box(self, image: ImageVolume, prompt: PointPrompt) -> BoxPrompt | None:
        """The box that the point search's extent network predicts around the click, or None (no extent network, or
        a box under its minimum size)."""
        extent = self.point_search.extent if self.point_search is not None else None
        if extent is None:
            return None
        normalize = self.model_for("box").preprocessor.normalize  # as the box network sees the image
        return extent.box(image.array, image.spacing_zyx, prompt.index_zyx, normalize)

    def point_candidates(self, image: ImageVolume, prompt: PointPrompt, cache: dict | None = None,
                         cancel_event=None) -> list[Candidate]:
        """The point network's answer and the box network's on each cube of the point search around the click
        (refined by the per-voxel stages of the box refinement, when the model has one and it is on; the kept cube
        gets the rest in _search_point). Each cube fits one patch of the box network, and in roi mode all cubes share
        one preprocessed window on its planned grid (never the fine grid: the selector was fitted on these answers)."""
        if self.point_search is None:
            raise LesionLocatorError("This Segmenter has no point search (the model root asks for none, or it was "
                                     "made with point_search=False).")
        cache = {} if cache is None else cache
        box_model = self.model_for("box")
        fits = single_patch_extent_zyx(box_model.patch_size_zyx, box_model.preprocessor.target_spacing_zyx,
                                       image.spacing_zyx)
        boxes = self.point_search.candidate_boxes(prompt, image.spacing_zyx, image.shape_zyx, fits)
        shared = None
        if self.mode == "roi":
            windows = [self.roi_for(box, image, box_model) for box in boxes]
            union = tuple(slice(min(w[a].start for w in windows), max(w[a].stop for w in windows)) for a in range(3))
            shared = box_model.preprocessor.preprocess_window(image, union)
        candidates = [Candidate(prompt, *self._predict_one(image, prompt, cache, cancel_event))]
        try:
            answers = self._predict_many(image, boxes, cache, cancel_event, shared)
        except PromptError as error:
            raise click_in_zero_border(prompt) from error
        for box, (score, region) in zip(boxes, answers):
            candidates.append(Candidate(box, *self._refine_box(image, box, score, region, cancel_event,
                                                               self._cube_refiner)))
        return candidates

    def _refine_box(self, image: ImageVolume, box: BoxPrompt, score: np.ndarray, region: Region,
                    cancel_event, refiner: BoxRefiner | None) -> tuple[np.ndarray, Region]:
        """The answer to `box` refined by `refiner` (the box refinement or a part of it), unless it is None."""
        if refiner is None:
            return score, region
        check_cancel(cancel_event)  # the refinement takes up to half a second on a large box
        return refiner.refine(image.array, image.spacing_zyx, box, score, region)

    def _predict_one(self, image: ImageVolume, prompt: Prompt, cache: dict, cancel_event,
                     pre: PreprocessedImage | None = None) -> tuple[np.ndarray, Region]:
        return self._predict_many(image, [prompt], cache, cancel_event, pre)[0]

    def _predict_many(self, image: ImageVolume, prompts: list[Prompt], cache: dict, cancel_event,
                      pre: PreprocessedImage | None = None, fine: bool = False) -> list[tuple[np.ndarray, Region]]:
        """The network's logits for prompts of one task, each on a region of the original grid. The prompts share
        `pre` (preprocessed on the plans' grid, or on the fine grid if `fine`) when it is given, or the whole
        preprocessed image in exact mode; in roi mode each otherwise gets its own window, on the fine grid when it
        is a box that the fine grid applies to."""
        task = self.task_for(prompts[0])
        if pre is None and self.mode == "exact":
            model = self.model_for(task)
            if task not in cache:
                cache[task] = model.preprocessor.preprocess(image)
            pre = cache[task]
        elif pre is None:
            answers = []
            for prompt in prompts:
                on_fine = self._on_fine_grid(image, prompt)
                model = self.model_for(task, on_fine)
                window = model.preprocessor.preprocess_window(image, self.roi_for(prompt, image, model))
                answers += self._predict_many(image, [prompt], cache, cancel_event, window, on_fine)
            return answers
        model = self.model_for(task, fine)
        check_cancel(cancel_event)
        dense = [self.dense_prompt(prompt, pre, model, task) for prompt in prompts]
        return [model.to_original(difference, pre, whole_grid=self.mode == "exact")
                for difference in model.fg_minus_bg(pre, dense, cancel_event)]

    def _on_fine_grid(self, image: ImageVolume, prompt: Prompt) -> bool:
        return (self.fine_grid is not None and isinstance(prompt, BoxPrompt)
                and self.fine_grid.applies_to(prompt, image.spacing_zyx))

    # --- prompt geometry ---------------------------------------------------------------------------------------
    def roi_for(self, prompt: Prompt, image: ImageVolume, model: SegmentationModel) -> Region:
        lo, hi = prompt_extent_zyx(prompt)
        return prompt_window(lo, hi, image, model.patch_size_zyx, model.preprocessor.target_spacing_zyx)

    def dense_prompt(self, prompt: Prompt, pre: PreprocessedImage, model: SegmentationModel, task: str) -> np.ndarray:
        """The prompt channel on the preprocessed window, mapped as the official code maps it on the whole grid."""
        start, scale, grid, window = pre.nonzero_start_zyx, pre.scale_zyx, pre.grid_shape_zyx, pre.window_start_zyx
        if isinstance(prompt, PointPrompt):
            centre = point_to_preprocessed(prompt.index_zyx, start, pre.nonzero_shape_zyx, scale, grid) - window
            return dense_point(np.clip(centre, 0, np.asarray(pre.shape_zyx) - 1), pre.shape_zyx)
        if isinstance(prompt, BoxPrompt):
            lo, hi = box_to_preprocessed(prompt.lo_zyx, prompt.hi_zyx, start, scale, grid)
            if np.any(hi <= lo):  # the official code skips such a box ("Invalid bbox")
                raise PromptError(
                    f"Box (z, y, x) {plain_numbers(prompt.lo_zyx)}..{plain_numbers(prompt.hi_zyx)} lies wholly in the image's "
                    "zero-valued border, which the model crops away (nnU-Net keeps only the non-zero region); "
                    "draw it over image voxels that are not 0.")
            return dense_box(np.clip(lo - window, 0, pre.shape_zyx), np.clip(hi - window, 0, pre.shape_zyx), pre.shape_zyx)
        # mask: resampled with the image, then its bounding box (+1 voxel) or centroid, as the official code does
        resampled = self.resampled_mask(prompt.mask, pre, model)
        stats = mask_statistics(resampled)
        if not stats:
            raise PromptError("The mask prompt vanished when resampled to the model's spacing (too small); use a point.")
        box_lo, box_hi, centroid = stats[1]
        if task == "point":  # rounded on the whole grid, as the official code does (halves go to even)
            centre = np.round(centroid + window) - window
            return dense_point(np.clip(centre, 0, np.asarray(pre.shape_zyx) - 1).astype(int), pre.shape_zyx)
        return dense_box(np.maximum(box_lo - 1, 0), np.minimum(box_hi + 1, pre.shape_zyx), pre.shape_zyx)

    def resampled_mask(self, mask: np.ndarray, pre: PreprocessedImage, model: SegmentationModel) -> np.ndarray:
        """A lesion mask on the preprocessed window (segmentation resampling of the plans)."""
        if self.mode == "exact":
            return model.preprocessor.resample_segmentation(mask[pre.nonzero_region].astype(np.uint8),
                                                            pre.original_spacing_zyx, pre.grid_shape_zyx) > 0
        return model.preprocessor.resample_mask_window(mask, pre)


def prompt_window(lo_zyx: np.ndarray, hi_zyx: np.ndarray, image: ImageVolume, patch_size_zyx,
                  target_spacing_zyx) -> Region:
    """Original-voxel region that contains every patch a prompt spanning [lo, hi] can need, plus resampling context,
    within the image's non-zero bounding box."""
    spacing = np.asarray(image.spacing_zyx)
    target = np.asarray(target_spacing_zyx)
    patch = np.asarray(patch_size_zyx)
    patch_original = patch * target / spacing
    margin = ROI_MARGIN_TARGET_VOXELS * target / spacing + ROI_MARGIN_ORIGINAL_VOXELS
    extent = hi_zyx - lo_zyx
    # A prompt larger than the patch on any axis is covered by sliding-window tiles, which reach up to one patch
    # beyond it on every axis. On the grid a box spans up to its scaled extent + its margins + 2 voxels of
    # floor/ceil (+1 for the grid shape's rounding); counting high only widens the window, counting low left
    # tiles outside it.
    sliding = np.any(extent > single_patch_extent_zyx(patch, target, spacing))
    half = (extent / 2 + patch_original if sliding else patch_original / 2) + margin
    # inside the non-zero crop that nnU-Net resamples, not the image: a window reaching into a zero border would be
    # cut there and zero-padded, where the whole grid holds image data
    nonzero = nonzero_bounding_box(image.array)
    start = np.asarray([s.start for s in nonzero])
    local = centred_region((lo_zyx + hi_zyx) / 2 - start, half, region_shape(nonzero))
    return tuple(slice(int(s.start + o), int(s.stop + o)) for s, o in zip(local, start))


def click_in_zero_border(prompt: PointPrompt) -> PromptError:
    """A box the point search made around a click lies wholly in the zero-valued border: so does the click."""
    return PromptError(f"Point (z, y, x) = {plain_numbers(prompt.index_zyx)} lies in the image's zero-valued border, which "
                       "the model crops away; click on image voxels that are not 0.")


def single_patch_extent_zyx(patch_size_zyx, target_spacing_zyx, spacing_zyx) -> np.ndarray:
    """The largest prompt extent (original voxels per axis) that one patch predicts, without sliding-window tiles."""
    return ((np.asarray(patch_size_zyx) - 2 * BOX_MARGIN_VOXELS - 3) * np.asarray(target_spacing_zyx)
            / np.asarray(spacing_zyx))


def prompt_extent_zyx(prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """Continuous original-voxel bounds [lo, hi] of what the prompt covers."""
    if isinstance(prompt, PointPrompt):
        point = np.asarray(prompt.index_zyx, float)
        return point, point
    if isinstance(prompt, BoxPrompt):
        return np.asarray(prompt.lo_zyx, float), np.asarray(prompt.hi_zyx, float)
    coords = np.argwhere(prompt.mask)
    return coords.min(axis=0).astype(float), coords.max(axis=0).astype(float) + 1


__all__ = ["Segmenter", "SegmentationResult", "Cancelled", "PRESETS", "MODES"]
