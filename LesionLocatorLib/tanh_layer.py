"""A small fitted network stored in a model manifest: standardized features -> one tanh hidden layer -> one output.

The point search's candidate selector and the box refinement are such networks. They are fitted with torch
(`fit_tanh_layer`, several seeds averaged into one wider layer) and run with numpy, so inference needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import CheckpointError

ARRAYS = ("feature_mean", "feature_scale", "hidden_weight", "hidden_bias", "output_weight")


@dataclass
class TanhLayer:
    feature_mean: np.ndarray   # (features,)
    feature_scale: np.ndarray  # (features,)
    hidden_weight: np.ndarray  # (hidden, features)
    hidden_bias: np.ndarray    # (hidden,)
    output_weight: np.ndarray  # (hidden,)
    output_bias: float = 0.0

    def outputs(self, features: np.ndarray) -> np.ndarray:
        """(..., features) -> (...)"""
        standard = (np.asarray(features, float) - self.feature_mean) / self.feature_scale
        return np.tanh(standard @ self.hidden_weight.T + self.hidden_bias) @ self.output_weight + self.output_bias

    def manifest_entry(self, feature_names: Sequence[str]) -> dict:
        entry = {"features": list(feature_names), **{name: getattr(self, name).tolist() for name in ARRAYS}}
        if self.output_bias:
            entry["output_bias"] = float(self.output_bias)
        return entry

    @classmethod
    def from_entry(cls, entry, feature_names: Sequence[str], what: str, fix: str):
        """Checked against the features this version computes; `what` names the entry and `fix` says what to do in
        every error."""
        if not isinstance(entry, dict) or entry.get("features") != list(feature_names):
            raise CheckpointError(f"{what} was not fitted on this version's features {list(feature_names)}. {fix}")
        try:
            arrays = {name: np.asarray(entry[name], float) for name in ARRAYS}
            output_bias = float(entry.get("output_bias", 0.0))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{what} is incomplete ({error}). {fix}") from None
        count, hidden = len(feature_names), arrays["hidden_bias"].shape
        expected = {"feature_mean": (count,), "feature_scale": (count,), "hidden_weight": hidden + (count,),
                    "hidden_bias": hidden, "output_weight": hidden}
        bad = [name for name, shape in expected.items() if arrays[name].shape != shape]
        if len(hidden) != 1 or bad or not all(np.isfinite(a).all() for a in arrays.values()) \
                or np.any(arrays["feature_scale"] <= 0) or not np.isfinite(output_bias):
            raise CheckpointError(f"{what} has bad arrays {bad or ''} (shapes must match {count} features, scales must "
                                  f"be positive, values finite). {fix}")
        return cls(**arrays, output_bias=output_bias)


def fit_tanh_layer(features: np.ndarray, loss: Callable, hidden: int, seeds: int, steps: int, lr: float,
                   weight_decay: float, layer_type: type = TanhLayer):
    """Fit `seeds` networks on `features` (..., F) by minimizing `loss(outputs)` (outputs: torch tensor of shape
    `features.shape[:-1]`), full batch with AdamW; their mean is one network with the hidden units side by side."""
    import torch

    flat = features.reshape(-1, features.shape[-1])
    mean, scale = flat.mean(axis=0), flat.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)  # a constant feature stays 0 after standardizing
    inputs = torch.tensor((features - mean) / scale, dtype=torch.float32)
    parts = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(features.shape[-1], hidden), torch.nn.Tanh(),
                                  torch.nn.Linear(hidden, 1))
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            value = loss(net(inputs).squeeze(-1))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        parts.append([p.detach().double().numpy() for p in net.parameters()])
    return layer_type(mean, scale, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                      np.concatenate([p[2][0] for p in parts]) / seeds, float(np.mean([p[3][0] for p in parts])))
