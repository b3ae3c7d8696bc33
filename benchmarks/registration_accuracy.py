"""Accuracy of the classical registration on real longitudinal MR (open_ms_longitudinal, FLAIR study1 -> study2).

Reference: each `studyN_FLAIR_to_common_space.txt` is an ITK text transform (MatrixOffsetTransformBase) in the
resampling convention, i.e. it maps LPS points of the common space (the grid of gt.nii.gz) to LPS points of the raw
study N image (checked: resampling both raw studies through their transforms onto the gt grid aligns them,
correlation 0.98, while the inverses do not). Lesion centres of gt.nii.gz (connected components) are mapped with
them into study 1 and study 2; those point pairs are the reference correspondences.

The registration (moving = study 1, fixed = study 2) is scored by mapping the study-1 points to study 2 and
measuring the distance to the reference study-2 points, in mm. Scanner geometry alone (identity) and the affine
stage alone are printed for comparison.

Run: python benchmarks/registration_accuracy.py [--threads 2] [--patients 01 03]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LesionLocatorLib.image import read_image
from LesionLocatorLib.registration.classical import ClassicalRegistration

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "open_ms_longitudinal" / "raw"
MIN_LESION_VOXELS = 5


def lesion_centres_common_lps(gt_path: Path) -> np.ndarray:
    """Centroids (n, 3) in LPS mm of the connected components of the lesion-change mask."""
    components = sitk.ConnectedComponent(sitk.ReadImage(str(gt_path)) > 0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(components)
    return np.array(
        [stats.GetCentroid(label) for label in stats.GetLabels() if stats.GetNumberOfPixels(label) >= MIN_LESION_VOXELS]
    )


def map_points(transform: sitk.Transform, points_lps: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points_lps])


def errors_mm(mapped: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(mapped - reference, axis=1)


def evaluate_patient(folder: Path, threads: int) -> dict[str, np.ndarray | float]:
    centres_common = lesion_centres_common_lps(folder / "gt.nii.gz")
    to_study = [sitk.ReadTransform(str(folder / f"study{k}_FLAIR_to_common_space.txt")) for k in (1, 2)]
    points_study1, points_study2 = (map_points(t, centres_common) for t in to_study)
    moving = read_image(folder / "study1_FLAIR.nii.gz")
    fixed = read_image(folder / "study2_FLAIR.nii.gz")
    result: dict[str, np.ndarray | float] = {"identity": errors_mm(points_study1, points_study2)}
    for label, deformable in (("affine", False), ("affine+demons", True)):
        start = time.perf_counter()
        deformation = ClassicalRegistration(deformable=deformable, threads=threads).register(moving, fixed)
        result[f"{label} seconds"] = time.perf_counter() - start
        result[label] = errors_mm(deformation.moving_points_to_fixed(points_study1), points_study2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patients", nargs="*", help="patient numbers, e.g. 01 12 (default: all)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"Data not found: {DATA}")
        return 1
    folders = sorted(DATA.glob("patient*"))
    if args.patients:
        folders = [f for f in folders if f.name.removeprefix("patient") in args.patients]
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    print(f"{'patient':8} {'method':14} {'n':>3} {'mean mm':>8} {'max mm':>8} {'seconds':>8}")
    for folder in folders:
        result = evaluate_patient(folder, args.threads)
        for label, errors in result.items():
            if label.endswith("seconds"):
                continue
            seconds = result.get(f"{label} seconds", float("nan"))
            summary = f"{len(errors):3d} {errors.mean():8.2f} {errors.max():8.2f} {seconds:8.1f}"
            print(f"{folder.name:8} {label:14} {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
