"""Network evaluation around a prompt: patch placement, sliding window, Gaussian blending, mirroring TTA, folds.

Everything here is in preprocessed space, arrays (z, y, x). Only the patches that the prompt needs are predicted,
and only their bounding region is kept: the official code allocates whole-image logits for every lesion.
"""
from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

from .errors import Cancelled, CheckpointError, LesionLocatorError

Region = tuple[slice, slice, slice]
# Tiles per network pass when several prompts each fit one patch (the point search's cubes). Bundled box network,
# six 48x80x80 tiles on 2 CPU threads: two passes of three 1.03-1.05 s, one pass of six 1.21-1.34 s, six passes
# of one 1.31-1.62 s.
TILES_PER_PASS = 3


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an unavailable device is a clear error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LesionLocatorError("Device 'cuda' was requested but no CUDA GPU is available; use device 'cpu' or 'auto'.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LesionLocatorError("Device 'mps' was requested but Apple MPS is not available; use 'cpu' or 'auto'.")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise LesionLocatorError(f"Unknown device '{device}'; use auto, cpu, cuda or mps.")
    return torch.device(name)


def autocast_dtype(device: torch.device, cpu_bf16: bool = False) -> torch.dtype | None:
    """fp16 autocast on CUDA (as nnU-Net); fp32 on CPU unless bf16 is asked for; fp32 on MPS."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return None


def check_cancel(cancel_event: threading.Event | None) -> None:
    if cancel_event is not None and cancel_event.is_set():
        raise Cancelled("Cancelled by the user.")


def inclusive_bbox(mask_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coords = [np.flatnonzero(np.any(mask_zyx, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return np.array([c[0] for c in coords]), np.array([c[-1] for c in coords])


def tile_starts(shape_zyx, patch_zyx, prompt_min, prompt_max, step_size: float) -> list[tuple[int, int, int]]:
    """One patch centred on the prompt when it fits (shifted inside the image), else every sliding-window tile
    (nnU-Net steps) that overlaps the prompt's bounding box."""
    shape, patch = np.asarray(shape_zyx), np.asarray(patch_zyx)
    if np.all(prompt_max - prompt_min + 1 <= patch):
        start = [min(max(int((lo + hi - p) / 2), 0), s - p) for lo, hi, p, s in zip(prompt_min, prompt_max, patch, shape)]
        return [tuple(start)]
    steps = compute_steps_for_sliding_window(tuple(shape), tuple(patch), step_size)
    overlapping = [
        [s for s in axis_steps if s <= hi and s + p > lo]
        for axis_steps, lo, hi, p in zip(steps, prompt_min, prompt_max, patch)
    ]
    return list(itertools.product(*overlapping))


def centred_tile_start(centre_zyx, shape_zyx, patch_zyx) -> tuple[int, int, int]:
    return tuple(min(max(int(c) - p // 2, 0), s - p) for c, s, p in zip(centre_zyx, shape_zyx, patch_zyx))


@dataclass
class PredictionSettings:
    device: torch.device
    use_tta: bool
    mirror_axes: tuple[int, ...]
    step_size: float = 0.5
    cpu_bf16: bool = False


class PatchPredictor:
    """Evaluates one network architecture with the weights of one or more folds around a prompt."""

    def __init__(self, network: torch.nn.Module, fold_weights: dict[int, dict], patch_size_zyx,
                 settings: PredictionSettings, source: str = "the model folder"):
        """`source` names the weights' folder in the error for weights that do not fit `network`."""
        self.settings = settings
        self.patch_size = tuple(int(p) for p in patch_size_zyx)
        self.networks = []
        for fold, weights in fold_weights.items():
            net = network if not self.networks else copy.deepcopy(network)
            try:
                net.load_state_dict(weights, strict=True)
            except RuntimeError as error:  # another model's weights, or other input channels or layers
                detail = " ".join(str(error).split())[:400]
                raise CheckpointError(
                    f"The fold {fold} weights in {source} do not fit the network its plans.json and dataset.json "
                    f"describe ({detail}). Keep plans.json, dataset.json and fold_N/ of one model together.") from error
            self.networks.append(net.to(settings.device).eval())
        self._gaussian = compute_gaussian(self.patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10,
                                          dtype=torch.float32, device=torch.device("cpu")).numpy()
        self.forward_passes = 0

    def _mirror_combinations(self) -> list[tuple[int, ...]]:
        if not self.settings.use_tta:
            return []
        axes = [a + 2 for a in self.settings.mirror_axes]
        return [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]

    @torch.inference_mode()
    def _predict_tiles(self, tiles: torch.Tensor) -> np.ndarray:
        """Fold- and mirror-averaged logits (tiles, classes, z, y, x) of (tiles, channels, z, y, x)."""
        dtype = autocast_dtype(self.settings.device, self.settings.cpu_bf16)
        combinations = self._mirror_combinations()
        total = None
        with torch.autocast(self.settings.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for net in self.networks:
                for axes in [()] + combinations:
                    flipped = torch.flip(tiles, axes) if axes else tiles
                    out = net(flipped)
                    out = torch.flip(out, axes) if axes else out
                    total = out.float() if total is None else total + out.float()
                    self.forward_passes += 1
        return (total / (len(self.networks) * (len(combinations) + 1))).cpu().numpy()

    def predict(self, image_czyx: np.ndarray, prompt_zyx: np.ndarray, cancel_event: threading.Event | None = None,
                centre_zyx=None, grid=None) -> tuple[np.ndarray, Region]:
        """Logits (classes, z, y, x) over the region covered by the predicted tiles, and that region
        in the coordinates of `image_czyx` (unpadded). Images smaller than the patch are zero-padded, centred.
        With `centre_zyx`, one patch centred there (the tracker's placement) instead of around the prompt.
        `grid` = (window start, whole grid shape) when `image_czyx` is a window of a larger image: sliding-window
        tiles then sit where they would on the whole image."""
        return self.predict_many(image_czyx, [prompt_zyx], cancel_event, centre_zyx, grid)[0]

    def predict_many(self, image_czyx: np.ndarray, prompts_zyx: list[np.ndarray],
                     cancel_event: threading.Event | None = None, centre_zyx=None,
                     grid=None) -> list[tuple[np.ndarray, Region]]:
        """`predict` for each of several prompts on one image. Prompts that one patch covers are evaluated
        TILES_PER_PASS at a time (one network pass over a batch costs less than one pass per tile on the CPU)."""
        placed = [self._place(image_czyx, prompt, centre_zyx, grid) for prompt in prompts_zyx]
        results: list = [None] * len(placed)
        single = [k for k, (_, _, starts) in enumerate(placed) if len(starts) == 1]
        for first in range(0, len(single), TILES_PER_PASS):
            check_cancel(cancel_event)
            batch = single[first:first + TILES_PER_PASS]
            tiles = np.stack([self._tile(placed[k][0], placed[k][2][0]) for k in batch])
            predictions = self._predict_tiles(torch.from_numpy(tiles).to(self.settings.device))
            for k, prediction in zip(batch, predictions):
                start = np.asarray(placed[k][2][0])
                results[k] = _unpad_region(prediction, start, start + self.patch_size, placed[k][1],
                                           image_czyx.shape[1:])
        for k, (padded, unpad, starts) in enumerate(placed):
            if results[k] is None:
                results[k] = self._blend(padded, unpad, starts, image_czyx.shape[1:], cancel_event)
        return results

    def _place(self, image_czyx: np.ndarray, prompt_zyx: np.ndarray, centre_zyx, grid):
        """The [image, prompt] stack padded to at least one patch, its unpadding, and the tile starts."""
        stacked = np.concatenate([image_czyx, prompt_zyx[None]], axis=0).astype(np.float32, copy=False)
        padded, unpad = pad_nd_image(stacked, self.patch_size, "constant", {"constant_values": 0}, True)
        if centre_zyx is not None:
            return padded, unpad, [centred_tile_start(np.asarray(centre_zyx) + [s.start for s in unpad[1:]],
                                                      padded.shape[1:], self.patch_size)]
        prompt_min, prompt_max = inclusive_bbox(padded[-1] > 0)
        fits_one_patch = np.all(prompt_max - prompt_min + 1 <= self.patch_size)
        if grid is None or fits_one_patch:
            return padded, unpad, tile_starts(padded.shape[1:], self.patch_size, prompt_min, prompt_max,
                                              self.settings.step_size)
        # the whole grid's tiles: nnU-Net pads it (centred) to at least a patch, then steps over the padded grid
        grid_shape = np.asarray(grid[1])
        whole_padded = np.maximum(grid_shape, self.patch_size)
        shift = np.asarray(grid[0]) + (whole_padded - grid_shape) // 2 - [s.start for s in unpad[1:]]
        starts = [tuple(np.asarray(s) - shift) for s in tile_starts(
            whole_padded, self.patch_size, prompt_min + shift, prompt_max + shift, self.settings.step_size)]
        if np.min(starts) < 0 or np.any(np.max(starts, axis=0) + self.patch_size > padded.shape[1:]):
            raise LesionLocatorError("Internal error: the preprocessed window does not hold every tile.")
        return padded, unpad, starts

    def _tile(self, padded: np.ndarray, start) -> np.ndarray:
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        return np.ascontiguousarray(padded[(slice(None),) + window])

    def _blend(self, padded: np.ndarray, unpad, starts, shape_zyx, cancel_event) -> tuple[np.ndarray, Region]:
        """Several sliding-window tiles, one pass each, blended with nnU-Net's Gaussian weights."""
        lo = np.min(starts, axis=0)
        hi = np.max(starts, axis=0) + self.patch_size
        logits = None
        weights = np.zeros(tuple(hi - lo), dtype=np.float32)
        for start in starts:
            check_cancel(cancel_event)
            tile = torch.from_numpy(self._tile(padded, start))[None].to(self.settings.device)
            prediction = self._predict_tiles(tile)[0]
            if logits is None:
                logits = np.zeros((prediction.shape[0],) + tuple(hi - lo), dtype=np.float32)
            local = tuple(slice(s - l, s - l + p) for s, l, p in zip(start, lo, self.patch_size))
            logits[(slice(None),) + local] += prediction * self._gaussian
            weights[local] += self._gaussian
        logits /= weights
        return _unpad_region(logits, lo, hi, unpad, shape_zyx)


def _unpad_region(logits: np.ndarray, lo, hi, unpad, shape_zyx) -> tuple[np.ndarray, Region]:
    """Cut the padded-space logits region down to the original (unpadded) image coordinates."""
    offsets = np.array([s.start for s in unpad[1:]])
    region_lo = np.maximum(lo - offsets, 0)
    region_hi = np.minimum(hi - offsets, np.asarray(shape_zyx))
    local = tuple(slice(int(rl + o - l), int(rh + o - l)) for rl, rh, o, l in zip(region_lo, region_hi, offsets, lo))
    region = tuple(slice(int(a), int(b)) for a, b in zip(region_lo, region_hi))
    return logits[(slice(None),) + local], region

