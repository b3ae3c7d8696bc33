"""Synthetic data: lesions inserted into real scans or phantoms, synthetic follow-ups, prompt simulation.

Ground-truth convention: a lesion's mask is the set of voxels whose blended (partial-volume) weight is >= 0.5.
"""
from .backgrounds import REAL_BACKGROUNDS, Background, choose_lesion_center, default_data_root, load_background
from .cases import (
    VALIDATION_BACKGROUNDS, SyntheticCase, ValidationCase, make_case, make_lesion, make_validation_set,
)
from .followup import FollowUpLesion, FollowUpOptions, SyntheticFollowUp, make_follow_up
from .lesions import LesionAppearance, LesionShape, SyntheticLesion, render_lesion
from .phantoms import make_body_phantom, make_head_phantom
from .prompts import jittered_box, lesion_core, sample_point_prompt, simulate_previous_mask

__all__ = [
    "REAL_BACKGROUNDS", "VALIDATION_BACKGROUNDS", "Background", "FollowUpLesion", "FollowUpOptions",
    "LesionAppearance", "LesionShape", "SyntheticCase", "SyntheticFollowUp", "SyntheticLesion", "ValidationCase",
    "choose_lesion_center", "default_data_root", "jittered_box", "lesion_core", "load_background",
    "make_body_phantom", "make_case", "make_follow_up", "make_head_phantom", "make_lesion", "make_validation_set",
    "render_lesion", "sample_point_prompt", "simulate_previous_mask",
]
