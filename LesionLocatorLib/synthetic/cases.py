"""Synthetic cases: a background scan with lesions inserted, their exact instance map, and validation sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..image import ImageVolume
from .backgrounds import Background, choose_lesion_center, load_background
from .lesions import (
    LesionRender, SyntheticLesion, blend_lesion, correlated_noise, random_appearance, random_lesion_shape,
    render_lesion,
)

DEFAULT_DIAMETER_RANGE_MM = (3.0, 80.0)
VALIDATION_DIAMETER_RANGE_MM = (5.0, 60.0)
# held-out backgrounds: other scans than the training ones (abdomen_ct, cranium_ct) and other phantom seeds
VALIDATION_BACKGROUNDS = ("chest_ct_dicom", "brain_atlas_ct", "body_phantom:90001", "head_phantom:90002",
                          "body_phantom:90003")
PointMap = Callable[[np.ndarray], np.ndarray]


@dataclass
class SyntheticCase:
    """A scan with inserted lesions. `instance_map` holds lesion ids; lesion k's mask is `instance_map == k`,
    i.e. the voxels where its blended weight is >= 0.5 (a later lesion wins where two touch)."""

    name: str
    image: ImageVolume
    instance_map: np.ndarray
    lesions: list[SyntheticLesion]
    background: Background
    renders: dict[int, LesionRender] = field(default_factory=dict, repr=False)

    def lesion_mask(self, lesion_id: int) -> np.ndarray:
        return self.instance_map == lesion_id

    def lesion(self, lesion_id: int) -> SyntheticLesion:
        return find_lesion(self.lesions, lesion_id, f"case '{self.name}'")


def find_lesion(lesions: Sequence, lesion_id: int, where: str):
    """The entry of `lesions` with this `lesion_id`."""
    for lesion in lesions:
        if lesion.lesion_id == lesion_id:
            return lesion
    raise KeyError(f"No lesion {lesion_id} in {where}.")


def log_uniform(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    """Log-uniform, e.g. diameters: small lesions as often per octave as large ones."""
    return float(np.exp(rng.uniform(np.log(value_range[0]), np.log(value_range[1]))))


def make_lesion(background: Background, rng: np.random.Generator, lesion_id: int, site: str, diameter_mm: float,
                taken: Sequence[tuple[np.ndarray, float]] = ()) -> SyntheticLesion | None:
    """A random lesion of `site` placed in `background` (None if the site has no room)."""
    center = choose_lesion_center(background, site, diameter_mm / 2, rng, list(taken))
    if center is None:
        return None
    voxel_size = float(np.mean(background.image.spacing_xyz))
    shape, shape_kind = random_lesion_shape(rng, center, diameter_mm, voxel_size_mm=voxel_size)
    local = background.local_value(center, diameter_mm / 2, site)
    appearance = random_appearance(rng, site, background.modality, local, diameter_mm / 2)
    return SyntheticLesion(lesion_id, site, shape, appearance, diameter_mm, shape_kind)


def render_lesions(array: np.ndarray, grid: ImageVolume, lesions: Sequence[SyntheticLesion], rng: np.random.Generator,
                   noise_std: float, pull: PointMap | None = None, regions: dict | None = None,
                   ) -> tuple[np.ndarray, dict[int, LesionRender]]:
    """Blend lesions into `array` (in place, on `grid`); returns the instance map and the renders.

    Inside each lesion, noise like the background's replaces the background's own noise, so a lesion is as noisy
    as the tissue around it."""
    instance_map = np.zeros(grid.shape_zyx, np.uint16)
    renders: dict[int, LesionRender] = {}
    for lesion in lesions:
        region = (regions or {}).get(lesion.lesion_id)
        render = render_lesion(lesion, grid, region=region, pull=pull)
        if render is None or not np.any(render.mask):
            continue
        noise = correlated_noise(rng, render.weight.shape, noise_std) if noise_std > 0 else None
        blend_lesion(array, render, noise)
        instance_map[render.region][render.mask] = lesion.lesion_id
        renders[lesion.lesion_id] = render
    return instance_map, renders


def make_case(background: Background, rng: np.random.Generator, lesion_count: int = 3,
              diameter_range_mm: tuple[float, float] = DEFAULT_DIAMETER_RANGE_MM, sites: Sequence[str] | None = None,
              name: str = "") -> SyntheticCase:
    """Insert up to `lesion_count` random lesions (ids 1..n) at random available sites of `background`."""
    available = [s for s in (sites or background.available_sites()) if s in background.available_sites()]
    if not available:
        raise ValueError(f"Background '{background.name}' has none of the sites {list(sites or [])} for lesions.")
    lesions: list[SyntheticLesion] = []
    for _ in range(lesion_count * 3):  # a site can be full: retry with another site or size
        if len(lesions) == lesion_count:
            break
        site = str(rng.choice(available))
        taken = [(lesion.center_lps, lesion.shape.extent_mm) for lesion in lesions]
        lesion = make_lesion(background, rng, len(lesions) + 1, site, log_uniform(rng, diameter_range_mm), taken)
        if lesion is not None:
            lesions.append(lesion)
    array = background.image.array.copy()
    instance_map, renders = render_lesions(array, background.image, lesions, rng, background.noise_std())
    kept = [lesion for lesion in lesions if lesion.lesion_id in renders]
    image = background.image.with_array(array, name=name or background.name)
    return SyntheticCase(name or background.name, image, instance_map, kept, background, renders)


@dataclass
class ValidationCase:
    """A synthetic case with the prompts a user would give: a click in each lesion's core and a box around it,
    in (z, y, x) voxel indices of `case.image` (boxes half-open); optionally a synthetic follow-up scan."""

    case: SyntheticCase
    points_zyx: dict[int, tuple[int, int, int]]
    boxes_zyx: dict[int, tuple[tuple[int, int, int], tuple[int, int, int]]]
    follow_up: object | None = None  # SyntheticFollowUp


def make_validation_set(seed: int, backgrounds: Sequence[str | Background] = VALIDATION_BACKGROUNDS,
                        cases_per_background: int = 2, lesions_per_case: int = 3,
                        diameter_range_mm: tuple[float, float] = VALIDATION_DIAMETER_RANGE_MM,
                        box_jitter_voxels: int = 2, with_follow_up: bool = False, data_root=None) -> list[ValidationCase]:
    """A reproducible held-out set: the same seed and backgrounds always give the same cases and prompts, with or
    without follow-ups.

    Backgrounds are names for `load_background` (real scans need the shared data) or Background objects."""
    from .followup import make_follow_up
    from .prompts import jittered_box, sample_point_prompt

    rng = np.random.default_rng(seed)
    cases: list[ValidationCase] = []
    for entry in backgrounds:
        background = entry if isinstance(entry, Background) else load_background(entry, data_root)
        for number in range(cases_per_background):
            case = make_case(background, rng, lesions_per_case, diameter_range_mm, name=f"{background.name}_{number}")
            spacing = case.image.spacing_zyx
            points = {lesion.lesion_id: sample_point_prompt(case.lesion_mask(lesion.lesion_id), rng, spacing)
                      for lesion in case.lesions}
            boxes = {lesion.lesion_id: jittered_box(case.lesion_mask(lesion.lesion_id), rng, box_jitter_voxels)
                     for lesion in case.lesions}
            # the follow-up draws from its own stream, so the cases and prompts do not depend on with_follow_up
            follow_up_rng = np.random.default_rng(rng.integers(2 ** 63))
            follow_up = make_follow_up(case, follow_up_rng) if with_follow_up else None
            cases.append(ValidationCase(case, points, boxes, follow_up))
    return cases
