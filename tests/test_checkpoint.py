"""Checkpoint folders: official layout, plans inheritance, strict weights, safe loading, clear errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from LesionLocatorLib.checkpoint import (
    available_folds, build_network_from_architecture, load_checkpoint_file, load_checkpoint_folder,
    resolve_configuration, resolve_task_folder, save_checkpoint,
)
from LesionLocatorLib.errors import CheckpointError
from golden import FIXTURES, require

TINY = FIXTURES / "tiny"


def test_official_seg_folder_loads_with_inherited_configuration():
    model = load_checkpoint_folder(resolve_task_folder(require(TINY), "point"))
    assert model.configuration_name == "3d_fullres_bs3"
    assert model.configuration["batch_size"] == 3  # child key wins
    assert model.patch_size_zyx == (48, 80, 80)  # inherited from 3d_fullres, not another configuration
    assert model.spacing_zyx == (1.0, 0.8, 0.8)
    assert model.mirroring_axes == (0, 1, 2)
    assert sorted(model.fold_weights) == [0, 1]
    network = model.build_network()
    assert network.load_state_dict(model.fold_weights[1], strict=True)
    assert next(network.parameters()).shape[1] == 2  # image + prompt channels


def test_track_folder_and_folds():
    folder = resolve_task_folder(require(TINY), "track")
    assert folder.name == "LesionLocatorTrack"
    model = load_checkpoint_folder(folder, folds=[0])
    assert model.configuration_name == "3d_fullres"
    assert "unet_patch_size" in model.fold_weights[0]
    with pytest.raises(CheckpointError, match="Fold 3 missing"):
        load_checkpoint_folder(folder, folds=[3])


def test_circular_inheritance_is_reported():
    plans = {"configurations": {"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}}}
    with pytest.raises(CheckpointError, match="circular"):
        resolve_configuration(plans, "a")


class Payload:
    """Any class: pickling it puts code references into the checkpoint."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "trainer_name": Payload()}, path)
    with pytest.raises(CheckpointError, match="Refusing to load"):
        load_checkpoint_file(path)


def test_corrupt_and_missing_files_name_the_file(tmp_path: Path):
    folder = tmp_path / "model"
    shutil.copytree(require(TINY / "LesionLocatorSeg" / "bbox_optimized"), folder)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint_folder(folder)
    (folder / "plans.json").unlink()
    with pytest.raises(CheckpointError, match="plans.json"):
        load_checkpoint_folder(folder)
    (folder / "dataset.json").write_text("{broken")
    with pytest.raises(CheckpointError):
        load_checkpoint_folder(folder)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_folder(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="No 'track' model"):
        resolve_task_folder(tmp_path, "track")


def test_plans_cannot_import_arbitrary_classes():
    architecture = {"network_class_name": "os.system", "arch_kwargs": {}, "_kw_requires_import": []}
    with pytest.raises(CheckpointError, match="only dynamic_network_architectures"):
        build_network_from_architecture(architecture, 2, 2)
    plans = json.loads(require(TINY / "LesionLocatorSeg" / "point_optimized" / "plans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    architecture["arch_kwargs"]["nonlin"] = "subprocess.Popen"
    with pytest.raises(CheckpointError, match="not a torch.nn class"):
        build_network_from_architecture(architecture, 2, 2)


def test_saved_checkpoint_round_trips_through_the_safe_loader(tmp_path: Path):
    source = load_checkpoint_folder(resolve_task_folder(require(TINY), "box"))
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copy(source.path / name, folder / name)
    save_checkpoint(folder / "fold_2", source.fold_weights[0], "MyTrainer", "3d_fullres_bs3")
    assert available_folds(folder) == [2]
    mine = load_checkpoint_folder(folder)
    assert mine.trainer_name == "MyTrainer"
    assert mine.build_network().load_state_dict(mine.fold_weights[2], strict=True)


def _edited_point_folder(tmp_path: Path, name: str, edit) -> Path:
    """A copy of the tiny model root whose point folder `edit(folder)` changes."""
    root = tmp_path / name
    shutil.copytree(require(TINY), root)
    edit(root / "LesionLocatorSeg" / "point_optimized")
    return root


def _edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


def _track_weights(folder: Path) -> None:
    shutil.copy(TINY / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth", folder / "fold_0" / "checkpoint_final.pth")


def _three_input_channels(folder: Path) -> None:
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    stem = "encoder.stem.convs.0.conv.weight"
    checkpoint["network_weights"][stem] = torch.cat([checkpoint["network_weights"][stem]] * 2, 1)[:, :3]
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
@pytest.mark.parametrize("edit, message", [
    (_track_weights, "fold 0 weights in .*point_optimized do not fit .*Missing key"),
    (_three_input_channels, "fold 0 weights in .*point_optimized do not fit .*size mismatch"),
    (lambda f: _edit_json(f / "dataset.json", lambda d: d.update(channel_names={"0": "CT", "1": "PET"})),
     "lists 2 image channels .*one-channel model"),
    (lambda f: _edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"].pop("architecture")),
     "no 'architecture'"),
    (lambda f: _edit_json(f / "plans.json", lambda p: p["configurations"]["3d_fullres"].pop("spacing")),
     "lacks spacing"),
    (lambda f: _edit_json(f / "plans.json", lambda p: p.pop("foreground_intensity_properties_per_channel")),
     "CTNormalization needs them"),
])
def test_mismatched_weights_and_malformed_plans_are_checkpoint_errors(tmp_path: Path, edit, message):
    from LesionLocatorLib.segmentation import Segmenter

    root = _edited_point_folder(tmp_path, "model", edit)
    segmenter = Segmenter.from_folder(root, device="cpu", preset="fast")
    with pytest.raises(CheckpointError, match=message):
        segmenter.model_for("point")
    with pytest.raises(CheckpointError, match="Folds are numbers"):
        Segmenter.from_folder(root, device="cpu", folds=["all"]).model_for("box")
