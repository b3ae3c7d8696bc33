"""Model registry, downloads into the user cache, and dependency planning for the Slicer installer.

Importing this package needs only the standard library (no torch): the Slicer extension uses it before the
engine's dependencies are installed. `requirements` additionally needs `packaging`, which Slicer ships.
"""
from .cache import CACHE_ENV_VAR, clear_cache, platform_cache_dir, user_cache_dir
from .download import (
    ChecksumMismatchError,
    DownloadError,
    LicenceNotAcceptedError,
    UnsafeArchiveError,
    download_model,
)
from .layout import ModelLayout, ModelLayoutError, find_model_root, validate_model_root
from .registry import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelNotInstalledError,
    ModelSource,
    ModelStatus,
    UnknownModelError,
    get_source,
    list_models,
    model_root,
)

__all__ = [
    "CACHE_ENV_VAR", "DEFAULT_MODEL", "REGISTRY", "ChecksumMismatchError", "DownloadError",
    "LicenceNotAcceptedError", "ModelLayout", "ModelLayoutError", "ModelNotInstalledError", "ModelSource",
    "ModelStatus", "UnknownModelError", "UnsafeArchiveError", "clear_cache", "download_model", "find_model_root",
    "get_source", "list_models", "model_root", "platform_cache_dir", "user_cache_dir", "validate_model_root",
]
