"""A small fitted convolutional network stored in a model manifest: standardized feature maps -> two 3x3x3
convolutions with tanh -> one output map.

The box refinement's last stage is one (box_refinement.py). A TanhLayer corrects each voxel from its own features;
this sees them on the voxel's 5x5x5 neighbourhood, so it can use the shape of the mask and of the intensities
around a voxel (a lesion's edge continuing past a gap, a one-voxel rim). Fitted and run with torch (the engine's
networks need it anyway). Feature maps are (z, y, x, features) voxels of the original image's grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as functional

from .errors import CheckpointError
from .point_search import slices_between
from .prediction import inclusive_bbox

KIND = "conv"
KERNEL = 3
LAYERS = 3  # two 3x3x3 convolutions with tanh, then a 1x1x1 one to the output
HALO_VOXELS = (KERNEL // 2) * (LAYERS - 1)  # how far beyond a voxel its output looks


@dataclass
class ConvStage:
    feature_mean: np.ndarray   # (features,)
    feature_scale: np.ndarray  # (features,)
    kernels: list[np.ndarray]  # (out, in, k, k, k) per layer: (hidden, features, 3, 3, 3), (hidden, hidden, 3, 3, 3),
    biases: list[np.ndarray]   # (1, hidden, 1, 1, 1); biases (out,)

    def outputs(self, features_zyxf: np.ndarray, where_zyx: np.ndarray) -> np.ndarray:
        """The outputs on the voxels `where_zyx` (bool, z, y, x) in their order, from feature maps (z, y, x, F). Only
        the bounding box of `where_zyx` and HALO_VOXELS around it is computed; at the maps' borders the features are
        repeated outwards."""
        if not where_zyx.any():
            return np.zeros(0, np.float32)
        box = halo_box(where_zyx)
        standard = (features_zyxf[box] - self.feature_mean) / self.feature_scale
        values = torch.from_numpy(np.ascontiguousarray(np.moveaxis(standard.astype(np.float32), -1, 0)))[None]
        with torch.no_grad():
            output = _forward(values, [torch.from_numpy(k.astype(np.float32)) for k in self.kernels],
                              [torch.from_numpy(b.astype(np.float32)) for b in self.biases])[0, 0].numpy()
        return output[where_zyx[box]]

    def manifest_entry(self, feature_names: Sequence[str]) -> dict:
        return {"kind": KIND, "features": list(feature_names), "feature_mean": self.feature_mean.tolist(),
                "feature_scale": self.feature_scale.tolist(), "kernels": [k.tolist() for k in self.kernels],
                "biases": [b.tolist() for b in self.biases]}

    @classmethod
    def from_entry(cls, entry, feature_names: Sequence[str], what: str, fix: str) -> "ConvStage":
        """Checked against the features this version computes; `what` names the entry and `fix` says what to do in
        every error."""
        if not isinstance(entry, dict) or entry.get("features") != list(feature_names):
            raise CheckpointError(f"{what} was not fitted on this version's features {list(feature_names)}. {fix}")
        try:
            mean, scale = (np.asarray(entry[name], float) for name in ("feature_mean", "feature_scale"))
            kernels = [np.asarray(k, float) for k in entry["kernels"]]
            biases = [np.asarray(b, float) for b in entry["biases"]]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{what} is incomplete ({error}). {fix}") from None
        if not _shapes_fit(len(feature_names), mean, scale, kernels, biases) \
                or not all(np.isfinite(a).all() for a in [mean, scale, *kernels, *biases]) or np.any(scale <= 0):
            raise CheckpointError(f"{what} has bad arrays (expected {LAYERS} layers: {KERNEL}x{KERNEL}x{KERNEL} "
                                  f"kernels from {len(feature_names)} features, then a 1x1x1 kernel to one output; "
                                  f"positive scales, finite values). {fix}")
        return cls(mean, scale, kernels, biases)


def halo_box(where_zyx: np.ndarray) -> tuple[slice, ...]:
    """The bounding box (z, y, x) of a non-empty mask and HALO_VOXELS around it, within the mask's array: all that a
    ConvStage reads for the outputs on the mask."""
    lo, hi = inclusive_bbox(where_zyx)
    return slices_between(np.maximum(lo - HALO_VOXELS, 0), np.minimum(hi + 1 + HALO_VOXELS, where_zyx.shape))


def _kernel_shapes(count: int, hidden: int) -> list[tuple[int, ...]]:
    """(out, in, z, y, x) of each layer's kernel, from `count` features through `hidden` channels to one output."""
    return [(hidden, count) + (KERNEL,) * 3, (hidden, hidden) + (KERNEL,) * 3, (1, hidden, 1, 1, 1)]


def _shapes_fit(count: int, mean, scale, kernels, biases) -> bool:
    if mean.shape != (count,) or scale.shape != (count,) or len(kernels) != LAYERS or len(biases) != LAYERS:
        return False
    if any(k.ndim != 5 for k in kernels):
        return False
    expected = _kernel_shapes(count, kernels[0].shape[0])
    return all(k.shape == e and b.shape == (e[0],) for k, b, e in zip(kernels, biases, expected))


def _forward(values, kernels, biases):
    """(batch, features, z, y, x) -> (batch, 1, z, y, x); same-size outputs (edges repeated outwards)."""
    for kernel, bias in zip(kernels[:-1], biases[:-1]):
        half = kernel.shape[-1] // 2
        values = torch.tanh(functional.conv3d(functional.pad(values, (half,) * 6, mode="replicate"), kernel, bias))
    return functional.conv3d(values, kernels[-1], biases[-1])


def fit_conv_stage(samples: Sequence[tuple[np.ndarray, np.ndarray]], loss: Callable, hidden: int, epochs: int,
                   lr: float, weight_decay: float, seed: int = 0) -> ConvStage:
    """Fit a ConvStage on `samples`, each (feature maps (z, y, x, F), where (bool z, y, x)), by minimizing
    `loss(index, outputs on where)` per sample (one sample per step, samples shuffled every epoch; AdamW with a
    poly-decaying learning rate). The output layer starts at zero, so the stage starts by changing nothing."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inside = np.concatenate([maps[where] for maps, where in samples])
    mean, scale = inside.mean(axis=0).astype(float), inside.std(axis=0).astype(float)
    scale = np.where(scale > 1e-6, scale, 1.0)  # a constant feature stays 0 after standardizing
    layers = [torch.nn.Conv3d(s[1], s[0], s[2]) for s in _kernel_shapes(inside.shape[-1], hidden)]
    torch.nn.init.zeros_(layers[-1].weight)
    torch.nn.init.zeros_(layers[-1].bias)
    parameters = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    inputs = [torch.from_numpy(np.ascontiguousarray(np.moveaxis(((maps - mean) / scale).astype(np.float32), -1, 0)))[None]
              for maps, _ in samples]
    wheres = [torch.from_numpy(where) for _, where in samples]
    total, step = epochs * len(samples), 0
    for _ in range(epochs):
        for index in rng.permutation(len(samples)):
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / total) ** 0.9
            output = _forward(inputs[index], [layer.weight for layer in layers], [layer.bias for layer in layers])
            value = loss(int(index), output[0, 0][wheres[index]])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            step += 1
    return ConvStage(mean, scale, [layer.weight.detach().double().numpy() for layer in layers],
                     [layer.bias.detach().double().numpy() for layer in layers])
