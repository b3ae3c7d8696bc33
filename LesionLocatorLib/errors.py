"""Errors the engine raises to its users. Every message says what went wrong and what to do."""


class LesionLocatorError(Exception):
    """Base class of the engine's user-facing errors."""


class CheckpointError(LesionLocatorError):
    """A model folder or checkpoint file is missing, corrupt or unsafe."""


class PromptError(LesionLocatorError):
    """A prompt cannot be used (outside the image, empty, inverted, unreadable)."""


class Cancelled(LesionLocatorError):
    """The user cancelled the running job."""
