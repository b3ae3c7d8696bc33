"""The Lite model's description in nnU-Net v2 form (plans.json, dataset.json) and its model root on disk.

One ResidualEncoderUNet with inputs [CT image, prompt] and outputs [background, lesion] serves the point, box and
track tasks: the manifest `lesionlocator_model.json` maps all three to the same `net/` folder. A network trained for
some tasks only (e.g. points, as the official point_optimized model) goes into its own folder of the same root, and
the manifest maps those tasks to it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import (
    MODEL_MANIFEST, ModelFolder, build_network_from_architecture, resolve_configuration, save_checkpoint,
)
from ..box_refinement import MANIFEST_KEY as REFINEMENT_KEY
from ..errors import LesionLocatorError
from ..point_search import MANIFEST_KEY, PointSearch

CONFIGURATION = "3d_fullres"
TRAINER_NAME = "LesionLocatorLiteTrainer"
NETWORK_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
MODEL_NAME = "LesionLocator-Lite"
NET_FOLDER = "net"
TASKS = ("point", "box", "track")
# CT intensity statistics of the released LesionLocator plans: the Lite model normalizes CT exactly as they do
OFFICIAL_CT_INTENSITY_PROPERTIES = {
    "max": 3603.951904296875, "mean": -63.00682013436269, "median": 37.23089790344238, "min": -1411.0,
    "percentile_00_5": -918.0, "percentile_99_5": 723.0, "std": 282.3602283405916,
}
_RESAMPLING_DEFAULTS = {"order_z": 0, "force_separate_z": None}


class ModelConfigError(LesionLocatorError, ValueError):
    """A Lite network that cannot be built: its stages, blocks and patch do not fit together."""


@dataclass(frozen=True)
class LiteModelConfig:
    patch_size_zyx: tuple[int, int, int] = (48, 80, 80)
    spacing_zyx: tuple[float, float, float] = (2.0, 1.5, 1.5)
    features_per_stage: tuple[int, ...] = (8, 16, 32, 64, 128)
    blocks_per_stage: tuple[int, ...] = (1, 1, 2, 2, 2)
    intensity_properties: dict = field(default_factory=lambda: dict(OFFICIAL_CT_INTENSITY_PROPERTIES))

    def __post_init__(self) -> None:
        stages = len(self.features_per_stage)
        if len(self.blocks_per_stage) != stages:
            raise ModelConfigError(f"Give one entry per stage to both --features and --blocks; got {stages} features "
                                   f"{list(self.features_per_stage)} and {len(self.blocks_per_stage)} block counts "
                                   f"{list(self.blocks_per_stage)}.")
        if stages < 2:
            raise ModelConfigError("The network needs at least 2 stages (its decoder upsamples from the second): give "
                                   "--features and --blocks 2 or more entries each, e.g. --features 8 16 --blocks 1 1.")
        self.check_patch(self.patch_size_zyx)

    def check_patch(self, patch_size_zyx: Sequence[int], option: str = "--patch-size") -> None:
        """Every stage halves the patch: it must divide by 2^(stages - 1) on every axis."""
        stages = len(self.features_per_stage)
        divisor = 2 ** (stages - 1)
        if any(p <= 0 or p % divisor for p in patch_size_zyx):
            raise ModelConfigError(f"The patch (z, y, x) {tuple(int(p) for p in patch_size_zyx)} must be "
                                   f"divisible by {divisor} on every axis for {stages} stages; give a {option} "
                                   f"of positive multiples of {divisor}, or fewer stages.")

    def architecture(self) -> dict:
        stages = len(self.features_per_stage)
        return {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": {
                "n_stages": stages,
                "features_per_stage": list(self.features_per_stage),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * stages,
                "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
                "n_blocks_per_stage": list(self.blocks_per_stage),
                "n_conv_per_stage_decoder": [1] * (stages - 1),
                "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }


def make_plans(config: LiteModelConfig) -> dict:
    """A complete nnU-Net v2 plans dict with one `3d_fullres` configuration."""
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **_RESAMPLING_DEFAULTS},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **_RESAMPLING_DEFAULTS},
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **_RESAMPLING_DEFAULTS},
    }
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(config.patch_size_zyx),
        "median_image_size_in_voxels": [256, 256, 256],
        "spacing": list(config.spacing_zyx),
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        **resampling,
        "architecture": config.architecture(),
        "batch_dice": False,
    }
    return {
        "dataset_name": "LesionLocatorLite",
        "plans_name": "LesionLocatorLitePlans",
        "original_median_spacing_after_transp": list(config.spacing_zyx),
        "original_median_shape_after_transp": [256, 256, 256],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "LesionLocatorLite",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(config.intensity_properties)},
    }


def make_dataset_json() -> dict:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "name": "LesionLocator-Lite (synthetic lesions in CT; research use only, not a medical device)",
    }


def plans_model_folder(config: LiteModelConfig, path: Path = Path(".")) -> ModelFolder:
    """A ModelFolder without weights: what the engine's Preprocessor needs to preprocess like inference."""
    plans = make_plans(config)
    return ModelFolder(path=path, plans=plans, dataset_json=make_dataset_json(), configuration_name=CONFIGURATION,
                       configuration=resolve_configuration(plans, CONFIGURATION), trainer_name=TRAINER_NAME,
                       mirroring_axes=(0, 1, 2), fold_weights={})


def build_lite_network(config: LiteModelConfig) -> torch.nn.Module:
    """The network exactly as inference builds it from plans.json (2 inputs, 2 outputs), with nnU-Net's init."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    network = build_network_from_architecture(config.architecture(), 2, 2)
    network.apply(InitWeights_He(1e-2))
    return network


def write_model_root(root: str | Path, config: LiteModelConfig, network_weights: dict[str, torch.Tensor],
                     extra: dict | None = None, tasks: tuple[str, ...] = TASKS, net_folder: str = NET_FOLDER) -> Path:
    """Write <net_folder>/{plans.json, dataset.json, fold_0/checkpoint_final.pth} and map `tasks` to it in the
    manifest; tasks that an existing manifest maps to other folders keep them. Returns the root."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be some of {TASKS}; got {list(tasks)}")
    root = Path(root)
    net = root / net_folder
    net.mkdir(parents=True, exist_ok=True)
    (net / "plans.json").write_text(json.dumps(make_plans(config), indent=2))
    (net / "dataset.json").write_text(json.dumps(make_dataset_json(), indent=2))
    save_checkpoint(net / "fold_0", network_weights, TRAINER_NAME, CONFIGURATION, (0, 1, 2), extra)
    manifest_path = root / MODEL_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest = {"name": MODEL_NAME, "tasks": {}, "registration": "classical", **manifest}
    manifest["tasks"] = {**manifest["tasks"], **{task: net_folder for task in tasks}}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return root


def set_point_search(root: str | Path, box_sizes_mm: Sequence[float] | None) -> bool:
    """Ask for a point search with these cube sizes in the root's manifest, or for none (None). A search needs the
    box network, so a root without a 'box' task gets none; returns whether the manifest now asks for one. A selector
    and an extent network fitted for the earlier networks go (the search picks by contrast until `lesionlocator
    fit-point-search`, and answers clicks by its cubes until `lesionlocator fit-point-extent`)."""
    manifest_path = Path(root) / MODEL_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.pop(MANIFEST_KEY, None)
    if box_sizes_mm and "box" in manifest.get("tasks", {}):
        search = PointSearch(tuple(float(s) for s in box_sizes_mm))
        manifest[MANIFEST_KEY] = search.manifest_entry()
        PointSearch.from_manifest(manifest, str(manifest_path))  # the same checks as loading
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return MANIFEST_KEY in manifest


def drop_box_refinement(root: str | Path) -> bool:
    """Remove the root's box refinement: it was fitted on the earlier box network's logits. Returns whether there
    was one (`lesionlocator fit-box-refinement` fits one for the new network)."""
    manifest_path = Path(root) / MODEL_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if manifest.pop(REFINEMENT_KEY, None) is None:
        return False
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return True


def config_from_plans(plans: dict) -> LiteModelConfig:
    """The LiteModelConfig a plans.json was written from (to resume or fine-tune)."""
    configuration = resolve_configuration(plans, CONFIGURATION)
    kwargs = configuration["architecture"]["arch_kwargs"]
    return LiteModelConfig(
        patch_size_zyx=tuple(int(p) for p in configuration["patch_size"]),
        spacing_zyx=tuple(float(s) for s in configuration["spacing"]),
        features_per_stage=tuple(int(f) for f in kwargs["features_per_stage"]),
        blocks_per_stage=tuple(int(b) for b in kwargs["n_blocks_per_stage"]),
        intensity_properties=dict(plans["foreground_intensity_properties_per_channel"]["0"]),
    )
