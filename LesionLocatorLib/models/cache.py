"""Where downloaded models live: the per-user cache folder and its sub-folders.

Precedence: an explicit folder (the Slicer setting, a CLI option) > `$LESIONLOCATOR_CACHE_DIR` > the platform's
user cache directory (Linux `$XDG_CACHE_HOME/lesionlocator` or `~/.cache/lesionlocator`, macOS
`~/Library/Caches/lesionlocator`, Windows `%LOCALAPPDATA%\\lesionlocator\\Cache`).
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

CACHE_ENV_VAR = "LESIONLOCATOR_CACHE_DIR"
APP_NAME = "lesionlocator"
MODELS_SUBDIR = "models"
DOWNLOADS_SUBDIR = "downloads"
PART_SUFFIX = ".part"
STAGING_PREFIX = ".staging-"


def platform_cache_dir(
    platform: str = sys.platform, environ: Mapping[str, str] = os.environ, home: Path | None = None
) -> Path:
    """The user cache folder this platform's conventions give (no environment override)."""
    home = Path.home() if home is None else home
    if platform.startswith("win"):
        local_app_data = environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(local_app_data) / APP_NAME / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / APP_NAME
    xdg_cache = environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg_cache) if xdg_cache and Path(xdg_cache).is_absolute() else home / ".cache"
    return base / APP_NAME


def user_cache_dir(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The cache folder to use: `explicit`, else `$LESIONLOCATOR_CACHE_DIR`, else the platform default."""
    if explicit:
        return Path(explicit).expanduser()
    if environ.get(CACHE_ENV_VAR):
        return Path(environ[CACHE_ENV_VAR]).expanduser()
    return platform_cache_dir(environ=environ)


def models_dir(cache_dir: Path) -> Path:
    """Installed models: `<cache>/models/<name>/` is a model root (holds LesionLocatorSeg/ ...)."""
    return cache_dir / MODELS_SUBDIR


def installed_model_dir(cache_dir: Path, name: str) -> Path:
    return models_dir(cache_dir) / name


def part_file(cache_dir: Path, archive_name: str) -> Path:
    """The resumable partial download of an archive."""
    return cache_dir / DOWNLOADS_SUBDIR / (archive_name + PART_SUFFIX)


def clear_cache(cache_dir: Path, name: str | None = None, archive_name: str | None = None) -> list[Path]:
    """Delete what this package put in the cache for the registered model `name`: its installed folder, its staging
    folders and the partial download of `archive_name`; without `name`, that of every downloadable model.

    Returns the paths that were deleted. Nothing else is touched, not even under models/ or downloads/: the cache
    may be a user-chosen folder that holds the user's own files.
    """
    if name is None:
        from .registry import DOWNLOAD, REGISTRY  # registry imports this module

        return [path for source in REGISTRY.values() if source.kind == DOWNLOAD
                for path in clear_cache(cache_dir, source.name, source.archive_name)]
    targets = [installed_model_dir(cache_dir, name), *sorted(models_dir(cache_dir).glob(f"{STAGING_PREFIX}{name}-*"))]
    if archive_name:
        targets.append(part_file(cache_dir, archive_name))
    return [target for target in targets if _delete(target)]


def _delete(path: Path) -> bool:
    """Delete a file, link or folder; False when there is nothing there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        return False
    return True
