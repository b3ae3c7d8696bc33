"""Checks that a folder is a LesionLocator model root, without loading weights (no torch import).

Official layout (what `-m` of the official CLIs takes):

    <root>/LesionLocatorSeg/point_optimized/{plans.json, dataset.json, fold_N/checkpoint_final.pth}
    <root>/LesionLocatorSeg/bbox_optimized/ (same files)
    <root>/LesionLocatorTrack/              (same files)

A root may hold the segmentation models, the tracking model, or both. A root with `lesionlocator_model.json`
maps tasks to sub-folders instead (`{"tasks": {"point": "...", "box": "...", "track": "..."}}`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

SEG_FOLDER = "LesionLocatorSeg"
TRACK_FOLDER = "LesionLocatorTrack"
# Task -> folder of the official layout; here (not in checkpoint.py) so that validation needs no torch.
TASK_FOLDERS = {
    "point": Path(SEG_FOLDER) / "point_optimized",
    "box": Path(SEG_FOLDER) / "bbox_optimized",
    "track": Path(TRACK_FOLDER),
}
MODEL_MANIFEST = "lesionlocator_model.json"
MODEL_FILES = ("plans.json", "dataset.json")
CHECKPOINT_NAME = "checkpoint_final.pth"
SEARCH_DEPTH = 3


class ModelLayoutError(CheckpointError):
    """A folder is not a complete LesionLocator model root."""


@dataclass(frozen=True)
class ModelLayout:
    """A validated model root: which tasks it serves, from which folder, with which folds."""

    root: Path
    task_folders: dict[str, Path]
    folds: dict[str, tuple[int, ...]]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_folders)


def looks_like_model_root(folder: Path) -> bool:
    return (folder / SEG_FOLDER).is_dir() or (folder / TRACK_FOLDER).is_dir() or (folder / MODEL_MANIFEST).is_file()


def validate_model_root(root: str | Path) -> ModelLayout:
    """Check every file a model root needs; the error names the first missing one."""
    root = Path(root)
    if not root.is_dir():
        raise ModelLayoutError(f"Model folder not found: {root}.")
    task_folders = _task_folders(root)
    folds = {task: _validate_model_folder(folder) for task, folder in task_folders.items()}
    return ModelLayout(root=root, task_folders=task_folders, folds=folds)


def find_model_root(folder: str | Path) -> Path:
    """The model root at or below `folder` (archives usually wrap it, e.g. `LesionLocatorCheckpoint/`)."""
    level = [Path(folder)]
    for _ in range(SEARCH_DEPTH + 1):
        for candidate in level:
            if looks_like_model_root(candidate):
                return candidate
        level = [child for parent in level for child in sorted(parent.iterdir()) if _is_content_dir(child)]
    raise ModelLayoutError(
        f"No LesionLocator model in {folder}: found no folder holding {SEG_FOLDER}/ or {TRACK_FOLDER}/ "
        f"(or {MODEL_MANIFEST})."
    )


def _is_content_dir(path: Path) -> bool:
    # macOS archivers add __MACOSX/ and dot-folders next to the real content.
    return path.is_dir() and not path.name.startswith((".", "__MACOSX"))


def _task_folders(root: Path) -> dict[str, Path]:
    manifest = root / MODEL_MANIFEST
    if manifest.is_file():
        return _manifest_task_folders(root, manifest)
    if (root / "plans.json").is_file():
        raise ModelLayoutError(
            f"{root} is a single network folder, not a model root: pass the folder that holds {SEG_FOLDER}/ "
            f"or {TRACK_FOLDER}/ (probably {_root_above(root)})."
        )
    present = {}
    if (root / SEG_FOLDER).is_dir():
        present["point"] = root / TASK_FOLDERS["point"]
        present["box"] = root / TASK_FOLDERS["box"]
    if (root / TRACK_FOLDER).is_dir():
        present["track"] = root / TASK_FOLDERS["track"]
    if not present:
        raise ModelLayoutError(
            f"{root} is not a LesionLocator model folder: expected {SEG_FOLDER}/point_optimized, "
            f"{SEG_FOLDER}/bbox_optimized and/or {TRACK_FOLDER}/ inside it (the official checkpoint layout)."
        )
    return present


def _root_above(network_folder: Path) -> Path:
    parent = network_folder.parent
    return parent.parent if parent.name == SEG_FOLDER else parent


def _manifest_task_folders(root: Path, manifest: Path) -> dict[str, Path]:
    try:
        tasks = json.loads(manifest.read_text(encoding="utf-8")).get("tasks", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ModelLayoutError(f"{manifest} is not a valid model manifest ({error}).") from error
    unknown = sorted(set(tasks) - set(TASK_FOLDERS))
    if not tasks or unknown:
        raise ModelLayoutError(
            f"{manifest} must map tasks {sorted(TASK_FOLDERS)} to sub-folders; got {sorted(tasks)}."
        )
    resolved_root = root.resolve()
    folders = {}
    for task, relative in tasks.items():
        folder = (root / relative).resolve()
        if folder != resolved_root and resolved_root not in folder.parents:
            raise ModelLayoutError(f"{manifest}: task '{task}' points outside the model folder ({relative}).")
        folders[task] = root / relative
    return folders


def _validate_model_folder(folder: Path) -> tuple[int, ...]:
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise ModelLayoutError(f"Model file missing: {folder / name}. The model folder is incomplete.")
    fold_dirs = sorted(p for p in folder.glob("fold_*") if p.is_dir() and p.name[len("fold_"):].isdigit())
    if not fold_dirs:
        raise ModelLayoutError(f"Model file missing: {folder / 'fold_0' / CHECKPOINT_NAME} (no fold_N/ folder).")
    for fold_dir in fold_dirs:
        if not (fold_dir / CHECKPOINT_NAME).is_file():
            raise ModelLayoutError(f"Model file missing: {fold_dir / CHECKPOINT_NAME}. The model folder is incomplete.")
    return tuple(sorted(int(p.name[len("fold_"):]) for p in fold_dirs))
