"""Invertible spatial transforms between a follow-up and its baseline, in physical LPS mm.

Every transform maps follow-up points to baseline points (`pull`, what resampling needs) and back (`push`).
Smooth fields are inverted numerically by fixed-point iteration, which converges because their displacement
gradients are kept well below 1 (that also keeps the Jacobian determinant positive).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..image import ImageVolume
from .fields import FourierField, random_fourier_field

MAX_DISPLACEMENT_GRADIENT = 0.3  # |grad u| bound of smooth fields: invertible, Jacobian determinant >= 0.7^3
INVERSION_ITERATIONS = 60
INVERSION_TOLERANCE_MM = 1e-6


class Transform(Protocol):
    def pull(self, points_lps: np.ndarray) -> np.ndarray: ...

    def push(self, points_lps: np.ndarray) -> np.ndarray: ...


def invert_by_iteration(pull, targets: np.ndarray, iterations: int = INVERSION_ITERATIONS) -> np.ndarray:
    """Solve pull(q) = targets for q, for pulls of the form q + u(q) with |grad u| < 1 (a contraction)."""
    targets = np.asarray(targets, dtype=float)
    estimate = targets.copy()
    for _ in range(iterations):
        residual = targets - pull(estimate)
        estimate += residual
        if np.max(np.abs(residual), initial=0.0) < INVERSION_TOLERANCE_MM:
            break
    return estimate


@dataclass
class RigidTransform:
    """pull(q) = R (q - c) + c + t: rotation about `center_lps`, then translation."""

    rotation: np.ndarray
    center_lps: np.ndarray
    translation_mm: np.ndarray

    def pull(self, points_lps: np.ndarray) -> np.ndarray:
        return (points_lps - self.center_lps) @ self.rotation.T + self.center_lps + self.translation_mm

    def push(self, points_lps: np.ndarray) -> np.ndarray:
        return (points_lps - self.center_lps - self.translation_mm) @ self.rotation + self.center_lps


@dataclass
class SmoothDisplacement:
    """pull(q) = q + u(q) with u a smooth random field (mm); numerically inverted."""

    field: FourierField  # 3 channels: displacement along L, P, S

    def __post_init__(self) -> None:
        if self.field.gradient_bound() >= 1.0:
            raise ValueError("A smooth displacement needs |grad u| < 1 to stay invertible.")

    def pull(self, points_lps: np.ndarray) -> np.ndarray:
        return points_lps + self.field(points_lps)

    def push(self, points_lps: np.ndarray) -> np.ndarray:
        return invert_by_iteration(self.pull, points_lps)


@dataclass
class BreathingTransform:
    """Breathing-like motion: the body compressed along z (superior-inferior) about `z_reference_mm` and shifted
    anteriorly/posteriorly by an amount that ramps up smoothly over z (chest wall moves more than the pelvis)."""

    z_reference_mm: float
    compression: float  # relative z compression, |c| < 0.2
    ap_shift_mm: float
    ap_ramp_center_mm: float
    ap_ramp_width_mm: float

    def __post_init__(self) -> None:
        if abs(self.compression) >= 0.2 or self.ap_ramp_width_mm <= 0:
            raise ValueError("Breathing needs |compression| < 0.2 and a positive ramp width.")

    def _displacement(self, points_lps: np.ndarray) -> np.ndarray:
        z = points_lps[..., 2]
        displacement = np.zeros_like(points_lps)
        displacement[..., 2] = -self.compression * (z - self.z_reference_mm)
        displacement[..., 1] = self.ap_shift_mm / (1 + np.exp(-(z - self.ap_ramp_center_mm) / self.ap_ramp_width_mm))
        return displacement

    def pull(self, points_lps: np.ndarray) -> np.ndarray:
        return points_lps + self._displacement(points_lps)

    def push(self, points_lps: np.ndarray) -> np.ndarray:
        return invert_by_iteration(self.pull, points_lps)


@dataclass
class RadialGrowth:
    """Growth (factor > 1) or shrinkage of a lesion by `factor` in linear size, with mass effect around it.

    Inside the sphere of radius `factor * radius_mm` (follow-up) everything is scaled about the centre; outside,
    tissue is displaced so that volume is conserved (r_fu^3 = r_bl^3 + (f^3 - 1) R^3), which decays like 1/r^2.
    """

    center_lps: np.ndarray
    radius_mm: float  # must enclose the whole lesion
    factor: float

    def __post_init__(self) -> None:
        if not self.factor > 0 or not self.radius_mm > 0:
            raise ValueError("Growth needs a positive factor and radius.")

    def _remap(self, points_lps: np.ndarray, inner_scale: float, shell_sign: float, inner_radius: float) -> np.ndarray:
        offsets = points_lps - self.center_lps
        distance = np.linalg.norm(offsets, axis=-1, keepdims=True)
        volume_change = (self.factor ** 3 - 1) * self.radius_mm ** 3
        outer = np.cbrt(np.maximum(distance ** 3 + shell_sign * volume_change, 0.0))
        new_distance = np.where(distance <= inner_radius, distance * inner_scale, outer)
        scale = np.divide(new_distance, distance, out=np.full_like(distance, inner_scale), where=distance > 0)
        return self.center_lps + offsets * scale

    def pull(self, points_lps: np.ndarray) -> np.ndarray:
        return self._remap(points_lps, 1.0 / self.factor, -1.0, self.factor * self.radius_mm)

    def push(self, points_lps: np.ndarray) -> np.ndarray:
        return self._remap(points_lps, self.factor, 1.0, self.radius_mm)


@dataclass
class CompositeTransform:
    """Transforms applied in order to follow-up points: pull = T_n.pull(... T_1.pull(q))."""

    transforms: list = field(default_factory=list)

    def pull(self, points_lps: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            points_lps = transform.pull(points_lps)
        return points_lps

    def push(self, points_lps: np.ndarray) -> np.ndarray:
        for transform in reversed(self.transforms):
            points_lps = transform.push(points_lps)
        return points_lps


# --- random transforms -------------------------------------------------------------------------------------------
def random_rotation_matrix(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation about a random axis by an angle uniform in [-max_degrees, max_degrees] (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def random_smooth_displacement(rng: np.random.Generator, max_amplitude_mm: float,
                               wavelength_range_mm: tuple[float, float] = (80.0, 200.0),
                               modes: int = 8) -> SmoothDisplacement:
    """Elastic anatomy-like deformation: ~`max_amplitude_mm` at most, gradient kept below MAX_DISPLACEMENT_GRADIENT."""
    field_ = random_fourier_field(rng, 1.0, wavelength_range_mm, modes=modes, channels=3)
    field_ = field_.scaled(max_amplitude_mm / max(field_.amplitude_bound(), 1e-12))
    if field_.gradient_bound() > MAX_DISPLACEMENT_GRADIENT:
        field_ = field_.scaled(MAX_DISPLACEMENT_GRADIENT / field_.gradient_bound())
    return SmoothDisplacement(field_)


def random_breathing(rng: np.random.Generator, image: ImageVolume, max_compression: float = 0.04,
                     max_ap_shift_mm: float = 6.0) -> BreathingTransform:
    z_values = physical_extent(image)[:, 2]
    return BreathingTransform(
        z_reference_mm=float(rng.uniform(*z_values)),
        compression=float(rng.uniform(-max_compression, max_compression)),
        ap_shift_mm=float(rng.uniform(-max_ap_shift_mm, max_ap_shift_mm)),
        ap_ramp_center_mm=float(np.mean(z_values)),
        ap_ramp_width_mm=float(max(20.0, (z_values[1] - z_values[0]) / 4)),
    )


def physical_extent(image: ImageVolume) -> np.ndarray:
    """(2, 3) LPS lower and upper corners of the bounding box of the voxel centres."""
    corners = np.array([[z, y, x] for z in (0, image.shape_zyx[0] - 1) for y in (0, image.shape_zyx[1] - 1)
                        for x in (0, image.shape_zyx[2] - 1)], float)
    points = image.index_zyx_to_lps(corners)
    return np.stack([points.min(axis=0), points.max(axis=0)])


def image_center_lps(image: ImageVolume) -> np.ndarray:
    return image.index_zyx_to_lps((np.asarray(image.shape_zyx) - 1) / 2.0)


# --- dense fields --------------------------------------------------------------------------------------------
def grid_points_lps(grid: ImageVolume) -> np.ndarray:
    """Voxel centres of `grid` in LPS, shape (z, y, x, 3)."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in grid.shape_zyx], indexing="ij"), axis=-1)
    return grid.index_zyx_to_lps(index)


def displacement_field(transform: Transform, grid: ImageVolume) -> np.ndarray:
    """pull(q) - q at the voxel centres of `grid`, (z, y, x, 3) in LPS mm."""
    points = grid_points_lps(grid)
    return transform.pull(points.reshape(-1, 3)).reshape(points.shape) - points


def jacobian_determinant(displacement_zyx3: np.ndarray, grid: ImageVolume) -> np.ndarray:
    """det(d pull / d q) per voxel, from central differences of a displacement field sampled on `grid`."""
    spacing = grid.spacing_zyx
    # d u / d s_axis for the voxel axes (z, y, x) in mm along each axis' direction
    derivatives = [np.gradient(displacement_zyx3, spacing[axis], axis=axis) for axis in range(3)]
    axis_directions = [grid.direction_lps[:, 2], grid.direction_lps[:, 1], grid.direction_lps[:, 0]]
    jacobian = np.broadcast_to(np.eye(3), displacement_zyx3.shape + (3,)).copy()
    for derivative, direction in zip(derivatives, axis_directions):
        jacobian += derivative[..., :, None] * direction[None, :]
    return np.linalg.det(jacobian)
