"""Procedural CT phantoms with organ labels: a torso (fat, muscle, lungs with vessels, liver, kidneys, aorta,
spine, ribs) and a head (scalp, skull with diploe, CSF, grey/white matter, ventricles).

Coordinates are physical LPS mm centred on the phantom (x to the patient's left, y posterior, z superior). The
grid spacing, the in-plane axis flips and every size and intensity are drawn at random.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..image import ImageVolume
from .backgrounds import LABELS, Background
from .fields import random_fourier_field

MAX_PHANTOM_VOXELS = 6_000_000


def _grid(rng: np.random.Generator, half_extent_mm: np.ndarray, spacing_xyz: np.ndarray, z_range_mm: tuple[float, float],
          max_voxels: int):
    """Phantom grid (random in-plane flips), LPS coordinate vectors per voxel axis (z, y, x) and the geometry."""
    extent = np.array([2 * half_extent_mm[0], 2 * half_extent_mm[1], z_range_mm[1] - z_range_mm[0]])
    spacing = spacing_xyz.copy()
    while np.prod(np.ceil(extent / spacing)) > max_voxels:
        spacing *= [1.1, 1.1, 1.0 if spacing[2] >= 2 * spacing[0] else 1.1]
    size_xyz = np.ceil(extent / spacing).astype(int)
    signs = np.array([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0])
    low = np.array([-half_extent_mm[0], -half_extent_mm[1], z_range_mm[0]])
    # the first voxel sits at the low end of each axis walked in its direction
    origin = np.where(signs > 0, low + spacing / 2, low + extent - spacing / 2)
    coords = [origin[axis] + signs[axis] * spacing[axis] * np.arange(size_xyz[axis]) for axis in range(3)]
    z = coords[2][:, None, None]
    y = coords[1][None, :, None]
    x = coords[0][None, None, :]
    geometry = dict(spacing_xyz=tuple(spacing), origin_lps=tuple(origin), direction_lps=np.diag(signs))
    return (z, y, x), tuple(int(n) for n in size_xyz[::-1]), geometry


def _ellipsoid(z, y, x, center, axes) -> np.ndarray:
    return ((x - center[0]) / axes[0]) ** 2 + ((y - center[1]) / axes[1]) ** 2 + ((z - center[2]) / axes[2]) ** 2 <= 1


def _finish(rng: np.random.Generator, hu: np.ndarray, labels: np.ndarray, geometry: dict, kind: str, name: str,
            body_region: str) -> Background:
    """Scanner-like noise and resolution, then the Background."""
    noise = ndimage.gaussian_filter(rng.normal(size=hu.shape), 0.6)
    hu = hu + noise * (rng.uniform(8, 25) / noise.std())
    hu = ndimage.gaussian_filter(hu, rng.uniform(0.4, 0.8))
    image = ImageVolume(hu.astype(np.float32), name=name or kind, **geometry)
    return Background(name or kind, image, "CT", body_region, site_labels=labels, labels_complete=True)


def make_body_phantom(rng: np.random.Generator, name: str = "", max_voxels: int = MAX_PHANTOM_VOXELS) -> Background:
    a, b, height = rng.uniform(110, 160), rng.uniform(80, 115), rng.uniform(120, 200)
    spacing = np.array([rng.uniform(0.9, 1.6)] * 2 + [rng.choice([1.0, 1.5, 2.0, 2.5, 3.0, 5.0])])
    (z, y, x), shape, geometry = _grid(rng, np.array([a + 15, b + 15]), spacing, (-height / 2, height / 2), max_voxels)
    labels = np.zeros(shape, np.uint8)
    hu = np.full(shape, -1000.0)

    def paint(mask, label, value, texture_std=0.0):
        mask = np.broadcast_to(mask, shape)
        labels[mask] = LABELS[label]
        hu[mask] = value
        if texture_std:
            points = np.stack(np.broadcast_arrays(x, y, z), axis=-1)[mask]
            hu[mask] += random_fourier_field(rng, texture_std, (10, 40))(points)

    a_z = a * (1 + 0.04 * np.sin(2 * np.pi * z / rng.uniform(150, 300) + rng.uniform(0, 2 * np.pi)))
    body_radius = (x / a_z) ** 2 + (y / b) ** 2
    fat = rng.uniform(8, 25)
    paint(body_radius <= 1, "fat", rng.uniform(-110, -80), 5)
    inner = (x / (a_z - fat)) ** 2 + (y / (b - fat)) ** 2
    paint(inner <= 1, "soft_tissue", rng.uniform(35, 55), 5)
    diaphragm = rng.uniform(-0.2, 0.3) * height / 2
    dome = diaphragm + 20 * (1 - (x / a) ** 2 - (y / b) ** 2)
    ribs = (inner > 0.72) & (inner <= 0.86) & (z > diaphragm - 40) & (y < 0.5 * b) & (
        np.cos(2 * np.pi * (z + 0.15 * y) / rng.uniform(22, 30)) > 0.55)
    paint(ribs, "bone", rng.uniform(500, 800))
    for side in (-1, 1):
        lung = _ellipsoid(z, y, x, (side * 0.48 * a, -0.05 * b, diaphragm + 60), (0.36 * a, 0.6 * b, 120)) & (z > dome)
        paint(lung & (inner <= 0.85), "lung", rng.uniform(-880, -820))
    _add_lung_vessels(rng, hu, labels, (z, y, x))
    paint(_ellipsoid(z, y, x, (0.12 * a, -0.25 * b, diaphragm + 45), (0.3 * a, 0.35 * b, 50)), "soft_tissue", 40.0, 5)
    liver_value = rng.uniform(50, 70) if rng.random() < 0.5 else rng.uniform(90, 120)
    liver = _ellipsoid(z, y, x, (-0.35 * a, -0.05 * b, diaphragm - 55), (0.5 * a, 0.65 * b, 75)) & (z < dome)
    paint(liver & (inner <= 0.9), "liver", liver_value, 6)
    for side in (-1, 1):
        paint(_ellipsoid(z, y, x, (side * 0.45 * a, 0.5 * b, diaphragm - 110), (25, 20, 50)), "soft_tissue",
              rng.uniform(25, 160))
    paint(((x - 0.08 * a) ** 2 + (y - 0.42 * b) ** 2 <= 11 ** 2), "soft_tissue", rng.uniform(40, 180))
    _add_spine(rng, hu, labels, (z, y, x), 0.65 * b, paint)
    return _finish(rng, hu, labels, geometry, "body_phantom", name, "body")


def _add_lung_vessels(rng: np.random.Generator, hu: np.ndarray, labels: np.ndarray, zyx) -> None:
    """Vessel-like lines in the lungs: where two smooth random fields are both near zero."""
    lung = labels == LABELS["lung"]
    if not np.any(lung):
        return
    z, y, x = zyx
    points = np.stack(np.broadcast_arrays(x, y, z), axis=-1)[lung]
    f1 = random_fourier_field(rng, 1.0, (25, 60))(points)
    f2 = random_fourier_field(rng, 1.0, (25, 60))(points)
    hu[lung] += 850 * np.exp(-(f1 ** 2 + f2 ** 2) / 0.02)


def _add_spine(rng, hu, labels, zyx, center_y, paint) -> None:
    z, y, x = zyx
    radius = rng.uniform(14, 20)
    period = rng.uniform(25, 32)
    axis_distance = np.sqrt(x ** 2 + (y - center_y) ** 2)
    disc = np.mod(z, period) < 6
    body = (axis_distance <= radius) & ~disc
    paint(body, "bone", rng.uniform(200, 350))
    paint(body & (axis_distance > radius - 2), "bone", rng.uniform(600, 900))
    paint((axis_distance <= radius) & disc, "soft_tissue", 70.0)
    spinous = (np.abs(x) < 5) & (y > center_y + radius) & (y < center_y + radius + 25) & ~disc
    paint(spinous, "bone", rng.uniform(400, 700))


def make_head_phantom(rng: np.random.Generator, name: str = "", max_voxels: int = MAX_PHANTOM_VOXELS) -> Background:
    a, b, c = rng.uniform(65, 78), rng.uniform(80, 95), rng.uniform(70, 85)
    spacing = np.array([rng.uniform(0.45, 1.0)] * 2 + [rng.choice([0.7, 1.0, 2.5, 5.0])])
    (z, y, x), shape, geometry = _grid(rng, np.array([a + 12, b + 12]), spacing, (-0.6 * c, c + 10), max_voxels)
    labels = np.zeros(shape, np.uint8)
    hu = np.full(shape, -1000.0)
    mean_axis = (a + b + c) / 3
    depth = (1 - np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)) * mean_axis  # ~mm below the skin
    scalp, skull = rng.uniform(3, 6), rng.uniform(5, 9)
    layers = [
        (depth >= 0, "soft_tissue", rng.uniform(25, 45)),
        (depth >= scalp, "bone", rng.uniform(1000, 1400)),
        ((depth >= scalp + skull / 3) & (depth < scalp + 2 * skull / 3), "bone", rng.uniform(500, 700)),
        (depth >= scalp + skull, "csf", rng.uniform(0, 10)),
        (depth >= scalp + skull + 2, "brain", rng.uniform(34, 42)),
        (depth >= scalp + skull + 5, "brain", rng.uniform(24, 30)),
    ]
    for mask, label, value in layers:
        mask = np.broadcast_to(mask, shape)
        labels[mask] = LABELS[label]
        hu[mask] = value
    brain = labels == LABELS["brain"]
    points = np.stack(np.broadcast_arrays(x, y, z), axis=-1)[brain]
    hu[brain] += random_fourier_field(rng, 2.0, (8, 30))(points)
    for side in (-1, 1):
        ventricle = np.broadcast_to(_ellipsoid(z, y, x, (side * 8, 0, 10), (6, 25, 12)), shape)
        labels[ventricle] = LABELS["csf"]
        hu[ventricle] = rng.uniform(0, 10)
    return _finish(rng, hu, labels, geometry, "head_phantom", name, "head")


def make_phantom(kind: str, rng: np.random.Generator, name: str = "", max_voxels: int = MAX_PHANTOM_VOXELS) -> Background:
    """A body or head phantom; `max_voxels` caps its size (coarser voxels), e.g. for fast tests."""
    if kind == "body_phantom":
        return make_body_phantom(rng, name, max_voxels)
    if kind == "head_phantom":
        return make_head_phantom(rng, name, max_voxels)
    raise ValueError(f"Unknown phantom '{kind}'; use 'body_phantom' or 'head_phantom'.")
