"""Errors the engine raises to its users. Every message says what went wrong and what to do."""
from pathlib import Path


class LesionLocatorError(Exception):
    """Base class of the engine's user-facing errors."""


class CheckpointError(LesionLocatorError):
    """A model folder or checkpoint file is missing, corrupt or unsafe."""


class PromptError(LesionLocatorError):
    """A prompt cannot be used (outside the image, empty, inverted, unreadable)."""


class Cancelled(LesionLocatorError):
    """The user cancelled the running job."""


def require_at_least(minimum: int, options: dict[str, float]) -> None:
    """Refuse the first command-line option (named as the user types it) whose value is under `minimum`."""
    for option, value in options.items():
        if value < minimum:
            wanted = "zero or more" if minimum == 0 else f"at least {minimum}"
            raise LesionLocatorError(f"{option} must be {wanted}; got {value}.")


def require_positive(options: dict[str, float]) -> None:
    """Refuse the first command-line option whose value is not above zero (NaN included)."""
    for option, value in options.items():
        if not value > 0:
            raise LesionLocatorError(f"{option} must be positive; got {value}.")


def require_folder_path(path: Path, option: str, error: type[LesionLocatorError] = LesionLocatorError) -> None:
    """Refuse, before any work, an output folder that is a file or lies under one."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise error(f"{option} {path} {where}; give a folder (nothing was written).")
