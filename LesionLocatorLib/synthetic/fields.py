"""Smooth random fields defined everywhere in physical space (random Fourier modes).

A field is a sum of cosines with random wave vectors, so it can be evaluated at any point (a follow-up's warped
voxel centres, a lesion's sub-voxel samples) without a grid, and its gradient has a known bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK_POINTS = 262_144  # points per evaluation block: bounds the (points x modes) temporary


@dataclass(frozen=True)
class FourierField:
    """f(p) = sum_j a_j cos(k_j . p + phi_j) for points p (..., 3) in mm; a_j has shape (modes,) or (modes, channels)."""

    wave_vectors_per_mm: np.ndarray  # (modes, 3), radians per mm
    phases: np.ndarray  # (modes,)
    amplitudes: np.ndarray  # (modes,) or (modes, channels)

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        points = np.asarray(points_mm, dtype=np.float64)
        flat = points.reshape(-1, 3)
        out_shape = points.shape[:-1] + self.amplitudes.shape[1:]
        result = np.empty((flat.shape[0],) + self.amplitudes.shape[1:], dtype=np.float64)
        for start in range(0, flat.shape[0], _CHUNK_POINTS):
            block = flat[start:start + _CHUNK_POINTS]
            result[start:start + _CHUNK_POINTS] = np.cos(block @ self.wave_vectors_per_mm.T + self.phases) @ self.amplitudes
        return result.reshape(out_shape)

    def gradient_bound(self) -> float:
        """Upper bound of |df/dp| (operator norm for vector fields): sum_j |a_j| |k_j|."""
        amplitude_norms = np.linalg.norm(self.amplitudes.reshape(len(self.phases), -1), axis=1)
        return float(np.sum(amplitude_norms * np.linalg.norm(self.wave_vectors_per_mm, axis=1)))

    def amplitude_bound(self) -> float:
        return float(np.sum(np.linalg.norm(self.amplitudes.reshape(len(self.phases), -1), axis=1)))

    def scaled(self, factor: float) -> "FourierField":
        return FourierField(self.wave_vectors_per_mm, self.phases, self.amplitudes * factor)


def random_directions(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` unit vectors uniformly distributed on the sphere, (count, 3)."""
    vectors = rng.normal(size=(count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def random_fourier_field(
    rng: np.random.Generator,
    std: float,
    wavelength_range_mm: tuple[float, float],
    modes: int = 12,
    channels: int | None = None,
) -> FourierField:
    """A zero-mean random field with standard deviation ~`std` and wavelengths in the given range (mm)."""
    wavelengths = rng.uniform(*wavelength_range_mm, size=modes)
    wave_vectors = random_directions(rng, modes) * (2 * np.pi / wavelengths)[:, None]
    phases = rng.uniform(0, 2 * np.pi, size=modes)
    shape = (modes,) if channels is None else (modes, channels)
    # a cosine with random phase has variance a^2 / 2; `modes` of them with E[a^2] = 2 std^2 / modes sum to std^2
    amplitudes = rng.normal(size=shape) * std * np.sqrt(2.0 / modes)
    return FourierField(wave_vectors, phases, amplitudes)
