"""Markups and world points -> engine prompts in voxel indices of an engine image.

The image is the world-geometry ImageVolume of a timepoint (geometry.imageVolumeFromVolumeNode), so a world RAS
point maps to the volume's voxel indices through the volume's parent transform; markups positions are read in world
coordinates, which applies the markup's own parent transform.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from LesionLocatorLib.errors import PromptError
from LesionLocatorLib.image import ImageVolume

if TYPE_CHECKING:
    from LesionLocatorLib.prompts import BoxPrompt

ROUNDING_TOLERANCE = 1e-6  # a face through a voxel centre keeps that voxel despite floating-point error
FLAT_FRACTION = 0.1  # an ROI side shorter than this fraction of the longest one was drawn in a slice view


def worldPoints(values, shape: tuple[int, ...], name: str, expected: str) -> np.ndarray:
    """`values` as a float array of `shape`; a PromptError saying what is expected otherwise (a console call)."""
    try:
        points = np.asarray(values, float)
    except (TypeError, ValueError):
        points = None
    if points is None or points.shape != shape:
        got = f"shape {points.shape}" if points is not None else repr(values)
        raise PromptError(f"{name} must be {expected} in world RAS millimetres; got {got}.")
    return points


def pointPromptFromWorld(image: ImageVolume, pointRAS):
    from LesionLocatorLib.prompts import PointPrompt  # engine dependencies are installed on first use

    indexZYX = image.ras_to_index_zyx(np.asarray(pointRAS, float))
    return PointPrompt(tuple(float(v) for v in indexZYX))


def boxPromptFromWorldCorners(image: ImageVolume, cornersRAS) -> BoxPrompt:
    """The half-open voxel box of the voxel centres inside the box spanned by `cornersRAS` (any number of points,
    so a box rotated relative to the voxel axes, e.g. an ROI drawn in an oblique view, works too). A box thinner
    than a voxel keeps the voxel it crosses."""
    from LesionLocatorLib.prompts import BoxPrompt

    indexZYX = image.ras_to_index_zyx(np.asarray(cornersRAS, float))
    lowest, highest = indexZYX.min(axis=0), indexZYX.max(axis=0)
    lo = np.ceil(lowest - ROUNDING_TOLERANCE)
    hi = np.floor(highest + ROUNDING_TOLERANCE) + 1
    crossed = np.round((lowest + highest) / 2.0)
    lo, hi = np.where(hi > lo, lo, crossed), np.where(hi > lo, hi, crossed + 1)
    return BoxPrompt(tuple(float(v) for v in lo), tuple(float(v) for v in hi))


def boxCornersFromTwoPoints(cornerA_RAS, cornerB_RAS) -> np.ndarray:
    """The 8 corners (8, 3) of the RAS-axis-aligned box with opposite corners A and B."""
    a, b = np.asarray(cornerA_RAS, float), np.asarray(cornerB_RAS, float)
    return np.array([[(a, b)[i][0], (a, b)[j][1], (a, b)[k][2]] for i, j, k in itertools.product((0, 1), repeat=3)])


def roiCornersWorld(roiNode) -> np.ndarray:
    """The 8 corners (8, 3) of a markups ROI in world RAS (its parent transform applied, linear or not)."""
    objectToNode = np.array(
        [[roiNode.GetObjectToNodeMatrix().GetElement(r, c) for c in range(4)] for r in range(4)]
    )
    halfSize = np.asarray(roiNode.GetSize(), float) / 2.0
    cornersWorld = []
    for signs in itertools.product((-1.0, 1.0), repeat=3):
        cornerNode = (objectToNode @ np.append(halfSize * np.asarray(signs), 1.0))[:3]
        cornerWorld = [0.0, 0.0, 0.0]
        roiNode.TransformPointToWorld(cornerNode, cornerWorld)
        cornersWorld.append(cornerWorld)
    return np.asarray(cornersWorld)


def deepenFlatROI(roiNode) -> bool:
    """An ROI drawn in a slice view is flat, but the box prompt is 3D: the flat side gets the mean length of the
    two others (a lesion is about as deep as it is wide). Returns whether the ROI was changed."""
    size = np.asarray(roiNode.GetSize(), float)
    flat = size < FLAT_FRACTION * size.max()
    if flat.sum() != 1:
        return False
    size[flat] = size[~flat].mean()
    roiNode.SetSize(*size)
    return True


def lastControlPointWorld(markupsNode) -> np.ndarray:
    count = markupsNode.GetNumberOfControlPoints()
    if count == 0:
        raise PromptError(f"'{markupsNode.GetName()}' has no point. Click on the lesion to place one.")
    position = [0.0, 0.0, 0.0]
    markupsNode.GetNthControlPointPositionWorld(count - 1, position)
    return np.asarray(position)


def promptFromMarkups(image: ImageVolume, markupsNode):
    """A point prompt from a fiducial list (its last point) or a box prompt from an ROI."""
    if markupsNode.IsA("vtkMRMLMarkupsROINode"):
        if markupsNode.GetNumberOfControlPoints() == 0:
            raise PromptError(f"The box '{markupsNode.GetName()}' is not placed yet. Drag a box around the lesion.")
        return boxPromptFromWorldCorners(image, roiCornersWorld(markupsNode))
    if markupsNode.IsA("vtkMRMLMarkupsFiducialNode"):
        return pointPromptFromWorld(image, lastControlPointWorld(markupsNode))
    raise PromptError(f"'{markupsNode.GetName()}' is a {markupsNode.GetClassName()}; use a point list or an ROI.")
