"""Official LesionLocator checkpoint folders: discovery, safe loading, network construction, writing.

A model folder (e.g. `<root>/LesionLocatorSeg/point_optimized`) holds `plans.json`, `dataset.json` and
`fold_<N>/checkpoint_final.pth`. A checkpoint is a dict saved with `torch.save`: `network_weights` (state dict),
`trainer_name`, `init_args` (with `configuration`), `inference_allowed_mirroring_axes`, plus training state
that inference ignores. The configuration is looked up in the plans with `inherits_from` resolved.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .models.layout import MODEL_MANIFEST, TASK_FOLDERS
ALLOWED_NETWORK_PREFIX = "dynamic_network_architectures.architectures."
ALLOWED_IMPORT_PREFIXES = ("torch.nn.",)
REQUIRED_CONFIGURATION_KEYS = ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm",
                               "resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities")
CT_INTENSITY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")


def _safe_checkpoint_globals() -> list:
    """Non-tensor types real nnU-Net checkpoints carry (numpy scalars in the training log)."""
    safe = [np.dtype, np.ndarray]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar", "_reconstruct"])
            safe += [module.scalar, module._reconstruct]
            break
        except (ImportError, AttributeError):
            continue
    safe += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")]
    return safe


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary pickled code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"Refusing to load {path}: it contains pickled Python code or objects that are not plain weights "
            f"({str(error).strip().splitlines()[0][:300]}). Only load checkpoints from sources you trust; "
            "re-save it as a plain dict of tensors if you made it yourself."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"Checkpoint file {path} is corrupt or unreadable ({error}). Download it again.") from error
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a LesionLocator/nnU-Net checkpoint: expected a dict with 'network_weights'."
        )
    return checkpoint


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"Model file missing: {path}. A model folder needs plans.json, dataset.json and fold_N/.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Model file {path} is not valid JSON ({error}).") from error


def read_plans(folder: str | Path) -> dict:
    """A model folder's plans.json, with a clear error when it is missing or not JSON."""
    return _read_json(Path(folder) / "plans.json")


def resolve_configuration(plans: dict, name: str) -> dict:
    """The plans configuration `name` with its `inherits_from` chain resolved (child keys win), by nnU-Net's own
    plans handling."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        configuration = dict(PlansManager(plans).get_configuration(name).configuration)
    except RuntimeError as error:
        if "Circular" in str(error):
            raise CheckpointError(f"plans.json: configuration '{name}' has a circular inherits_from chain.") from error
        raise CheckpointError(f"plans.json: {error}") from error
    except ValueError as error:  # a parent configuration that does not exist
        raise CheckpointError(f"plans.json: {error}") from error
    except KeyError as error:  # nnU-Net reads an old plans format's keys to rebuild a missing 'architecture'
        raise CheckpointError(f"plans.json: configuration '{name}' has no 'architecture' (nor the old format's "
                              f"{error}); use the plans.json that was saved with the checkpoint.") from error
    configuration.pop("inherits_from", None)
    return configuration


def check_configuration(folder: Path, plans: dict, name: str, configuration: dict) -> None:
    """The plans entries inference reads, so that a malformed plans.json is refused at load, not mid-prediction
    (CT normalization clips and scales with the training set's foreground statistics, kept in the plans)."""
    missing = [key for key in REQUIRED_CONFIGURATION_KEYS if key not in configuration]
    if "CTNormalization" in configuration.get("normalization_schemes", []):
        properties = plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})
        absent = [key for key in CT_INTENSITY_KEYS if key not in properties]
        if absent:
            missing.append(f"foreground_intensity_properties_per_channel['0'] {', '.join(absent)} (CTNormalization "
                           "needs them)")
    if missing:
        raise CheckpointError(f"{folder / 'plans.json'}: configuration '{name}' lacks {', '.join(missing)}; use the "
                              "plans.json that was saved with the checkpoint.")


@dataclass
class ModelFolder:
    """One trained model folder: plans, dataset description and the weights of the requested folds."""

    path: Path
    plans: dict
    dataset_json: dict
    configuration_name: str
    configuration: dict
    trainer_name: str
    mirroring_axes: tuple[int, ...]
    fold_weights: dict[int, dict[str, torch.Tensor]] = field(repr=False)

    @property
    def patch_size_zyx(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.configuration["patch_size"])

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.configuration["spacing"])

    @property
    def num_image_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {"0": "CT"})))

    @property
    def num_classes(self) -> int:
        return len(self.dataset_json["labels"])

    @property
    def intensity_properties(self) -> dict:
        return self.plans.get("foreground_intensity_properties_per_channel", {})

    def build_network(self, input_channels: int | None = None, arch: dict | None = None) -> torch.nn.Module:
        """The configured architecture with image channels + 1 prompt channel as input."""
        channels = self.num_image_channels + 1 if input_channels is None else input_channels
        return build_network_from_architecture(arch or self.configuration["architecture"], channels, self.num_classes)


def build_network_from_architecture(architecture: dict, input_channels: int, num_classes: int) -> torch.nn.Module:
    """Instantiate a dynamic-network-architectures class from a plans `architecture` entry.

    Class names come from a file, so only dynamic_network_architectures networks and torch.nn building blocks are
    accepted: a plans file must not be able to import arbitrary code.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    class_name = architecture["network_class_name"]
    if not class_name.startswith(ALLOWED_NETWORK_PREFIX):
        raise CheckpointError(f"plans.json names network class '{class_name}'; only {ALLOWED_NETWORK_PREFIX}* is allowed.")
    kwargs = architecture["arch_kwargs"]
    for key in architecture.get("_kw_requires_import", []):
        value = kwargs.get(key)
        if value is not None and not str(value).startswith(ALLOWED_IMPORT_PREFIXES):
            raise CheckpointError(f"plans.json: '{key}' = '{value}' is not a torch.nn class; refusing to import it.")
    return get_network_from_plans(
        class_name, kwargs, architecture.get("_kw_requires_import", []), input_channels, num_classes,
        allow_init=False, deep_supervision=False,
    )


def available_folds(folder: str | Path) -> list[int]:
    folder = Path(folder)
    folds = []
    for fold_dir in folder.glob("fold_*"):
        suffix = fold_dir.name[len("fold_"):]
        if suffix.isdigit() and (fold_dir / "checkpoint_final.pth").is_file():
            folds.append(int(suffix))
    return sorted(folds)


def load_checkpoint_folder(folder: str | Path, folds: list[int] | tuple[int, ...] | None = None) -> ModelFolder:
    """Load plans, dataset.json and the weights of `folds` (default: every fold present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Model folder not found: {folder}")
    plans = read_plans(folder)
    dataset_json = _read_json(folder / "dataset.json")
    if "labels" not in dataset_json:
        raise CheckpointError(f"{folder / 'dataset.json'} has no 'labels' entry.")
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {"0": "CT"}))
    if len(channels) != 1:  # the network sees one image channel and the prompt
        raise CheckpointError(f"{folder / 'dataset.json'} lists {len(channels)} image channels {dict(channels)}; "
                              "LesionLocator models take one image (e.g. CT) and the prompt. Use a one-channel model.")
    present = available_folds(folder)
    folds = list(present if folds is None else folds)
    if not folds:
        raise CheckpointError(f"No fold_N/checkpoint_final.pth in {folder}.")
    checkpoints = {}
    for fold in folds:
        if fold not in present:
            raise CheckpointError(
                f"Fold {fold} missing: {folder / f'fold_{fold}' / 'checkpoint_final.pth'} (available folds: {present})."
            )
        checkpoints[fold] = load_checkpoint_file(folder / f"fold_{fold}" / "checkpoint_final.pth")
    first = checkpoints[folds[0]]
    configuration_name = (first.get("init_args") or {}).get("configuration", "3d_fullres")
    configuration = resolve_configuration(plans, configuration_name)
    check_configuration(folder, plans, configuration_name, configuration)
    return ModelFolder(
        path=folder,
        plans=plans,
        dataset_json=dataset_json,
        configuration_name=configuration_name,
        configuration=configuration,
        trainer_name=str(first.get("trainer_name", "")),
        mirroring_axes=tuple(int(a) for a in (first.get("inference_allowed_mirroring_axes") or ())),
        fold_weights={fold: checkpoints[fold]["network_weights"] for fold in folds},
    )


def resolve_task_folder(model_root: str | Path, task: str) -> Path:
    """The model folder for `task` ('point', 'box' or 'track') inside a checkpoint root.

    Accepts the official root (`LesionLocatorSeg/...`, `LesionLocatorTrack`), a root with a
    `lesionlocator_model.json` manifest mapping tasks to sub-folders (one network can serve several tasks), or a
    model folder itself (it has plans.json).
    """
    if task not in TASK_FOLDERS:
        raise CheckpointError(f"Unknown task '{task}'; use one of {sorted(TASK_FOLDERS)}.")
    root = Path(model_root)
    if not root.is_dir():
        raise CheckpointError(f"Model folder not found: {root}. Pass the folder that holds LesionLocatorSeg/.")
    if (root / "plans.json").is_file():
        return root
    manifest = root / MODEL_MANIFEST
    if manifest.is_file():
        tasks = _read_json(manifest).get("tasks", {})
        if task not in tasks:
            raise CheckpointError(f"{manifest} has no model for task '{task}' (it has: {sorted(tasks)}).")
        return root / tasks[task]
    candidate = root / TASK_FOLDERS[task]
    if not candidate.is_dir():
        raise CheckpointError(
            f"No '{task}' model in {root}: expected {candidate} (official layout: LesionLocatorSeg/point_optimized, "
            "LesionLocatorSeg/bbox_optimized, LesionLocatorTrack)."
        )
    return candidate


def read_model_manifest(model_root: str | Path) -> dict:
    """The optional manifest of a model root (empty for the official layout)."""
    manifest = Path(model_root) / MODEL_MANIFEST
    return _read_json(manifest) if manifest.is_file() else {}


def save_checkpoint(
    fold_dir: str | Path,
    network_weights: dict[str, torch.Tensor],
    trainer_name: str,
    configuration: str,
    mirroring_axes: tuple[int, ...] = (0, 1, 2),
    extra: dict | None = None,
) -> Path:
    """Write `checkpoint_final.pth` in the official format (loads with weights_only=True)."""
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / "checkpoint_final.pth"
    payload = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in network_weights.items()},
        "trainer_name": trainer_name,
        "init_args": {"configuration": configuration, "fold": fold_dir.name.replace("fold_", "")},
        "inference_allowed_mirroring_axes": tuple(mirroring_axes),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
    }
    payload.update(extra or {})
    tmp = path.with_suffix(".pth.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path
