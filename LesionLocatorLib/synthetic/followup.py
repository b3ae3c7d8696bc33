"""Synthetic follow-up scans of a synthetic case.

The follow-up is a new grid (other slice spacing and field of view) whose voxel centres are pulled back into the
baseline by rigid motion, breathing, a smooth elastic deformation and, around each lesion, a radial growth or
shrinkage with mass effect. The lesion-free background is resampled through that map; the lesions are re-rendered
analytically through it, so the follow-up masks are exact (blended weight >= 0.5) and a lesion's achieved growth is
exactly its factor (up to voxelization). Some lesions disappear and new ones appear. Then contrast, blur and noise
change. The ground truth gives, per lesion id, its status and its true centre in the follow-up (LPS mm).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..image import ImageVolume
from .cases import SyntheticCase, find_lesion, log_uniform, make_lesion, render_lesions
from .deformation import (
    CompositeTransform, RadialGrowth, RigidTransform, image_center_lps, random_breathing,
    random_rotation_matrix, random_smooth_displacement,
)
from .fields import random_directions
from .lesions import SyntheticLesion, correlated_noise, region_from_indices

PRESENT, DISAPPEARED, NEW = "present", "disappeared", "new"
_SAMPLING_CHUNK = 1_000_000


@dataclass
class FollowUpOptions:
    max_rotation_deg: float = 5.0
    max_shift_mm: float = 15.0
    elastic_amplitude_mm: float = 4.0
    breathing: bool = True  # body scans only
    growth_range: tuple[float, float] = (0.6, 1.6)  # linear size factor, log-uniform
    disappear_probability: float = 0.1
    new_lesion_range: tuple[int, int] = (0, 1)  # inclusive
    new_lesion_diameter_range_mm: tuple[float, float] = (5.0, 30.0)
    slice_spacing_choices_mm: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)  # empty: keep the baseline's
    in_plane_spacing_change: float = 0.1  # relative, +/-
    fov_scale_range: tuple[float, float] = (0.85, 1.1)
    contrast_range: tuple[float, float] = (0.95, 1.05)
    blur_sigma_range_mm: tuple[float, float] = (0.0, 1.0)
    extra_noise_range: tuple[float, float] = (0.0, 1.0)  # x the background's noise std

    @classmethod
    def static(cls) -> "FollowUpOptions":
        """No motion, same grid, no intensity change: only lesion growth (for exact growth checks)."""
        return cls(max_rotation_deg=0, max_shift_mm=0, elastic_amplitude_mm=0, breathing=False, disappear_probability=0,
                   new_lesion_range=(0, 0), slice_spacing_choices_mm=(), in_plane_spacing_change=0,
                   fov_scale_range=(1, 1), contrast_range=(1, 1), blur_sigma_range_mm=(0, 0), extra_noise_range=(0, 0))


@dataclass
class FollowUpLesion:
    lesion_id: int
    status: str  # present, disappeared or new
    center_lps: np.ndarray  # true centre in the follow-up: where the baseline centre went (for new: its centre)
    growth_factor: float  # linear size factor vs baseline (1 for new, 0 for disappeared)


@dataclass
class SyntheticFollowUp:
    image: ImageVolume
    instance_map: np.ndarray  # same ids as the baseline; new lesions get new ids
    lesions: list[FollowUpLesion]
    transform: CompositeTransform  # pull: follow-up LPS -> baseline LPS (growth included)
    lesion_models: dict[int, SyntheticLesion] = field(default_factory=dict, repr=False)  # incl. new lesions

    def lesion_mask(self, lesion_id: int) -> np.ndarray:
        return self.instance_map == lesion_id

    def lesion(self, lesion_id: int) -> FollowUpLesion:
        return find_lesion(self.lesions, lesion_id, "this follow-up")


def follow_up_grid(baseline: ImageVolume, rng: np.random.Generator, options: FollowUpOptions) -> ImageVolume:
    """A grid with the baseline's direction, other spacing and a scaled, shifted field of view (no voxels yet)."""
    spacing = np.asarray(baseline.spacing_xyz, float)
    spacing[:2] *= 1 + rng.uniform(-options.in_plane_spacing_change, options.in_plane_spacing_change)
    choices = [s for s in options.slice_spacing_choices_mm if 0.5 * spacing[2] <= s <= 2.5 * spacing[2]]
    if choices:
        spacing[2] = float(rng.choice(choices))
    extent = np.asarray(baseline.shape_zyx[::-1], float) * np.asarray(baseline.spacing_xyz)
    extent_new = extent * rng.uniform(*options.fov_scale_range, size=3)
    shift_mm = 0.5 * np.abs(extent - extent_new) * rng.uniform(-1, 1, size=3)
    size_xyz = np.maximum(np.round(extent_new / spacing).astype(int), 8)
    center = image_center_lps(baseline) + baseline.direction_lps @ shift_mm
    origin = center - baseline.direction_lps @ (spacing * (size_xyz - 1) / 2)
    return ImageVolume(np.zeros(size_xyz[::-1], np.float32), spacing_xyz=tuple(spacing), origin_lps=tuple(origin),
                       direction_lps=baseline.direction_lps)


def _anatomy_transforms(case: SyntheticCase, rng: np.random.Generator, options: FollowUpOptions) -> list:
    baseline = case.background.image
    transforms = [RigidTransform(random_rotation_matrix(rng, options.max_rotation_deg), image_center_lps(baseline),
                                 rng.uniform(-options.max_shift_mm, options.max_shift_mm, size=3))]
    if options.breathing and case.background.body_region == "body":
        transforms.append(random_breathing(rng, baseline))
    if options.elastic_amplitude_mm > 0:
        transforms.append(random_smooth_displacement(rng, options.elastic_amplitude_mm))
    return transforms


def _sample_background(case: SyntheticCase, grid: ImageVolume, transform: CompositeTransform) -> np.ndarray:
    """Baseline background through the pull-back, smoothed along z first when the follow-up slices are thicker."""
    baseline = case.background.image
    array = baseline.array
    thicker = grid.spacing_zyx[0] ** 2 - baseline.spacing_zyx[0] ** 2
    if thicker > 0:
        array = ndimage.gaussian_filter1d(array, np.sqrt(thicker) / 2.355 / baseline.spacing_zyx[0], axis=0)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.shape_zyx], indexing="ij"), -1).reshape(-1, 3)
    values = np.empty(len(index), np.float32)
    for start in range(0, len(index), _SAMPLING_CHUNK):
        points = transform.pull(grid.index_zyx_to_lps(index[start:start + _SAMPLING_CHUNK]))
        source = baseline.lps_to_index_zyx(points)
        values[start:start + _SAMPLING_CHUNK] = ndimage.map_coordinates(
            array, source.T, order=1, mode="constant", cval=case.background.outside_value)
    return values.reshape(grid.shape_zyx)


def _follow_up_region(lesion: SyntheticLesion, grid: ImageVolume, transform: CompositeTransform):
    """Follow-up voxels that can hold the lesion: its extent sphere pushed into the follow-up."""
    directions = np.vstack([random_directions(np.random.default_rng(0), 64), np.eye(3), -np.eye(3)])
    sphere = lesion.center_lps + directions * lesion.shape.extent_mm * 1.05
    index = grid.lps_to_index_zyx(transform.push(sphere))
    return region_from_indices(index, grid.shape_zyx, margin_voxels=2)


def _growth_factors(case: SyntheticCase, rng: np.random.Generator, options: FollowUpOptions,
                    given: dict[int, float] | None) -> dict[int, float]:
    factors = {}
    for lesion in case.lesions:
        if given is not None and lesion.lesion_id in given:
            factors[lesion.lesion_id] = float(given[lesion.lesion_id])
        elif rng.random() < options.disappear_probability:
            factors[lesion.lesion_id] = 0.0
        else:
            factors[lesion.lesion_id] = log_uniform(rng, options.growth_range)
    return factors


def _new_lesions(case: SyntheticCase, rng: np.random.Generator, options: FollowUpOptions) -> list[SyntheticLesion]:
    count = int(rng.integers(options.new_lesion_range[0], options.new_lesion_range[1] + 1))
    next_id = max([lesion.lesion_id for lesion in case.lesions], default=0) + 1
    taken = [(lesion.center_lps, lesion.shape.extent_mm * 1.7) for lesion in case.lesions]  # room for growth
    new = []
    sites = case.background.available_sites()
    for _ in range(count):
        diameter = log_uniform(rng, options.new_lesion_diameter_range_mm)
        lesion = make_lesion(case.background, rng, next_id, str(rng.choice(sites)), diameter, taken)
        if lesion is not None:
            new.append(lesion)
            taken.append((lesion.center_lps, lesion.shape.extent_mm))
            next_id += 1
    return new


def _intensity_changes(array: np.ndarray, grid: ImageVolume, case: SyntheticCase, rng: np.random.Generator,
                       options: FollowUpOptions) -> np.ndarray:
    """Other scanner settings: contrast (about 0 HU for CT, scale for MR), blur and extra noise."""
    array = array * rng.uniform(*options.contrast_range)
    if case.background.modality == "CT":
        array = array + rng.uniform(-10, 10)
    sigma_mm = rng.uniform(*options.blur_sigma_range_mm)
    if sigma_mm > 0:
        array = ndimage.gaussian_filter(array, sigma_mm / np.asarray(grid.spacing_zyx))
    noise_std = rng.uniform(*options.extra_noise_range) * case.background.noise_std()
    if noise_std > 0:
        array = array + correlated_noise(rng, array.shape, noise_std)
    return array.astype(np.float32)


def make_follow_up(case: SyntheticCase, rng: np.random.Generator, options: FollowUpOptions | None = None,
                   growth_factors: dict[int, float] | None = None) -> SyntheticFollowUp:
    """A follow-up of `case`. `growth_factors` (lesion id -> linear factor, 0 = disappeared) overrides the random
    ones for the ids it lists."""
    options = options or FollowUpOptions()
    factors = _growth_factors(case, rng, options, growth_factors)
    grid = follow_up_grid(case.background.image, rng, options)
    anatomy = _anatomy_transforms(case, rng, options)
    growths = [RadialGrowth(lesion.center_lps, lesion.shape.extent_mm, factors[lesion.lesion_id])
               for lesion in case.lesions if factors[lesion.lesion_id] > 0 and factors[lesion.lesion_id] != 1.0]
    transform = CompositeTransform(anatomy + growths)
    array = _sample_background(case, grid, transform)
    present = [lesion for lesion in case.lesions if factors[lesion.lesion_id] > 0]
    new = _new_lesions(case, rng, options)
    regions = {lesion.lesion_id: _follow_up_region(lesion, grid, transform) for lesion in present + new}
    drawable = [lesion for lesion in present + new if regions[lesion.lesion_id] is not None]
    instance_map, renders = render_lesions(array, grid, drawable, rng, case.background.noise_std(),
                                           pull=transform.pull, regions=regions)
    array = _intensity_changes(array, grid, case, rng, options)
    lesions = []
    new_ids = {lesion.lesion_id for lesion in new}
    for lesion in case.lesions + new:
        factor = factors.get(lesion.lesion_id, 1.0)
        status = NEW if lesion.lesion_id in new_ids else (PRESENT if factor > 0 else DISAPPEARED)
        if status != DISAPPEARED and lesion.lesion_id not in renders:
            status = DISAPPEARED  # moved out of the follow-up's field of view
        centre = transform.push(lesion.center_lps[None])[0]
        lesions.append(FollowUpLesion(lesion.lesion_id, status, centre, factor if status != DISAPPEARED else 0.0))
    image = grid.with_array(array, name=f"{case.name}_followup")
    models = {lesion.lesion_id: lesion for lesion in case.lesions + new}
    return SyntheticFollowUp(image, instance_map, lesions, transform, models)
