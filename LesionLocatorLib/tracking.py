"""Longitudinal tracking: a lesion prompted once is found and segmented in every follow-up.

Per (earlier, later) scan pair: both scans are preprocessed with the Track plans, z-aligned when their slice counts
differ a lot, registered ONCE (per fold and mirror when ensembling), and every lesion mask of the earlier scan is
warped with that one deformation; a U-Net patch around each warped mask's centre of mass then segments the lesion
in the later scan. A lesion whose warped mask or prediction is empty, or (exact mode) that vanishes on the Track
grid, is reported as not found with the reason (the official code guesses a random location instead). All arrays
are (z, y, x).

Exact mode registers arrays (the registration network knows no geometry), so the later scan is first stored along
the earlier one's axes (oriented_like): losslessly for an axis permutation or flip, by resampling for an oblique
rotation; its masks are mapped back onto its own grid. Roi mode needs a geometry-aware registration on the original
scans: the network is refused there.

In roi mode, when the model's manifest holds a box refinement (box_refinement.py) and its track task uses the box
network, the U-Net's answer is refined as a box prompt's is, in the bounding box of the U-Net's own mask grown by
TRACK_BOX_MARGIN_VOXELS: on the bundled Lite model this lifted the follow-ups' Dice from 0.65 to 0.79 and 0.62 to
0.69 on two synthetic sets (model card).

`official_list_prompts` reproduces one more official quirk, off by default: wherever the official tracker reads a
lesion from its own mask file (a list of masks, point/box prompts, every pair after the first) nnU-Net's
preprocessing labels the voxels outside the earlier scan's body (value 0, connected to the border) -1 in that
mask. The -1 voxels are warped and fed to the U-Net with the lesion, and they pull the patch centre (the mean
position of the prompt's non-zero voxels) away from the lesion.
"""
from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from scipy import ndimage

from .box_refinement import BoxRefiner
from .checkpoint import ModelFolder, load_checkpoint_folder, read_model_manifest, resolve_task_folder
from .errors import CheckpointError, LesionLocatorError, PromptError
from .image import ImageVolume, resampled_onto, without_nan
from .prediction import PatchPredictor, PredictionSettings, check_cancel, inclusive_bbox, resolve_device
from .preprocessing import PreprocessedImage, Preprocessor
from .prompts import BoxPrompt, MaskPrompt, Prompt, validate_prompt
from .registration import make_registration
from .registration.base import Deformation, Registration
from .registration.zalign import z_alignment_windows
from .segmentation import PRESETS, Segmenter, check_preset, choose_folds, prompt_window

Progress = Callable[[float, str], None]
MaskOnGrid = Callable[[np.ndarray], np.ndarray]
NOT_FOUND_MOVED_OUT = "not found: the registration moved the lesion out of the scan"
NOT_FOUND_TOO_SMALL = ("not found: the lesion vanished when resampled to the tracking model's spacing (too small to "
                       "track); place a point on it here to re-prompt")
# Logit difference outside the U-Net patch: the official tracker fills (background 1, foreground 0) there.
OUTSIDE_FG_MINUS_BG = -1.0
TRACKING_MODES = ("auto", "exact", "roi")
WINDOW_MARGIN_VOXELS = 3  # context around a window on the preprocessed grid (linear interpolation needs 1)
MAX_CACHED_SCANS = 8  # preprocessed scans (a patient's timepoints)
# Deformations kept, rounded to whole scan pairs (folds x mirrors each) and never below one pair: a GradICON field is
# 64 MB (on the device), so the 40 passes of a 5-fold 'accurate' ensemble keep one pair, 'fast' up to 32 pairs.
MAX_CACHED_REGISTRATIONS = 32
# Directions this close (degrees, per axis) to an axis permutation and flip of the earlier scan's count as aligned:
# the rest is left to the registration, like a patient's own motion; beyond it the later scan is resampled.
ALIGNED_AXES_TOLERANCE_DEG = 1.0
# The box a follow-up's answer is refined in: its mask's bounding box grown by this many voxels of the scan on every
# side (the refinement was fitted on boxes jittered by up to 2 voxels around the lesion).
TRACK_BOX_MARGIN_VOXELS = 1
UNET_PREFIX = "unet."
REGISTRATION_PREFIX = "reg_net."


@dataclass
class LesionAtTimepoint:
    """One lesion at one timepoint: the correspondence record the API, the CLI JSON and Slicer use."""

    lesion_id: int
    timepoint: int
    found: bool
    mask: np.ndarray | None = field(default=None, repr=False)  # uint8 (z, y, x) on that timepoint's grid
    volume_ml: float = 0.0
    centre_lps: tuple[float, float, float] | None = None
    centre_ras: tuple[float, float, float] | None = None
    source: str = "tracked"  # "prompted" (segmented from a prompt there) or "tracked"
    message: str = ""

    def summary(self) -> dict:
        # No volume when not found: 0 would read as a lesion that disappeared.
        volume_ml = round(self.volume_ml, 4) if self.found else None
        return {"timepoint": self.timepoint, "found": self.found, "volume_ml": volume_ml,
                "centre_lps": _rounded(self.centre_lps), "centre_ras": _rounded(self.centre_ras),
                "source": self.source, "message": self.message}


@dataclass
class TrackingResult:
    timepoints: list[ImageVolume]
    lesions: dict[int, list[LesionAtTimepoint]]
    registrations_computed: int = 0


def _rounded(point) -> list[float] | None:
    return None if point is None else [round(float(v), 3) for v in point]


def lesion_record(lesion_id: int, timepoint: int, image: ImageVolume, mask: np.ndarray | None, source: str,
                  message: str = "") -> LesionAtTimepoint:
    """Volume and centre of a lesion mask; an empty or missing mask is 'not found'."""
    # the voxel list, not ndimage.center_of_mass: that multiplies index grids over the whole scan (~0.5 s a CT)
    voxels_zyx = None if mask is None else np.argwhere(mask)
    if voxels_zyx is None or len(voxels_zyx) == 0:
        return LesionAtTimepoint(lesion_id, timepoint, False, None, source=source,
                                 message=message or "not found at this timepoint; place a prompt on it to re-prompt")
    centre_zyx = voxels_zyx.mean(axis=0)
    volume_ml = len(voxels_zyx) * float(np.prod(image.spacing_xyz)) / 1000.0
    return LesionAtTimepoint(lesion_id, timepoint, True, mask.astype(np.uint8), volume_ml,
                             tuple(image.index_zyx_to_lps(centre_zyx)), tuple(image.index_zyx_to_ras(centre_zyx)),
                             source, message)


def own_box(mask_zyx: np.ndarray, region, shape_zyx) -> BoxPrompt:
    """The bounding box (z, y, x voxels of the scan) of a mask on `region`, grown by TRACK_BOX_MARGIN_VOXELS within
    the scan."""
    offset = np.asarray([r.start or 0 for r in region])
    first, last = inclusive_bbox(mask_zyx)
    lo = np.maximum(first + offset - TRACK_BOX_MARGIN_VOXELS, 0)
    hi = np.minimum(last + offset + 1 + TRACK_BOX_MARGIN_VOXELS, shape_zyx)
    return BoxPrompt(tuple(map(float, lo)), tuple(map(float, hi)))


def image_index_to_window(index_zyx, pre: PreprocessedImage) -> np.ndarray:
    """Original (z, y, x) index -> continuous index in a preprocessed window (nnU-Net's shape-ratio mapping)."""
    return (np.asarray(index_zyx, float) - pre.nonzero_start_zyx) * pre.scale_zyx - pre.window_start_zyx


def fingerprint(image: ImageVolume) -> str:
    """Content hash of voxels and geometry: the cache key of preprocessing and registrations."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(image.array).view(np.uint8).data)
    digest.update(repr((image.array.dtype.str, image.shape_zyx, image.spacing_xyz, image.origin_lps,
                        image.direction_lps.round(6).tolist())).encode())
    return digest.hexdigest()


# --- geometry of preprocessed scans -------------------------------------------------------------------------------
def preprocessed_volume(pre: PreprocessedImage, original: ImageVolume, z_window: slice) -> ImageVolume:
    """The (z-windowed) preprocessed array with its true physical geometry (nnU-Net resampling maps new voxel i to
    original index start + (i + 0.5) * ratio - 0.5), so geometry-aware registrations see real millimetres."""
    ratio_zyx = 1.0 / pre.scale_zyx
    first_zyx = pre.nonzero_start_zyx + 0.5 * ratio_zyx - 0.5 + np.array([z_window.start, 0, 0]) * ratio_zyx
    spacing_zyx = np.asarray(original.spacing_zyx) * ratio_zyx
    return ImageVolume(pre.data[0, z_window], spacing_xyz=tuple(spacing_zyx[::-1]),
                       origin_lps=tuple(original.index_zyx_to_lps(first_zyx)), direction_lps=original.direction_lps)


def flipped_volume(volume: ImageVolume, axes_zyx: tuple[int, ...]) -> ImageVolume:
    """Mirror array axes and adjust the geometry so every voxel keeps its physical position."""
    if not axes_zyx:
        return volume
    last_zyx = np.zeros(3)
    direction = volume.direction_lps.copy()
    for axis in axes_zyx:
        last_zyx[axis] = volume.shape_zyx[axis] - 1
        direction[:, 2 - axis] *= -1  # direction columns are (x, y, z) = array axes (2, 1, 0)
    return ImageVolume(np.flip(volume.array, axes_zyx), volume.spacing_xyz,
                       tuple(volume.index_zyx_to_lps(last_zyx)), direction)


def oriented_like(volume: ImageVolume, direction_lps: np.ndarray) -> tuple[ImageVolume, MaskOnGrid]:
    """`volume` stored along the axes of `direction_lps`, every voxel at its physical place, and the function that
    maps a mask on it back onto `volume`'s grid. An axis permutation or flip is undone losslessly (a transposed and
    flipped view); other rotations are resampled (see resampled_along). Same axes: `volume` itself."""
    cosines = volume.direction_lps.T @ np.asarray(direction_lps)  # [i, j]: volume axis i . wanted axis j (x, y, z)
    source_xyz = np.abs(cosines).argmax(axis=0)
    matched = cosines[source_xyz, [0, 1, 2]]
    off_deg = np.degrees(np.arccos(np.clip(np.abs(matched), 0.0, 1.0)))
    if len(set(source_xyz.tolist())) < 3 or off_deg.max() > ALIGNED_AXES_TOLERANCE_DEG:
        return resampled_along(volume, direction_lps, source_xyz)
    axes_zyx = tuple(2 - int(source_xyz[2 - axis]) for axis in range(3))  # array axis a <- volume's array axis
    flips_zyx = tuple(2 - j for j in range(3) if matched[j] < 0)
    if axes_zyx == (0, 1, 2) and not flips_zyx:
        return volume, lambda mask: mask
    transposed = ImageVolume(np.transpose(volume.array, axes_zyx), np.asarray(volume.spacing_xyz)[source_xyz],
                             volume.origin_lps, volume.direction_lps[:, source_xyz], volume.name)
    inverse = tuple(np.argsort(axes_zyx).tolist())
    return flipped_volume(transposed, flips_zyx), lambda mask: np.transpose(np.flip(mask, flips_zyx), inverse)


def resampled_along(volume: ImageVolume, direction_lps: np.ndarray,
                    source_xyz: np.ndarray) -> tuple[ImageVolume, MaskOnGrid]:
    """`volume` resampled (linear, outside = its minimum) onto a grid along the axes of `direction_lps` that covers
    its whole field of view, axis j with the spacing of its axis `source_xyz[j]`; masks go back by nearest neighbour."""
    corners_zyx = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in volume.shape_zyx])))
    along = volume.index_zyx_to_lps(corners_zyx) @ np.asarray(direction_lps)  # corners on the wanted axes (x, y, z)
    spacing_xyz = np.asarray(volume.spacing_xyz)[source_xyz]
    size_xyz = np.maximum(np.ceil((along.max(axis=0) - along.min(axis=0)) / spacing_xyz - 1e-6), 1).astype(int)
    grid = ImageVolume(np.broadcast_to(np.zeros((), np.uint8), tuple(size_xyz[::-1])), spacing_xyz,
                       np.asarray(direction_lps) @ (along.min(axis=0) + spacing_xyz / 2), direction_lps, volume.name)
    array = resampled_onto(volume.to_sitk(), grid, sitk.sitkLinear, float(volume.array.min()), sitk.sitkFloat32)
    return (grid.with_array(array),
            lambda mask: resampled_onto(grid.to_sitk(np.asarray(mask, np.uint8)), volume, sitk.sitkNearestNeighbor,
                                        0.0, sitk.sitkUInt8))


def progress_part(progress: Progress, part: int, parts: int) -> Progress:
    """The `part`-th of `parts` equal shares of a progress range, so that successive parts never go backwards."""
    return lambda fraction, stage: progress((part + fraction) / parts, stage)


class BoundedCache(OrderedDict):
    """Least-recently-used cache: a long Slicer session must not keep every scan and registration alive."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


@dataclass
class TrackScan:
    image: ImageVolume
    pre: PreprocessedImage
    key: str


class TrackFold:
    """One fold of a tracking model: its registration and its U-Net."""

    def __init__(self, model: ModelFolder, weights: dict, registration: Registration, settings: PredictionSettings):
        unet_weights = {k[len(UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(UNET_PREFIX)} or {
            k: v for k, v in weights.items() if not k.startswith(REGISTRATION_PREFIX) and k != "unet_patch_size"}
        patch = weights.get("unet_patch_size")
        self.patch_size_zyx = tuple(int(p) for p in patch.tolist()) if patch is not None else model.patch_size_zyx
        self.registration = registration
        self.predictor = PatchPredictor(model.build_network(), {0: unet_weights}, self.patch_size_zyx, settings)


class Tracker:
    """Tracks lesions from a baseline through any number of follow-ups (official-format model root)."""

    def __init__(self, model_root: str | Path, device="auto", preset: str = "fast", folds=None,
                 use_tta: bool | None = None, registration: str | Registration = "auto",
                 segmenter: Segmenter | None = None, segmentation_mode: str = "roi", mode: str = "auto",
                 official_list_prompts: bool = False, cpu_bf16: bool = False, point_search: bool = True,
                 box_refinement: bool = True, point_extent: bool = True, box_fine_grid: bool = True):
        """`point_search`, `point_extent`, `box_refinement` and `box_fine_grid` apply to baseline clicks and boxes
        (see Segmenter; a given `segmenter` brings its own settings); `box_refinement` also refines the follow-ups'
        answers in roi mode, when the model's track task uses its box network."""
        check_preset(preset)
        if mode not in TRACKING_MODES:
            raise LesionLocatorError(f"Unknown tracking mode '{mode}'; use one of {TRACKING_MODES}.")
        self.model_root = Path(model_root)
        self.device = resolve_device(device)
        self.use_tta = PRESETS[preset]["use_tta"] if use_tta is None else bool(use_tta)
        folder = resolve_task_folder(self.model_root, "track")
        self.model = load_checkpoint_folder(folder, choose_folds(folder, preset, folds))
        self.preprocessor = Preprocessor(self.model)
        registrations = [self._registration_for(registration, w) for w in self.model.fold_weights.values()]
        # exact: the official pipeline (scans stretched to the network grid, mirrored registrations); roi: a
        # geometry-aware registration on the original scans and the U-Net on a window around the warped lesion
        self.mode = mode if mode != "auto" else ("exact" if registrations[0].name == "gradicon" else "roi")
        if official_list_prompts and self.mode != "exact":
            raise LesionLocatorError("official_list_prompts reproduces the official pipeline: use mode='exact' "
                                     "(a model with a registration network).")
        if self.mode == "roi" and registrations[0].name == "gradicon":
            raise LesionLocatorError("The registration network (gradicon) registers scans preprocessed with the Track "
                                     "plans, as mode='exact' does: use mode='exact' (or 'auto') with it, or "
                                     "registration='classical' for mode='roi'.")
        self.official_list_prompts = official_list_prompts
        settings = PredictionSettings(self.device, use_tta=self.use_tta and self.mode == "roi", mirror_axes=(0, 1, 2),
                                      cpu_bf16=cpu_bf16)
        self.folds = [TrackFold(self.model, weights, reg, settings)
                      for weights, reg in zip(self.model.fold_weights.values(), registrations)]
        self.segmenter = segmenter or Segmenter(self.model_root, device=self.device, preset=preset, folds=folds,
                                                use_tta=use_tta, mode=segmentation_mode, cpu_bf16=cpu_bf16,
                                                point_search=point_search, box_refinement=box_refinement,
                                                point_extent=point_extent, box_fine_grid=box_fine_grid)
        self.box_refiner = self._track_refiner() if box_refinement and self.mode == "roi" else None
        self._scans = BoundedCache(MAX_CACHED_SCANS)
        passes = len(self.folds) * len(self.mirror_combinations)  # registrations per scan pair
        self._deformations = BoundedCache(passes * max(1, MAX_CACHED_REGISTRATIONS // passes))
        self.registrations_computed = 0

    @classmethod
    def from_folder(cls, model_root: str | Path, **options) -> "Tracker":
        return cls(model_root, **options)

    def _track_refiner(self) -> BoxRefiner | None:
        """The manifest's box refinement when the track task uses the box network it was fitted for."""
        manifest = read_model_manifest(self.model_root)
        tasks = manifest.get("tasks", {})
        if tasks.get("track") is None or tasks.get("track") != tasks.get("box"):
            return None
        return BoxRefiner.from_manifest(manifest, str(self.model_root))

    def _registration_for(self, requested: str | Registration, fold_weights: dict) -> Registration:
        """A given Registration object, or one made by name ('auto': the checkpoint's network if it has one,
        else what the model's manifest names, else classical)."""
        if isinstance(requested, Registration):
            return requested
        has_network = any(k.startswith(REGISTRATION_PREFIX) for k in fold_weights)
        name = requested
        if requested == "auto":
            name = "gradicon" if has_network else read_model_manifest(self.model_root).get("registration", "classical")
        if name == "gradicon" and not has_network:
            raise CheckpointError(f"{self.model.path} has no registration network; use registration='classical'.")
        return make_registration(name, fold_weights if has_network else None, self.device)

    @property
    def mirror_combinations(self) -> list[tuple[int, ...]]:
        """The official tracking TTA: every subset of the three spatial axes (8 passes, each registered), whatever
        the checkpoint says. In roi mode mirroring happens inside the U-Net patch only."""
        if not self.use_tta or self.mode == "roi":
            return [()]
        return [c for n in range(4) for c in itertools.combinations((0, 1, 2), n)]

    # --- caches ------------------------------------------------------------------------------------------------
    def scan(self, image: ImageVolume) -> TrackScan:
        key = fingerprint(image)
        if key not in self._scans:
            self._scans[key] = TrackScan(image, self.preprocessor.preprocess(image), key)
        return self._scans[key]

    def deformation(self, earlier: TrackScan, later: TrackScan, windows, fold: int, axes) -> Deformation:
        key = (earlier.key, later.key, fold, axes)
        if key not in self._deformations:
            moving = flipped_volume(preprocessed_volume(earlier.pre, earlier.image, windows[0]), axes)
            fixed = flipped_volume(preprocessed_volume(later.pre, later.image, windows[1]), axes)
            self._deformations[key] = self.folds[fold].registration.register(moving, fixed)
            self.registrations_computed += 1
        return self._deformations[key]

    def clear_cache(self) -> None:
        self._scans.clear()
        self._deformations.clear()

    # --- one step ----------------------------------------------------------------------------------------------
    def track_step(self, earlier: ImageVolume, later: ImageVolume, masks: dict[int, np.ndarray],
                   progress: Progress | None = None, cancel_event: threading.Event | None = None,
                   timepoint: int = 1, outside_labelled: frozenset[int] = frozenset()) -> dict[int, LesionAtTimepoint]:
        """Masks of the earlier scan (on its grid) -> each lesion on the later scan. Lesions in `outside_labelled`
        get the official list-path prompt (see the module docstring; exact mode only)."""
        report = progress or (lambda fraction, stage: None)
        earlier, later = without_nan(earlier), without_nan(later)  # NaN would spread over the whole preprocessed scan
        for lesion_id, mask in masks.items():
            if tuple(mask.shape) != earlier.shape_zyx:
                raise PromptError(f"Lesion {lesion_id}: mask shape {mask.shape} is not the earlier scan's {earlier.shape_zyx}.")
        if self.mode == "roi":
            return self._track_step_roi(earlier, later, masks, report, cancel_event, timepoint)
        report(0.0, "preprocessing")
        # the network registers arrays, not physical space: the later scan is stored along the earlier one's axes
        aligned, to_later_grid = oriented_like(later, earlier.direction_lps)
        scan0, scan1 = self.scan(earlier), self.scan(aligned)
        check_cancel(cancel_event)
        prompts_pre = self._masks_in_preprocessed_space(
            {k: m for k, m in masks.items() if k not in outside_labelled}, scan0)
        prompts_pre.update(self._official_list_prompts({k: m for k, m in masks.items() if k in outside_labelled}, scan0))
        too_small = {k for k, prompt in prompts_pre.items() if not np.any(prompt > 0)}
        windows = z_alignment_windows(scan0.pre.data[0], scan1.pre.data[0])
        window_shape = scan1.pre.data[0, windows[1]].shape
        sums = {lesion_id: np.zeros(window_shape, np.float32) for lesion_id in masks}
        counts = dict.fromkeys(masks, 0)
        passes = [(fold, axes) for fold in range(len(self.folds)) for axes in self.mirror_combinations]
        for number, (fold, axes) in enumerate(passes):
            check_cancel(cancel_event)
            report(number / len(passes), f"registering {number + 1}/{len(passes)}")
            deformation = self.deformation(scan0, scan1, windows, fold, axes)
            fixed = np.flip(scan1.pre.data[:, windows[1]], tuple(a + 1 for a in axes)) if axes else scan1.pre.data[:, windows[1]]
            for lesion_id, prompt in prompts_pre.items():
                if lesion_id in too_small:
                    continue
                check_cancel(cancel_event)
                moving = np.flip(prompt[windows[0]], axes) if axes else prompt[windows[0]]
                warped = deformation.warp_mask(moving > 0)
                if not np.any(warped):
                    continue
                if lesion_id in outside_labelled:  # nearest-neighbour warping moves each label's voxels independently
                    warped = warped.astype(np.int8) - deformation.warp_mask(moving < 0).astype(np.int8)
                difference = self._unet_difference(self.folds[fold], np.ascontiguousarray(fixed), warped)
                sums[lesion_id] += np.flip(difference, axes) if axes else difference
                counts[lesion_id] += 1
        report(0.95, "resampling")
        results = {}
        for lesion_id in masks:
            if counts[lesion_id] == 0:
                results[lesion_id] = lesion_record(lesion_id, timepoint, later, None, "tracked",
                                                   NOT_FOUND_TOO_SMALL if lesion_id in too_small else NOT_FOUND_MOVED_OUT)
                continue
            mask = to_later_grid(self._to_original(sums[lesion_id] / counts[lesion_id], scan1, windows[1]))
            results[lesion_id] = lesion_record(lesion_id, timepoint, later, mask, "tracked",
                                               "" if np.any(mask) else "not found: the model saw no lesion where it moved to")
        report(1.0, "done")
        return results

    def _track_step_roi(self, earlier: ImageVolume, later: ImageVolume, masks: dict[int, np.ndarray], report,
                        cancel_event, timepoint: int) -> dict[int, LesionAtTimepoint]:
        """Register the original scans (once per pair), warp each mask onto the later scan, then segment it there
        with the U-Net on a window around the warped mask: nothing is resampled beyond that window."""
        report(0.0, "registering")
        key = (fingerprint(earlier), fingerprint(later), "roi")
        if key not in self._deformations:
            self._deformations[key] = self.folds[0].registration.register(earlier, later)
            self.registrations_computed += 1
        deformation = self._deformations[key]
        results = {}
        for number, (lesion_id, mask) in enumerate(masks.items()):
            check_cancel(cancel_event)
            report(0.5 + 0.5 * number / len(masks), f"lesion {lesion_id}")
            near, near_region = deformation.warp_mask_near(np.asarray(mask > 0, np.uint8))
            if not np.any(near):
                results[lesion_id] = lesion_record(lesion_id, timepoint, later, None, "tracked", NOT_FOUND_MOVED_OUT)
                continue
            warped = np.zeros(later.shape_zyx, np.uint8)
            warped[near_region] = near
            found = self._segment_around(later, warped, near_region, cancel_event)
            results[lesion_id] = lesion_record(lesion_id, timepoint, later, found, "tracked",
                                               "" if np.any(found) else "not found: the model saw no lesion where it moved to")
        report(1.0, "done")
        return results

    def _segment_around(self, image: ImageVolume, warped: np.ndarray, near_region, cancel_event) -> np.ndarray:
        """The U-Net with the warped mask as prompt, one patch centred on it, on a preprocessed window only."""
        coords = np.argwhere(warped[near_region]) + [r.start for r in near_region]
        region = prompt_window(coords.min(axis=0).astype(float), coords.max(axis=0) + 1.0, image,
                               self.folds[0].patch_size_zyx, self.preprocessor.target_spacing_zyx)
        pre = self.preprocessor.preprocess_window(image, region)
        prompt = self.preprocessor.resample_mask_window(warped, pre)
        if not np.any(prompt):
            prompt = np.zeros(pre.shape_zyx, bool)
            centre_local = np.round(image_index_to_window(coords.mean(axis=0), pre)).astype(int)
            prompt[tuple(np.clip(centre_local, 0, np.asarray(pre.shape_zyx) - 1))] = True  # a lesion below one voxel
        centre = np.round(ndimage.center_of_mass(prompt)).astype(int)
        difference = np.zeros(pre.shape_zyx, np.float32)
        for fold in self.folds:
            check_cancel(cancel_event)
            logits, tile = fold.predictor.predict(pre.data, prompt.astype(np.float32), centre_zyx=centre)
            fold_difference = np.full(pre.shape_zyx, OUTSIDE_FG_MINUS_BG, np.float32)
            fold_difference[tile] = logits[1] - logits[0]
            difference += fold_difference / len(self.folds)
        values, original_region = self.preprocessor.window_to_original(difference, pre)
        mask = values > 0
        if self.box_refiner is not None and mask.any():
            check_cancel(cancel_event)
            values, original_region = self.box_refiner.refine(
                image.array, image.spacing_zyx, own_box(mask, original_region, image.shape_zyx),
                values.astype(np.float32), original_region)
            mask = values > 0
        found = np.zeros(image.shape_zyx, np.uint8)
        found[original_region] = mask
        return found

    def _masks_in_preprocessed_space(self, masks: dict[int, np.ndarray], scan: TrackScan) -> dict[int, np.ndarray]:
        """Each lesion mask resampled like nnU-Net resamples a label map, computed only on a window around it."""
        pre = scan.pre
        resampled = {}
        for lesion_id, mask in masks.items():
            coords = np.argwhere(mask[pre.nonzero_region])
            grid_mask = np.zeros(pre.grid_shape_zyx, bool)
            if coords.size:
                lo = np.floor(coords.min(axis=0) * pre.scale_zyx).astype(int) - WINDOW_MARGIN_VOXELS
                hi = np.ceil((coords.max(axis=0) + 1) * pre.scale_zyx).astype(int) + WINDOW_MARGIN_VOXELS
                window = tuple(slice(max(0, a), min(int(n), b)) for a, b, n in zip(lo, hi, pre.grid_shape_zyx))
                grid_mask[window] = self.preprocessor.resample_mask_window(mask, replace(pre, grid_region=window))
            resampled[lesion_id] = grid_mask
        return resampled

    def _official_list_prompts(self, masks: dict[int, np.ndarray], scan: TrackScan) -> dict[int, np.ndarray]:
        """Each lesion as the official list path preprocesses its mask file: 1 in the lesion, -1 outside the scan's
        body (nnU-Net's crop_to_nonzero label, found once for all lesions), resampled with the plans' segmentation
        resampling (int8 grid)."""
        if not masks:
            return {}
        empty = np.zeros((1, *scan.image.shape_zyx), np.int8)
        _, outside, bbox = crop_to_nonzero(scan.image.array[None], empty)
        crop = tuple(slice(lo, hi) for lo, hi in bbox)
        return {k: self.preprocessor.resample_segmentation(np.where(mask[crop] > 0, 1, outside[0]).astype(np.int8),
                                                           scan.image.spacing_zyx, scan.pre.grid_shape_zyx)
                for k, mask in masks.items()}

    def _unet_difference(self, fold: TrackFold, fixed_czyx: np.ndarray, warped_zyx: np.ndarray) -> np.ndarray:
        """One U-Net patch centred on the mean position of the warped prompt's non-zero voxels (for a binary mask:
        its centre of mass), rounded; background elsewhere."""
        centre = np.round(np.argwhere(warped_zyx).mean(axis=0)).astype(int)
        logits, region = fold.predictor.predict(fixed_czyx, warped_zyx.astype(np.float32), centre_zyx=centre)
        difference = np.full(fixed_czyx.shape[1:], OUTSIDE_FG_MINUS_BG, np.float32)
        difference[region] = logits[1] - logits[0]
        return difference

    def _to_original(self, difference_window: np.ndarray, scan: TrackScan, z_window: slice) -> np.ndarray:
        """Back-resample the logit difference onto the original grid; only the window around the U-Net patch is
        computed, since elsewhere it is the constant background value and stays background."""
        mask = np.zeros(scan.image.shape_zyx, np.uint8)
        if np.all(difference_window == OUTSIDE_FG_MINUS_BG):  # background everywhere: nothing to resample
            return mask
        difference = np.full(scan.pre.grid_shape_zyx, OUTSIDE_FG_MINUS_BG, np.float32)
        difference[z_window] = difference_window
        values, region = self.preprocessor.changed_window_to_original(difference, scan.pre, OUTSIDE_FG_MINUS_BG)
        mask[region] = values > 0
        return mask

    # --- chains ------------------------------------------------------------------------------------------------
    def track(self, timepoints: list[ImageVolume], prompts: dict[int, Prompt], progress: Progress | None = None,
              cancel_event: threading.Event | None = None,
              reprompts: dict[int, dict[int, Prompt]] | None = None) -> TrackingResult:
        """Baseline prompts (point, box or mask) -> every lesion at every timepoint. `reprompts[t][id]` re-prompts
        a lesion at timepoint t (it is segmented there, and tracking goes on from that result)."""
        if len(timepoints) < 1:
            raise LesionLocatorError("Give at least one timepoint (the baseline).")
        report = progress or (lambda fraction, stage: None)
        steps = len(timepoints)
        computed_before = self.registrations_computed
        lesions: dict[int, list[LesionAtTimepoint]] = {lesion_id: [] for lesion_id in prompts}
        from_instance_map = {k for k, p in prompts.items() if isinstance(p, MaskPrompt) and p.from_instance_map}
        for t, image in enumerate(timepoints):
            check_cancel(cancel_event)
            stage = lambda fraction, text, t=t: report((t + fraction) / steps, f"timepoint {t + 1}/{steps}: {text}")
            prompted = dict(prompts) if t == 0 else dict((reprompts or {}).get(t, {}))
            for lesion_id in prompted:  # a new lesion first prompted at a follow-up
                lesions.setdefault(lesion_id, [LesionAtTimepoint(lesion_id, earlier, False, source="new",
                                                                 message="first prompted at a later timepoint")
                                               for earlier in range(t)])
            by_source, current = self._sources(t, image, lesions, set(prompted))
            # the prompted lesions and each source share the timepoint's progress
            parts = int(bool(prompted)) + len(by_source)
            if prompted:
                current.update(self._prompted(t, image, prompted, progress_part(stage, 0, parts), cancel_event))
            for part, (source, masks) in enumerate(sorted(by_source.items()), start=parts - len(by_source)):
                current.update(self._tracked_from(source, t, timepoints, masks, from_instance_map,
                                                  progress_part(stage, part, parts), cancel_event))
            for lesion_id, record in current.items():
                lesions[lesion_id].append(record)
        report(1.0, "done")
        return TrackingResult(list(timepoints), lesions, self.registrations_computed - computed_before)

    def _prompted(self, t: int, image: ImageVolume, prompts: dict[int, Prompt], stage, cancel_event) -> dict:
        if not prompts:
            return {}
        direct = {k: v for k, v in prompts.items() if isinstance(v, MaskPrompt)}
        to_segment = {k: v for k, v in prompts.items() if k not in direct}
        result = self.segmenter.segment(image, to_segment, stage, cancel_event) if to_segment else None
        records = {}
        for lesion_id in prompts:
            if lesion_id in direct:
                mask, message = self._checked_mask(direct[lesion_id], image)
            else:
                mask, message = result.masks.get(lesion_id), result.errors.get(lesion_id, "")
            records[lesion_id] = lesion_record(lesion_id, t, image, mask, "prompted", message)
        return records

    @staticmethod
    def _checked_mask(prompt: MaskPrompt, image: ImageVolume) -> tuple[np.ndarray | None, str]:
        """A mask prompt used as that timepoint's mask, or why it cannot be (empty, another grid): a user's mistake,
        not a lesion the model did not find."""
        try:
            return validate_prompt(prompt, image.shape_zyx).mask, ""
        except PromptError as error:
            return None, str(error)

    @staticmethod
    def _sources(t: int, image: ImageVolume, lesions, prompted: set) -> tuple[dict[int, dict[int, np.ndarray]], dict]:
        """The lesions not prompted at t by the last timepoint where each was found ({source: {id: mask}}), and the
        records of those found at no earlier timepoint."""
        by_source: dict[int, dict[int, np.ndarray]] = {}
        records = {}
        for lesion_id, history in lesions.items():
            if lesion_id in prompted or t == 0:
                continue
            found = [r for r in history if r.found]
            if not found:
                records[lesion_id] = lesion_record(lesion_id, t, image, None, "tracked",
                                                   "not found at any earlier timepoint; prompt it here")
                continue
            by_source.setdefault(found[-1].timepoint, {})[lesion_id] = found[-1].mask
        return by_source, records

    def _tracked_from(self, source: int, t: int, timepoints, masks: dict[int, np.ndarray], from_instance_map: set,
                      stage, cancel_event) -> dict:
        """The lesions found last at `source`, tracked to t."""
        # the official tracker reads every lesion from its own file except those of a baseline instance map
        list_path = frozenset(k for k in masks if source > 0 or k not in from_instance_map)
        return self.track_step(timepoints[source], timepoints[t], masks, stage, cancel_event, t,
                               list_path if self.official_list_prompts else frozenset())
