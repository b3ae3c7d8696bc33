"""LesionLocator-Lite on the CPU: one lesion in a 512x512x200 CT end to end, and one tracking step.

Goals (2 cores): segmentation under 3 s, a tracking step under 20 s. A click is answered as the model asks (the
bundled model: the box its extent network predicts, see LesionLocatorLib/point_extent.py and point_search.py); the point
network alone and the point search's cubes alone are timed beside it. The true lesion has 4524 voxels. A box
on the same lesion is answered with the model's box refinement (LesionLocatorLib/box_refinement.py) and without.
A box on a second, 8 mm lesion is answered on the model's fine grid for small boxes (fine_grid.py) and on the planned
grid. The CT is a synthetic body phantom scaled to 512x512x200 voxels at 0.8x0.8x2.5 mm with the two lesions; the
follow-up is the same scan shifted by a few millimetres with the large lesion grown. Times are wall-clock of the API
calls, measured in this one run.

    python benchmarks/lite_speed.py [--threads 2] [--model FOLDER]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from timing import timed

from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.models.registry import model_root
from LesionLocatorLib.prompts import BoxPrompt, PointPrompt
from LesionLocatorLib.segmentation import Segmenter
from LesionLocatorLib.tracking import Tracker

SHAPE_ZYX = (200, 512, 512)
SPACING_XYZ = (0.8, 0.8, 2.5)
LESION_ZYX = (100, 230, 300)
LESION_RADIUS_MM = 12.0
SMALL_LESION_ZYX = (100, 200, 360)  # a second lesion, small enough for a model's fine grid (fine_grid.py)
SMALL_LESION_RADIUS_MM = 4.0


def make_ct(shift_voxels: int, lesion_radius_mm: float, seed: int) -> ImageVolume:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
    y = y - shift_voxels
    body = ((y - 256) / 215.0) ** 2 + ((x - 256) / 240.0) ** 2 < 1
    liver = ((y - 230) / 90.0) ** 2 + ((x - 320) / 110.0) ** 2 + ((z - 100) / 60.0) ** 2 < 1
    array = np.broadcast_to(np.where(body, 30, -1000), SHAPE_ZYX).astype(np.int16)
    array[liver] = 60
    array += rng.normal(0, 10, SHAPE_ZYX).astype(np.int16)
    for centre, radius in ((LESION_ZYX, lesion_radius_mm), (SMALL_LESION_ZYX, SMALL_LESION_RADIUS_MM)):
        lesion = ((z - centre[0]) * 2.5) ** 2 + ((y - centre[1]) * 0.8) ** 2 + ((x - centre[2]) * 0.8) ** 2
        array[lesion < radius ** 2] -= 45
    return ImageVolume(array, spacing_xyz=SPACING_XYZ)


def box_around(centre_zyx, radius_mm: float) -> BoxPrompt:
    """A lesion's bounding box, (z, y, x) voxels."""
    half = np.ceil(radius_mm / np.asarray(SPACING_XYZ[::-1]))
    return BoxPrompt(tuple(np.asarray(centre_zyx) - half), tuple(np.asarray(centre_zyx) + half + 1))


def warm_segment(root, image: ImageVolume, prompts: dict, **options) -> tuple[Segmenter, object, float]:
    """A Segmenter made with `options`, its result and wall seconds on `prompts`, timed on a second call (the first
    warms it up: loading, and the fine grid's model)."""
    segmenter = Segmenter.from_folder(root, device="cpu", preset="fast", **options)
    segmenter.segment(image, prompts)
    result, seconds = timed(lambda: segmenter.segment(image, prompts))
    return segmenter, result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="lesionlocator-lite")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = model_root(args.model)
    baseline, follow_up = make_ct(0, LESION_RADIUS_MM, 0), make_ct(6, 15.0, 1)
    segmenter = Segmenter.from_folder(root, device="cpu", preset="fast")
    _, load_time = timed(lambda: [segmenter.model_for(task) for task in ("point", "box")])
    prompt = {1: PointPrompt(LESION_ZYX)}
    result, first = timed(lambda: segmenter.segment(baseline, prompt))
    _, second = timed(lambda: segmenter.segment(baseline, prompt))
    tracker = Tracker.from_folder(root, device="cpu", preset="fast", segmenter=segmenter)
    step, track_time = timed(lambda: tracker.track_step(baseline, follow_up, {1: result.masks[1]}))
    print(f"CT {SHAPE_ZYX} (z,y,x) at {SPACING_XYZ[::-1]} mm (z,y,x), CPU {args.threads} threads, model {root.name}")
    print(f"model load {load_time:.2f} s (once)")
    print(f"segment one lesion: {first:.2f} s first call, {second:.2f} s next call "
          f"({int(result.masks[1].sum())} voxels; goal < 3 s)")
    # the same click with the point network alone, and with the search's cubes alone when the model also has an
    # extent network; each warmed up like the first
    search = segmenter.point_search
    others = {} if search is None else {"point network alone": dict(point_search=False)}
    if search is not None and search.extent is not None:
        others["the search's cubes alone"] = dict(point_extent=False)
    for name, options in others.items():
        _, other_result, other_time = warm_segment(root, baseline, prompt, **options)
        print(f"  {name}: {other_time:.2f} s ({int(other_result.masks[1].sum())} voxels); the model's answer "
              f"takes {second / other_time:.2f}x as long")
    box = {1: box_around(LESION_ZYX, LESION_RADIUS_MM)}
    for refined in (True, False):
        boxes, box_result, box_time = warm_segment(root, baseline, box, box_refinement=refined)
        print(f"box on the lesion, {'with the model' if refined else 'box network alone'}: {box_time:.2f} s "
              f"({int(box_result.masks[1].sum())} voxels)"
              + ("" if boxes.box_refiner is not None or not refined else "; the model has no box refinement"))
    # a small lesion's box: on the model's fine grid when it asks for one, and on the planned grid
    small = {1: box_around(SMALL_LESION_ZYX, SMALL_LESION_RADIUS_MM)}
    times = {}
    for fine in (True, False):
        boxes, small_result, times[fine] = warm_segment(root, baseline, small, box_fine_grid=fine)
        print(f"box on the small lesion, {'as the model asks' if fine else 'on the planned grid'}: {times[fine]:.2f} s "
              f"({int(small_result.masks[1].sum())} voxels)"
              + ("" if boxes.fine_grid is not None or not fine else "; the model asks for no fine grid"))
    print(f"  the small box takes {times[True] / times[False]:.2f}x as long as on the planned grid")
    print(f"tracking step ({tracker.folds[0].registration.name} registration): {track_time:.2f} s "
          f"(found: {step[1].found}, {step[1].volume_ml:.1f} mL; goal < 20 s)")


if __name__ == "__main__":
    main()
