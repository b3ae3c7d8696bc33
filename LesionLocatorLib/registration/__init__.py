"""Registration of an earlier scan (moving) onto a later scan (fixed) for lesion tracking.

`make_registration(name)` picks an implementation: "gradicon" (the Track checkpoint's uniGradICON network) or
"classical" (SimpleITK affine + demons, no network needed).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from LesionLocatorLib.errors import CheckpointError, LesionLocatorError
from LesionLocatorLib.registration.base import Deformation, Registration, RegistrationError

REGISTRATION_NAMES = ("gradicon", "classical")


class UnknownRegistrationError(LesionLocatorError):
    """A registration was requested by a name that does not exist."""


def make_registration(
    name: str,
    track_state_dict: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> Registration:
    """A registration by name; "gradicon" needs the Track checkpoint's state dict (with `reg_net.*` weights)."""
    key = name.strip().lower()
    if key == "gradicon":
        if track_state_dict is None:
            raise CheckpointError(
                "The 'gradicon' registration needs the registration network of a LesionLocatorTrack checkpoint; "
                "load one, or choose the 'classical' registration."
            )
        # Imported here: icon_registration takes seconds to import and only this choice needs it.
        from LesionLocatorLib.registration.gradicon import GradICONRegistration

        return GradICONRegistration.from_track_state_dict(track_state_dict, device=device)
    if key == "classical":
        from LesionLocatorLib.registration.classical import ClassicalRegistration

        return ClassicalRegistration()
    raise UnknownRegistrationError(
        f"Unknown registration '{name}'. Choose one of: {', '.join(REGISTRATION_NAMES)}."
    )


__all__ = [
    "Deformation", "Registration", "RegistrationError", "REGISTRATION_NAMES", "UnknownRegistrationError",
    "make_registration",
]
