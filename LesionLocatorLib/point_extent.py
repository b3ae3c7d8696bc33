"""Point extent: a small network that reads a click's surroundings and predicts the clicked lesion's bounding box.

The bundled point network does not size lesions: it answers a click with a blob of about its prompt ball's size. The
extent network looks at cubes of GRID^3 samples centred on the click, one per scale (by default 0.75, 1.5 and 3 mm
apart: fields of view of 24, 48 and 96 mm), and predicts the distance in mm from the click to each face of the
lesion's bounding box along the image's index axes, in FACES order. That box is answered as a user's box is (box
network and box refinement). Clicks whose predicted box is smaller than `min_size_mm` (the geometric mean of its
sides) go to the point search's cubes instead: `lesionlocator fit-point-extent` chooses that size on clicks it did
not fit on (for the bundled Lite model 0 mm: its predicted boxes beat the cubes at every size).

A model root asks for it in the point search's manifest entry:
`"point_search": {..., "extent": {"weights": "point_extent.pth", "scales_mm": [...], "grid": 32, "channels": 16,
"min_size_mm": 20.0}}`; `lesionlocator fit-point-extent` fits it (training/point_extent.py). Indices are (z, y, x)
voxels of the original image; sizes and spacings are in mm.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .errors import CheckpointError
from .prompts import BoxPrompt

ENTRY_KEY = "extent"
FACES = ("z-", "y-", "x-", "z+", "y+", "x+")  # distances from the click to the box faces, in mm
YX_SWAP = (0, 2, 1, 3, 5, 4)  # FACES with y and x exchanged
DEFAULT_SCALES_MM = (0.75, 1.5, 3.0)
DEFAULT_GRID = 32
DEFAULT_CHANNELS = 16
# The smallest face distance the network is taught (a lesion of one voxel still has half a voxel on each side).
MIN_FACE_MM = 0.5
FIX = "Run `lesionlocator fit-point-extent` again, or remove 'extent' from the manifest's point search."


def _block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(inputs, outputs, 3, stride, 1), nn.InstanceNorm3d(outputs, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class ExtentNetwork(nn.Module):
    """(batch, scales, GRID, GRID, GRID) normalized samples -> (batch, 6) log face distances (mm). Three stride-2
    stages bring GRID to GRID / 8 per axis; a fully connected head reads where things are."""

    def __init__(self, scales: int, grid: int = DEFAULT_GRID, channels: int = DEFAULT_CHANNELS):
        super().__init__()
        if grid % 8:
            raise ValueError(f"the extent network's grid must be a multiple of 8; got {grid}.")
        c = channels
        self.features = nn.Sequential(_block(scales, c, 2), _block(c, 2 * c, 1), _block(2 * c, 4 * c, 2),
                                      _block(4 * c, 4 * c, 1), _block(4 * c, 4 * c, 2), _block(4 * c, 2 * c, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * c * (grid // 8) ** 3, 128),
                                  nn.LeakyReLU(0.01, inplace=True), nn.Linear(128, len(FACES)))

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(samples))


def click_samples(image_zyx: np.ndarray, spacing_zyx, click_zyx, scales_mm, grid: int) -> np.ndarray:
    """(scales, grid, grid, grid) samples of the image (linear interpolation, edges repeated outwards) on cubes
    centred on the click, `scale` mm apart along each index axis (z, y, x)."""
    if image_zyx.dtype == np.float16:  # scipy's map_coordinates does not support it (only API users pass it)
        image_zyx = image_zyx.astype(np.float32)
    spacing = np.asarray(spacing_zyx, float)
    offsets = np.arange(grid) - (grid - 1) / 2.0
    cubes = []
    for scale in scales_mm:
        axes = [click_zyx[a] + offsets * scale / spacing[a] for a in range(3)]
        coordinates = np.stack(np.meshgrid(*axes, indexing="ij"))
        cubes.append(ndimage.map_coordinates(image_zyx, coordinates, order=1, mode="nearest", output=np.float32))
    return np.stack(cubes)


def box_from_faces(click_zyx, faces_mm: np.ndarray, spacing_zyx, shape_zyx) -> BoxPrompt:
    """The half-open voxel box whose faces lie `faces_mm` (FACES order) from the click, inside the image."""
    click, spacing = np.asarray(click_zyx, float), np.asarray(spacing_zyx, float)
    # a face at distance f from the click's centre: voxels whose centres lie within it
    lo = np.clip(np.round(click - faces_mm[:3] / spacing + 0.5), 0, np.asarray(shape_zyx) - 1)
    hi = np.clip(np.round(click + faces_mm[3:] / spacing + 0.5), lo + 1, shape_zyx)
    return BoxPrompt(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def faces_of_mask(mask_zyx: np.ndarray, spacing_zyx, click_zyx) -> np.ndarray:
    """The true FACES distances (mm) of a lesion mask's bounding box from a click: the training target."""
    voxels = np.argwhere(mask_zyx)
    lo, hi = voxels.min(axis=0) - 0.5, voxels.max(axis=0) + 0.5
    click, spacing = np.asarray(click_zyx, float), np.asarray(spacing_zyx, float)
    return np.concatenate([(click - lo) * spacing, (hi - click) * spacing]).astype(np.float32)


@dataclass
class PointExtent:
    """A fitted extent network and what it was fitted with. `normalize` maps raw intensities as the box network's
    plans do (set by the Segmenter that uses it)."""

    network: ExtentNetwork
    weights: str
    scales_mm: tuple[float, ...] = DEFAULT_SCALES_MM
    grid: int = DEFAULT_GRID
    channels: int = DEFAULT_CHANNELS
    min_size_mm: float = 0.0

    @classmethod
    def from_entry(cls, entry, root: Path, where: str) -> "PointExtent":
        what = f"{where}: the point search's '{ENTRY_KEY}'"
        if not isinstance(entry, dict) or not isinstance(entry.get("weights"), str):
            raise CheckpointError(f"{what} must name its weights file ('weights'). {FIX}")
        try:
            scales = tuple(float(s) for s in entry.get("scales_mm", DEFAULT_SCALES_MM))
            grid, channels = int(entry.get("grid", DEFAULT_GRID)), int(entry.get("channels", DEFAULT_CHANNELS))
            min_size = float(entry.get("min_size_mm", 0.0))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{what} has a bad setting ({error}). {FIX}") from None
        if not scales or min(scales) <= 0 or grid <= 0 or grid % 8 or channels <= 0 or min_size < 0:
            raise CheckpointError(f"{what} needs positive scales, a grid that is a multiple of 8, positive channels "
                                  f"and min_size_mm >= 0; got {entry!r}. {FIX}")
        path = Path(root) / entry["weights"]
        if not path.is_file():
            raise CheckpointError(f"{what}: its weights {path} are missing. {FIX}")
        network = ExtentNetwork(len(scales), grid, channels)
        try:
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            raise CheckpointError(f"{what}: {path} does not hold an extent network of {len(scales)} scales, grid "
                                  f"{grid} and {channels} channels ({str(error).splitlines()[0]}). {FIX}") from None
        return cls(network.eval(), entry["weights"], scales, grid, channels, min_size)

    def manifest_entry(self) -> dict:
        return {"weights": self.weights, "scales_mm": list(self.scales_mm), "grid": self.grid,
                "channels": self.channels, "min_size_mm": self.min_size_mm}

    def predict_faces(self, image_zyx: np.ndarray, spacing_zyx, click_zyx,
                      normalize: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """FACES distances (mm) of the clicked lesion's predicted bounding box: the geometric mean over the samples
        mirrored along every combination of axes, with and without y and x swapped (16 variants in one batch; the
        box's intersection over union with the truth rose by 0.03 on the validation clicks)."""
        samples = normalize(click_samples(image_zyx, spacing_zyx, click_zyx, self.scales_mm, self.grid))
        variants = mirrored_variants(samples.astype(np.float32))
        with torch.no_grad():
            log_faces = self.network(torch.from_numpy(np.stack([v for v, _ in variants]))).double().numpy()
        unmirrored = [faces[np.argsort(order)] for faces, (_, order) in zip(log_faces, variants)]
        return np.exp(np.mean(unmirrored, axis=0))

    def box(self, image_zyx: np.ndarray, spacing_zyx, click_zyx,
            normalize: Callable[[np.ndarray], np.ndarray]) -> BoxPrompt | None:
        """The predicted box, or None when it is smaller than `min_size_mm` (the search's cubes size it then)."""
        faces = self.predict_faces(image_zyx, spacing_zyx, click_zyx, normalize)
        if box_size_mm(faces) < self.min_size_mm:
            return None
        return box_from_faces(click_zyx, faces, spacing_zyx, np.shape(image_zyx))


def mirrored(samples: np.ndarray, axes: Sequence[int], swap_yx: bool) -> tuple[np.ndarray, list[int]]:
    """(scales, z, y, x) samples mirrored along `axes` (0: z, 1: y, 2: x), then with y and x swapped if `swap_yx`
    (the samples lie on isotropic mm grids); and the order that takes the original's FACES to the variant's
    (variant faces = faces[order])."""
    order = list(range(6))
    for axis in axes:
        order[axis], order[axis + 3] = axis + 3, axis
    if axes:
        samples = np.flip(samples, [axis + 1 for axis in axes])
    if swap_yx:
        samples = samples.transpose(0, 1, 3, 2)
        order = [order[face] for face in YX_SWAP]
    return samples, order


def mirrored_variants(samples: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
    """`mirrored` along every combination of axes, each with and without y and x swapped: 16 variants."""
    return [mirrored(samples, [axis for axis in range(3) if flips >> axis & 1], swap_yx)
            for flips in range(8) for swap_yx in (False, True)]


def box_size_mm(faces_mm: np.ndarray) -> float:
    """The geometric mean of a FACES box's sides."""
    return float(np.prod(faces_mm[..., :3] + faces_mm[..., 3:], axis=-1) ** (1 / 3))
