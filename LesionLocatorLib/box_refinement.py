"""Box refinement: a fitted per-voxel correction of the box network's answer from what the image shows in the box.

A small box network leans on the box's extent: given a box larger than the lesion (a spiculated lesion's spikes, a
loose box) it fills much of it, and its edges are a voxel or so off. The image inside the box usually says more:
voxels that look like the network's confident lesion voxels rather than like the surroundings outside the box, and
edge voxels whose intensity lies part way between the two (partial volume). So each voxel in and just around the box
gets FEATURES: the network's logit; an intensity likelihood ratio (lesion vs. surroundings, histograms weighted by
the network's probabilities, at two smoothings, and once more after a first correction, as in GrabCut); where it
lies in the box; its signed distance to the network's mask; the local gradient; the box's size; its intensity
fraction (0 at the surroundings' mean, 1 at the lesion's: the share of the voxel the lesion fills, for a uniform
lesion), lightly smoothed and raw, and the raw fraction's minimum and maximum over its 3x3x3 neighbours; and the
lesion's contrast to the image noise, which says how far the fractions can be trusted. A TanhLayer (fitted by
`lesionlocator fit-box-refinement` on synthetic lesions of training backgrounds) adds a correction to the logit.
Further stages do the same again on the corrected logits: the features computed from the corrected mask (the
lesion's mean, the surroundings' shell, the signed distance) are closer to the truth than the network's. A stage may
also be a ConvStage (conv_stage.py), which corrects each voxel from the features of its 5x5x5 neighbourhood.

The Segmenter refines the answers to box prompts and to the point search's cubes (point_search.py; the cubes by the
per-voxel stages, the kept cube then by a convolutional stage, see BoxRefiner.split_at_conv). A model root
asks for it in its manifest: `"box_refinement": {"stages": [{"features": [...], ...}, ...]}` (a convolutional stage's
entry has `"kind": "conv"`). Indices are
(z, y, x) voxels of the original image; spacings in mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import conv_stage
from .conv_stage import ConvStage
from .errors import CheckpointError
from .point_search import OUTSIDE_LOGIT, crop_placed, sigmoid, slices_between
from .prompts import BoxPrompt
from .tanh_layer import TanhLayer

MANIFEST_KEY = "box_refinement"
FEATURES = ("logit", "likelihood_ratio_1mm", "likelihood_ratio_2mm", "likelihood_ratio_refit",
            "box_radius_ellipsoid", "box_radius_chebyshev", "signed_distance_mm", "gradient", "log_box_size_mm",
            "intensity_fraction", "intensity_fraction_raw", "intensity_fraction_raw_min", "intensity_fraction_raw_max",
            "contrast_to_noise")
# Surroundings around the box that the intensity histograms and the smoothing see.
CONTEXT_MM = 12.0
SMOOTHING_MM = 0.7  # of the image, before its intensities are binned (keeps noise out of the histograms)
# How far beyond the box the refinement may change voxels, in face-connected steps (the network rarely segments
# further out).
REACH_VOXELS = 2
LOGIT_LIMIT = 15.0  # the network's logits are clipped here, so that saturated voxels all look alike
RATIO_LIMIT = 6.0  # log likelihood ratios are clipped here: empty histogram bins say little
HISTOGRAM_BINS = 48
FIRST_CORRECTION_WEIGHT = 2.0  # the likelihood ratio's weight in the first correction (before the refit)
# The surroundings' mean intensity is taken on a shell this far outside the network's mask (mm): past the blur of
# its edge, before other structures.
SHELL_MM = (1.0, 4.0)
# Added to the shell's limits: a voxel exactly at a limit on the grid (4 mm = 5 x 0.8 mm) must not flip in or out
# when a file stores the spacing in float32 (0.800000011920929).
DISTANCE_TOLERANCE_MM = 1e-3
FRACTION_LIMITS = (-1.5, 2.5)
CONTRAST_LIMIT = 20.0


@dataclass
class BoxRefiner:
    stages: list[TanhLayer | ConvStage]  # each corrects the logits that the one before it left

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the model manifest") -> "BoxRefiner | None":
        """The refinement a manifest asks for: `{"stages": [entry, ...]}`, or one stage's entry alone (as written
        before the twelfth session)."""
        entry = manifest.get(MANIFEST_KEY)
        if entry is None:
            return None
        what, fix = (f"{where}: '{MANIFEST_KEY}'",
                     "Run `lesionlocator fit-box-refinement` again, or remove the entry to use the box network alone.")
        stages = entry.get("stages") if isinstance(entry, dict) and "stages" in entry else [entry]
        if not isinstance(stages, list) or not stages:
            raise CheckpointError(f"{what}: 'stages' must be a non-empty list of fitted stages. {fix}")
        return cls([_stage_from_entry(stage, f"{what} (stage {number})", fix) for number, stage in enumerate(stages, 1)])

    def manifest_entry(self) -> dict:
        return {"stages": [stage.manifest_entry(FEATURES) for stage in self.stages]}

    def split_at_conv(self) -> tuple["BoxRefiner", "BoxRefiner | None"]:
        """The per-voxel stages that begin this refinement, and the stages from its first convolutional one on (None
        when there are none after per-voxel ones). The point search refines all its cubes with the first part and the
        kept cube with the rest: the kept cube gets the whole refinement for one convolutional pass, not six."""
        first = next((n for n, stage in enumerate(self.stages) if isinstance(stage, ConvStage)), len(self.stages))
        if first in (0, len(self.stages)):
            return self, None
        return BoxRefiner(self.stages[:first]), BoxRefiner(self.stages[first:])

    def refine(self, image_zyx: np.ndarray, spacing_zyx, box: BoxPrompt, score: np.ndarray,
               region: tuple[slice, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
        """The refined logits (foreground minus background) on a region that covers `region` and the box's
        surroundings; background outside it."""
        crop, logits, features, reach = box_features(image_zyx, spacing_zyx, box, score, region)
        refined = self.refine_crop(image_zyx[crop], logits, *box_in_crop(box, crop), spacing_zyx, features[reach],
                                   reach, first_maps=features)
        lo, hi = np.asarray([s.start for s in crop]), np.asarray([s.stop for s in crop])
        offset = np.asarray([r.start or 0 for r in region], int)
        union_lo = np.minimum(lo, offset)
        union_hi = np.maximum(hi, offset + np.asarray(score.shape))
        out = np.full(tuple(union_hi - union_lo), OUTSIDE_LOGIT, np.float32)
        out[slices_between(offset - union_lo, offset - union_lo + score.shape)] = score
        out[slices_between(lo - union_lo, hi - union_lo)] = refined
        return out, slices_between(union_lo, union_hi)

    def refine_crop(self, image_zyx: np.ndarray, logits_zyx: np.ndarray, box_lo_zyx, box_hi_zyx, spacing_zyx,
                    first_features: np.ndarray, reach: np.ndarray, first_maps: np.ndarray | None = None
                    ) -> np.ndarray:
        """The logits on a box's crop after every stage; `first_features` are the first stage's on `reach`
        (refinement_features of the given logits), `first_maps` the same on the whole crop when the caller has them
        (a convolutional first stage reads them; they are computed otherwise), the later stages' are computed here."""
        refined = logits_zyx.copy()
        for number, stage in enumerate(self.stages):
            if number == 0 and isinstance(stage, TanhLayer):
                refined[reach] = correct(stage, first_features)
                continue
            maps = first_maps if number == 0 and first_maps is not None else refinement_features(
                image_zyx, refined, box_lo_zyx, box_hi_zyx, spacing_zyx)[0]
            refined[reach] = correct(stage, maps[reach], maps, reach)
        return refined


def correct(stage: TanhLayer | ConvStage, features: np.ndarray, maps: np.ndarray | None = None,
            reach: np.ndarray | None = None) -> np.ndarray:
    """Corrected logits from (voxels, FEATURES): the (clipped) logit the stage was given plus its correction. A
    ConvStage also needs the feature maps (z, y, x, FEATURES) that `features` were taken from at `reach`."""
    if isinstance(stage, ConvStage):
        correction = stage.outputs(maps, reach)
    else:
        correction = stage.outputs(features)
    return (features[:, 0] + correction).astype(np.float32)


def _stage_from_entry(entry, what: str, fix: str) -> TanhLayer | ConvStage:
    kind = entry.get("kind", "tanh") if isinstance(entry, dict) else "tanh"
    if kind == conv_stage.KIND:
        return ConvStage.from_entry(entry, FEATURES, what, fix)
    if kind != "tanh":
        raise CheckpointError(f"{what} has an unknown kind {kind!r} (this version knows 'tanh' and "
                              f"'{conv_stage.KIND}'). {fix}")
    return TanhLayer.from_entry(entry, FEATURES, what, fix)


def box_voxels(box: BoxPrompt) -> tuple[np.ndarray, np.ndarray]:
    """The half-open voxel box (z, y, x) that covers a box prompt."""
    return np.floor(np.asarray(box.lo_zyx)).astype(int), np.ceil(np.asarray(box.hi_zyx)).astype(int)


def box_in_crop(box: BoxPrompt, crop: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The half-open voxel box (box_voxels) in the voxels of its crop (z, y, x)."""
    start = np.asarray([s.start for s in crop])
    lo, hi = box_voxels(box)
    return lo - start, hi - start


def box_crop(box: BoxPrompt, spacing_zyx, shape_zyx) -> tuple[slice, ...]:
    """The box plus CONTEXT_MM on every side, within the image."""
    lo, hi = box_voxels(box)
    context = np.ceil(CONTEXT_MM / np.asarray(spacing_zyx, float)).astype(int)
    return slices_between(np.maximum(lo - context, 0), np.minimum(hi + context, shape_zyx))


def box_features(image_zyx: np.ndarray, spacing_zyx, box: BoxPrompt, score: np.ndarray, region: tuple[slice, ...]
                 ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The box's crop (box_crop) of the original grid, the network's logits on it (background beyond `region`), and
    the refinement's features and reach on it (refinement_features)."""
    crop = box_crop(box, spacing_zyx, image_zyx.shape)
    lo, hi = np.asarray([s.start for s in crop]), np.asarray([s.stop for s in crop])
    offset = np.asarray([r.start or 0 for r in region], int)
    logits = crop_placed(score.astype(np.float32), offset, lo, hi, np.float32(OUTSIDE_LOGIT))
    features, reach = refinement_features(image_zyx[crop], logits, *box_in_crop(box, crop), spacing_zyx)
    return crop, logits, features, reach


def refinement_features(image_zyx: np.ndarray, logits_zyx: np.ndarray, box_lo_zyx, box_hi_zyx, spacing_zyx
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x, FEATURES) on a crop of the image around a box, and where the refinement may change the answer (the
    box and REACH_VOXELS face-connected steps around it). `box_lo_zyx`/`box_hi_zyx`: the half-open box in the
    crop's voxels."""
    spacing = np.asarray(spacing_zyx, float)
    image = image_zyx.astype(np.float32)
    smoothed = ndimage.gaussian_filter(image, SMOOTHING_MM / spacing)
    in_box = np.zeros(image.shape, bool)
    in_box[slices_between(np.maximum(box_lo_zyx, 0), box_hi_zyx)] = True
    logits = np.clip(logits_zyx, -LOGIT_LIMIT, LOGIT_LIMIT).astype(np.float32)
    bins = _intensity_bins(smoothed)
    probability = sigmoid(logits)
    ratio = _likelihood_ratio(bins, probability, in_box)
    first, second = (ndimage.gaussian_filter(ratio, mm / spacing) for mm in (1.0, 2.0))
    corrected = sigmoid(logits + FIRST_CORRECTION_WEIGHT * first)
    refit = ndimage.gaussian_filter(_likelihood_ratio(bins, corrected, in_box), 1.0 / spacing)
    centre = (np.asarray(box_lo_zyx) + np.asarray(box_hi_zyx) - 1) / 2
    half = np.maximum((np.asarray(box_hi_zyx) - np.asarray(box_lo_zyx)) / 2, 0.5)
    relative = [((np.arange(n) - c) / h).astype(np.float32) for n, c, h in zip(image.shape, centre, half)]
    grids = np.ix_(*relative)
    ellipsoid = np.sqrt(grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2)
    chebyshev = np.maximum(np.maximum(np.abs(grids[0]), np.abs(grids[1])), np.abs(grids[2]))
    mask = logits > 0
    outside_mm = ndimage.distance_transform_edt(~mask, sampling=spacing)
    signed_distance = ndimage.distance_transform_edt(mask, sampling=spacing) - outside_mm
    spread = float(smoothed[in_box].std()) + 1e-3
    gradient = ndimage.gaussian_gradient_magnitude(image, 1.0 / spacing) / spread
    box_size = np.log(np.prod(np.maximum(np.asarray(box_hi_zyx) - np.asarray(box_lo_zyx), 1) * spacing) ** (1 / 3))
    inner, outer = (limit + DISTANCE_TOLERANCE_MM for limit in SHELL_MM)
    shell = (outside_mm > inner) & (outside_mm <= outer) if mask.any() else ~in_box
    fraction, fraction_raw, contrast = _intensity_fractions(image, smoothed, probability * in_box, shell, in_box)
    features = np.stack([
        logits, first, second, refit, np.minimum(ellipsoid, 3), np.minimum(chebyshev, 3),
        np.clip(signed_distance, -9, 9), np.minimum(gradient, 5), np.full(image.shape, box_size),
        fraction, fraction_raw, ndimage.minimum_filter(fraction_raw, 3), ndimage.maximum_filter(fraction_raw, 3),
        np.full(image.shape, contrast)], axis=-1)
    reach = ndimage.binary_dilation(in_box, iterations=REACH_VOXELS)
    return features.astype(np.float32), reach


def _intensity_fractions(image: np.ndarray, smoothed: np.ndarray, lesion_weight: np.ndarray, shell: np.ndarray,
                         in_box: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Each voxel's intensity as a fraction of the way from the surroundings' mean (0) to the lesion's (1), on the
    smoothed and on the raw image, and the lesion's contrast to the noise: |lesion - surroundings| / the standard
    deviation of (raw - smoothed) in the surroundings. The lesion's mean is the smoothed image weighted by
    `lesion_weight`, the surroundings' that of the `shell` (of the box's outside, or of the whole crop, when empty)."""
    around = next(region for region in (shell, ~in_box, np.ones(image.shape, bool)) if region.any())
    lesion_mean = float((smoothed * lesion_weight).sum() / max(float(lesion_weight.sum()), 1e-3))
    around_mean = float(smoothed[around].mean())
    difference = lesion_mean - around_mean
    difference = difference if abs(difference) >= 1e-3 else 1e-3
    noise = float(np.std(image[around] - smoothed[around])) + 1e-3
    return (np.clip((smoothed - around_mean) / difference, *FRACTION_LIMITS),
            np.clip((image - around_mean) / difference, *FRACTION_LIMITS),
            min(abs(difference) / noise, CONTRAST_LIMIT))


def _intensity_bins(smoothed: np.ndarray) -> np.ndarray:
    """Each voxel's histogram bin: HISTOGRAM_BINS equal bins between the crop's 0.5th and 99.5th percentiles (values
    beyond fall into the outer bins)."""
    low, high = np.percentile(smoothed, [0.5, 99.5])
    edges = np.linspace(low, high + 1e-3, HISTOGRAM_BINS + 1)
    return np.clip(np.digitize(smoothed, edges) - 1, 0, HISTOGRAM_BINS - 1)


def _likelihood_ratio(bins: np.ndarray, probability: np.ndarray, in_box: np.ndarray) -> np.ndarray:
    """log p(intensity | lesion) - log p(intensity | surroundings), clipped to +-RATIO_LIMIT: lesion voxels are the
    box's, weighted by the foreground probability; surroundings every voxel of the crop, weighted by the background
    probability. Histograms are smoothed and never empty."""
    flat = bins.ravel()
    lesion = np.bincount(flat, (probability * in_box).ravel(), HISTOGRAM_BINS) + 1.0
    around = np.bincount(flat, (1 - probability).ravel(), HISTOGRAM_BINS) + 1.0
    lesion = ndimage.gaussian_filter1d(lesion / lesion.sum(), 1.5)
    around = ndimage.gaussian_filter1d(around / around.sum(), 1.5)
    return np.clip(np.log(lesion[bins]) - np.log(around[bins]), -RATIO_LIMIT, RATIO_LIMIT).astype(np.float32)
