"""Training samples, made the way inference sees its input.

Generation (slow, cached on disk): a synthetic case is made at the background's native resolution, and for each
lesion the engine's own Preprocessor computes the window of the whole-image preprocessed grid (the plans' CT
normalization and nnU-Net resampling) around it: (patch + 2 x margin) voxels, and the lesion's resampled mask.
The window keeps its full size where the image allows it, as the engine's roi mode does.

Batches (fast, at every step): a prompt is simulated on the target mask (a point ball anywhere in the lesion core,
a box jittered on the scan's native grid + 1 voxel, or a previous mask), and the patch is placed exactly as
inference places it: centred on the prompt's bounding box and shifted inside the image (every tile overlapping a
larger prompt is a candidate), or, for previous masks, centred on their centre of mass as the Tracker places its
patch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy import ndimage

from ..image import ImageVolume
from ..prediction import centred_tile_start, inclusive_bbox, tile_starts
from ..preprocessing import Preprocessor, centred_region
from ..prompts import box_to_preprocessed, dense_box, dense_point
from ..synthetic.backgrounds import Background, load_background
from ..synthetic.cases import SyntheticCase, make_case
from ..synthetic.prompts import bounding_box, jitter_box_faces, sample_point_prompt, simulate_previous_mask
from .plans import LiteModelConfig, plans_model_folder

CROP_MARGIN_ZYX = (6, 12, 12)  # preprocessed voxels kept around the patch: room for off-centre prompts
PROMPT_KINDS = ("point", "box", "mask")
DEFAULT_PROMPT_MIX = (0.4, 0.4, 0.2)
# training backgrounds: real scans + phantoms; validation uses other scans (see synthetic.cases)
TRAINING_BACKGROUNDS = {"abdomen_ct": 0.25, "cranium_ct": 0.2, "body_phantom": 0.35, "head_phantom": 0.2}
PHANTOM_POOL_SIZE = 6  # phantoms per kind, made once per generation run


@dataclass
class TrainingSample:
    image: np.ndarray  # float32 (z, y, x), normalized, preprocessed space
    target: np.ndarray  # bool (z, y, x): the prompted lesion
    meta: dict


# --- generation ------------------------------------------------------------------------------------------------
def crop_region(center_zyx: np.ndarray, image: ImageVolume, config: LiteModelConfig) -> tuple[slice, slice, slice]:
    """Original voxels around `center_zyx` covering patch + margin in preprocessed voxels (+2 original voxels of
    resampling context), shifted inside the image where it is large enough."""
    target_spacing = np.asarray(config.spacing_zyx)
    size_target = np.asarray(config.patch_size_zyx) + 2 * np.asarray(CROP_MARGIN_ZYX)
    half = size_target * target_spacing / np.asarray(image.spacing_zyx) / 2 + 2
    return centred_region(center_zyx, half, image.shape_zyx)


def _centred_crop(array: np.ndarray, center: np.ndarray, size: np.ndarray) -> tuple[slice, ...]:
    """A window of `size` centred on `center`, shifted inside `array` (smaller where the array is smaller)."""
    shape = np.asarray(array.shape)
    size = np.minimum(size, shape)
    start = np.clip(np.round(center - size / 2).astype(int), 0, shape - size)
    return tuple(slice(int(a), int(a + s)) for a, s in zip(start, size))


def lesion_sample(image: ImageVolume, mask: np.ndarray, preprocessor: Preprocessor, config: LiteModelConfig,
                  meta: dict) -> TrainingSample | None:
    """The preprocessed crop around one lesion (`mask`, (z, y, x) on the image grid) and its resampled mask; None
    when the lesion is lost in resampling."""
    coords = np.argwhere(mask)
    if coords.size == 0:
        return None
    center = (coords.min(axis=0) + coords.max(axis=0)) / 2
    pre = preprocessor.preprocess_window(image, crop_region(center, image, config))
    target = preprocessor.resample_mask_window(mask, pre) >= 0.5  # nnU-Net: per-label linear, then >= 0.5
    if not np.any(target):
        return None
    lesion_voxels = np.argwhere(target)
    crop_size = np.asarray(config.patch_size_zyx) + 2 * np.asarray(CROP_MARGIN_ZYX)
    window = _centred_crop(target, (lesion_voxels.min(axis=0) + lesion_voxels.max(axis=0)) / 2, crop_size)
    return TrainingSample(pre.data[0][window], target[window], {**meta, "native_spacing_zyx": list(image.spacing_zyx)})


def samples_from_case(case: SyntheticCase, preprocessor: Preprocessor, config: LiteModelConfig) -> list[TrainingSample]:
    """One preprocessed crop per lesion of the case (lesions lost in resampling are skipped)."""
    samples = []
    for lesion in case.lesions:
        meta = {"case": case.name, "lesion_id": lesion.lesion_id, "site": lesion.site, "shape": lesion.shape_kind,
                "appearance": lesion.appearance.kind, "diameter_mm": round(lesion.diameter_mm, 2)}
        sample = lesion_sample(case.image, case.lesion_mask(lesion.lesion_id), preprocessor, config, meta)
        if sample is not None:
            samples.append(sample)
    return samples


class SampleGenerator:
    """Makes training samples from a weighted mix of real backgrounds and phantom pools."""

    def __init__(self, config: LiteModelConfig, rng: np.random.Generator,
                 background_weights: dict[str, float] | None = None, data_root=None, lesions_per_case: int = 4):
        self.config = config
        self.rng = rng
        self.preprocessor = Preprocessor(plans_model_folder(config))
        self.lesions_per_case = lesions_per_case
        weights = dict(background_weights or TRAINING_BACKGROUNDS)
        self.names = list(weights)
        self.probabilities = np.asarray([weights[n] for n in self.names], float) / sum(weights.values())
        self.data_root = data_root
        self._pools: dict[str, list[Background]] = {}

    def _background(self, name: str) -> Background:
        if name not in self._pools:
            if name in ("body_phantom", "head_phantom"):
                seeds = self.rng.integers(0, 2**31, size=PHANTOM_POOL_SIZE)
                self._pools[name] = [load_background(f"{name}:{seed}") for seed in seeds]
            else:
                self._pools[name] = [load_background(name, self.data_root)]
        pool = self._pools[name]
        return pool[int(self.rng.integers(len(pool)))]

    def next_samples(self) -> list[TrainingSample]:
        name = str(self.rng.choice(self.names, p=self.probabilities))
        case = make_case(self._background(name), self.rng, self.lesions_per_case)
        return samples_from_case(case, self.preprocessor, self.config)


# --- cache -----------------------------------------------------------------------------------------------------
def save_sample(folder: Path, index: int, sample: TrainingSample) -> Path:
    path = folder / f"sample_{index:06d}.npz"
    tmp = folder / f".sample_{index:06d}.tmp.npz"
    np.savez(tmp, image=sample.image.astype(np.float16), target=np.packbits(sample.target),
             shape=np.asarray(sample.target.shape), meta=json.dumps(sample.meta))
    os.replace(tmp, path)
    return path


def load_sample(path: Path) -> TrainingSample:
    with np.load(path) as data:
        shape = tuple(int(s) for s in data["shape"])
        target = np.unpackbits(data["target"], count=int(np.prod(shape))).reshape(shape).astype(bool)
        return TrainingSample(data["image"].astype(np.float32), target, json.loads(str(data["meta"])))


def cached_sample_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("sample_*.npz"))


def fill_cache(folder: str | Path, count: int, generator: SampleGenerator, progress=None) -> list[Path]:
    """Generate samples until `folder` holds `count` (resumable: existing samples are kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = cached_sample_paths(folder)
    while len(paths) < count:
        for sample in generator.next_samples():
            if len(paths) >= count:
                break
            paths.append(save_sample(folder, len(paths), sample))
        if progress is not None:
            progress(len(paths), count)
    return paths[:count]


# --- batches ---------------------------------------------------------------------------------------------------
def simulate_dense_prompt(target: np.ndarray, kind: str, rng: np.random.Generator,
                          spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0),
                          native_spacing_zyx: Sequence[float] | None = None) -> np.ndarray:
    """The prompt channel for `target` in preprocessed voxels, as inference encodes it. `native_spacing_zyx` is
    the spacing of the scan the sample came from (boxes are drawn on that grid); None means the preprocessed one."""
    if kind == "point":
        return dense_point(sample_point_prompt(target, rng, spacing_zyx), target.shape)
    if kind == "box":
        scale_zyx = np.ones(3) if native_spacing_zyx is None else (
            np.asarray(native_spacing_zyx, float) / np.asarray(spacing_zyx, float))
        return dense_box(*user_box_in_preprocessed(target, scale_zyx, rng), target.shape)
    if kind == "mask":
        return simulate_previous_mask(target, rng, spacing_zyx).astype(np.float32)
    raise ValueError(f"Unknown prompt kind '{kind}'; use one of {PROMPT_KINDS}.")


def user_box_in_preprocessed(target: np.ndarray, scale_zyx: np.ndarray, rng: np.random.Generator,
                             max_jitter_voxels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A user's box for `target` (preprocessed voxels) as inference receives it: the lesion's bounding box on the
    native grid (`scale_zyx` = native / preprocessed spacing; its faces taken as the preprocessed faces rounded to
    native voxels), each face jittered by up to `max_jitter_voxels` native voxels, then mapped back as the engine
    maps boxes (`box_to_preprocessed`). On a native grid coarser than the network's the jitter and the rounding
    span several preprocessed voxels, as they do at inference."""
    lo, hi = (np.asarray(v, float) for v in bounding_box(target))
    native_shape = np.maximum(np.round(np.asarray(target.shape) / scale_zyx), 1)
    native_lo = np.minimum(np.round(lo / scale_zyx), native_shape - 1)
    native_hi = np.maximum(np.round(hi / scale_zyx), native_lo + 1)
    native_lo, native_hi = jitter_box_faces(native_lo, native_hi, native_shape, rng, max_jitter_voxels)
    return box_to_preprocessed(native_lo, native_hi, np.zeros(3), scale_zyx, target.shape)


def place_patch(image: np.ndarray, target: np.ndarray, prompt: np.ndarray, patch_size_zyx: Sequence[int],
                rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop (image, target, prompt) to the patch inference would predict for this prompt: points and boxes as the
    Segmenter places it (centred on the prompt's bounding box, shifted inside; a prompt larger than the patch
    picks one of its tiles), previous masks as the Tracker does (centred on the rounded centre of mass). Crops
    smaller than the patch are zero-padded, centred, like inference pads images."""
    stacked = np.stack([image, target.astype(np.float32), prompt])
    padded = pad_nd_image(stacked, tuple(patch_size_zyx), "constant", {"constant_values": 0}, False)
    if kind == "mask":
        starts = [centred_tile_start(np.round(ndimage.center_of_mass(padded[2] > 0)), padded.shape[1:], patch_size_zyx)]
    else:
        prompt_min, prompt_max = inclusive_bbox(padded[2] > 0)
        starts = tile_starts(padded.shape[1:], patch_size_zyx, prompt_min, prompt_max, 0.5)
    start = starts[int(rng.integers(len(starts)))]
    window = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, patch_size_zyx))
    patch = padded[window]
    return patch[0], patch[1] > 0.5, patch[2]


def augment(image: np.ndarray, target: np.ndarray, prompt: np.ndarray, rng: np.random.Generator):
    """Mirroring on all axes (inference's TTA axes) and mild intensity changes (normalized units)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image, target, prompt = (np.flip(a, axis) for a in (image, target, prompt))
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0.0, 0.08), size=image.shape)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(target), np.ascontiguousarray(prompt)


def make_batch(samples: Sequence[TrainingSample], patch_size_zyx: Sequence[int], spacing_zyx: Sequence[float],
               rng: np.random.Generator, prompt_mix: Sequence[float] = DEFAULT_PROMPT_MIX) -> tuple[np.ndarray, np.ndarray]:
    """Network input (batch, 2, z, y, x) [image, prompt] and target (batch, z, y, x) int64."""
    inputs, targets = [], []
    for sample in samples:
        kind = str(rng.choice(PROMPT_KINDS, p=np.asarray(prompt_mix) / np.sum(prompt_mix)))
        prompt = simulate_dense_prompt(sample.target, kind, rng, spacing_zyx, sample.meta.get("native_spacing_zyx"))
        image, target, prompt = place_patch(sample.image, sample.target, prompt, patch_size_zyx, rng, kind)
        image, target, prompt = augment(image, target, prompt, rng)
        inputs.append(np.stack([image, prompt]))
        targets.append(target.astype(np.int64))
    return np.stack(inputs), np.stack(targets)
