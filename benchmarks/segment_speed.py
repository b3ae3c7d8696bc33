"""Segmentation speed and memory: `exact` (whole image, as the official code) vs `roi` (around the prompt).

Makes a whole-body-sized CT (512x512x400 voxels at 0.8x0.8x2.5 mm) and a full-size ResEnc-L checkpoint with
random weights in the official format, then segments one point-prompted lesion with preset `fast`, each run in its
own process, and prints wall time and peak memory and the ratios to roi measured in this one run:
- `roi`: the engine's default;
- `exact`: the engine's whole-image mode (same result as the official code, without its redundant work);
- `official`: the official code's steps, run with nnU-Net's own functions and the same network pass:
  `DefaultPreprocessor.run_case_npy` on the whole image (crop to non-zero with hole filling, normalization,
  resampling of the image and of the non-zero mask), whole-grid logits (NaN outside the patch), then
  `convert_predicted_logits_to_segmentation_with_correct_shape` (both logit channels resampled back, argmax).
It also prints the share of the roi time spent in the network pass, the pass's arithmetic rate (its floating-point
operations counted once on PyTorch's meta device) and the highest exact/roi time ratio this machine allows: the exact
time over the roi network time, reached only if everything in roi but the network took no time.

    python benchmarks/segment_speed.py [--work DIR] [--threads N] [--shape-zyx 400 512 512] [--bf16] [--modes ...]

--bf16 runs the network pass of both modes with bfloat16 autocast on the CPU (the engine's opt-in `cpu_bf16`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

# nnUNetResEncUNetLPlans-style 3d_fullres architecture (6 stages, 32..320 features)
RESENC_L = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
PATCH_ZYX = [128, 160, 160]
SPACING_ZYX = [1.0, 0.8, 0.8]


ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                "arch_kwargs": RESENC_L, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def network_pass_flops() -> float:
    """Floating-point operations of one inference pass on one patch, counted without computing (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from LesionLocatorLib.checkpoint import build_network_from_architecture

    with torch.device("meta"):
        network = build_network_from_architecture(ARCHITECTURE, 2, 2)
    network.decoder.deep_supervision = False  # as in inference
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.empty(1, 2, *PATCH_ZYX, device="meta"))
    return float(counter.get_total_flops())


def write_checkpoint_root(root: Path) -> None:
    import torch

    from LesionLocatorLib.checkpoint import build_network_from_architecture, save_checkpoint

    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}}
    plans = {
        "dataset_name": "LesionLocatorSeg", "plans_name": "nnUNetResEncUNetLPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": {"mean": -63.0, "std": 282.4, "percentile_00_5": -918.0,
                                                              "percentile_99_5": 723.0}},
        "configurations": {"3d_fullres": {"patch_size": PATCH_ZYX, "spacing": SPACING_ZYX, "batch_size": 2,
                                          "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                                          "preprocessor_name": "DefaultPreprocessor", "data_identifier": "bench",
                                          "architecture": ARCHITECTURE, **resampling},
                           "3d_fullres_bs3": {"inherits_from": "3d_fullres", "batch_size": 3}},
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    torch.manual_seed(0)
    weights = build_network_from_architecture(ARCHITECTURE, 2, 2).state_dict()
    folder = root / "LesionLocatorSeg" / "point_optimized"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    save_checkpoint(folder / "fold_0", weights, "LesionLocatorTrainerSegment", "3d_fullres_bs3")
    shutil.copytree(folder, root / "LesionLocatorSeg" / "bbox_optimized")


def make_ct(shape_zyx):
    from LesionLocatorLib.image import ImageVolume

    z, y, x = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    body = ((y - shape_zyx[1] / 2) / (0.42 * shape_zyx[1])) ** 2 + ((x - shape_zyx[2] / 2) / (0.47 * shape_zyx[2])) ** 2 < 1
    rng = np.random.default_rng(0)
    array = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 15, shape_zyx).astype(np.int16)
    lesion = ((z - shape_zyx[0] / 2) * 2.5) ** 2 + ((y - shape_zyx[1] / 2) * 0.8) ** 2 + ((x - shape_zyx[2] / 3) * 0.8) ** 2 < 15 ** 2
    array[lesion] -= 60
    return ImageVolume(array, spacing_xyz=(0.8, 0.8, 2.5))


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def segment_like_official(model, image, point_zyx, threads: int) -> np.ndarray:
    """The official pipeline's whole-image steps with nnU-Net's functions; the engine's predictor for the patch."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from LesionLocatorLib.prompts import dense_point, point_to_preprocessed

    plans_manager = PlansManager(model.model.plans)
    configuration = model.preprocessor.configuration
    properties = {"spacing": list(image.spacing_zyx)}
    data, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        image.array[None], None, properties, plans_manager, configuration, model.model.dataset_json)
    cropped_shape = np.asarray(properties["shape_after_cropping_and_before_resampling"])
    crop_start = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]])
    centre = point_to_preprocessed(point_zyx, crop_start, cropped_shape, np.asarray(data.shape[1:]) / cropped_shape,
                                   data.shape[1:])
    patch_logits, region = model.predictor.predict(data, dense_point(centre, data.shape[1:]))
    logits = torch.full((2, *data.shape[1:]), float("nan"))
    logits[(slice(None), *region)] = torch.from_numpy(patch_logits)
    label_manager = plans_manager.get_label_manager(model.model.dataset_json)
    with warnings.catch_warnings():  # skimage warns about the all-NaN slices outside the patch
        warnings.simplefilter("ignore", RuntimeWarning)
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, plans_manager, configuration, label_manager, properties, num_threads_torch=threads)


def measure(mode: str, root: str, shape_zyx, threads: int, bf16: bool, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    from LesionLocatorLib.prompts import PointPrompt
    from LesionLocatorLib.segmentation import Segmenter

    image = make_ct(shape_zyx)
    segmenter = Segmenter.from_folder(root, device="cpu", preset="fast", mode="exact" if mode == "official" else mode,
                                      cpu_bf16=bf16)
    model = segmenter.model_for("point")
    network_seconds = []
    predict_tiles = model.predictor._predict_tiles

    def timed_tiles(tiles):
        start = time.perf_counter()
        result = predict_tiles(tiles)
        network_seconds.append(time.perf_counter() - start)
        return result

    model.predictor._predict_tiles = timed_tiles
    before = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    point = (shape_zyx[0] / 2, shape_zyx[1] / 2, shape_zyx[2] / 3)
    start = time.perf_counter()
    if mode == "official":
        mask = segment_like_official(model, image, point, threads)
    else:
        mask = segmenter.segment(image, {1: PointPrompt(point)}).masks[1]
    wall = time.perf_counter() - start
    queue.put({"mode": mode, "wall_s": wall, "network_s": sum(network_seconds), "tiles": len(network_seconds),
               "peak_extra_mib": (_memory_kib("VmHWM") - before) / 1024,
               "peak_total_mib": _memory_kib("VmHWM") / 1024, "lesion_voxels": int(mask.sum())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the random checkpoint (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the network pass (both modes)")
    parser.add_argument("--modes", nargs="+", choices=("roi", "exact", "official"), default=["roi", "exact", "official"])
    parser.add_argument("--shape-zyx", type=int, nargs=3, default=[400, 512, 512],
                        help="CT size; the exact mode needs ~18 GB RAM at the default, use 250 512 512 on 16 GB")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ll_bench_"))
    root = work / "resencl_random"
    if not root.exists():
        write_checkpoint_root(root)
    context = mp.get_context("spawn")
    results = {}
    for mode in args.modes:
        queue = context.Queue()
        process = context.Process(target=measure, args=(mode, str(root), tuple(args.shape_zyx), args.threads, args.bf16, queue))
        start = time.perf_counter()
        process.start()
        process.join()
        if process.exitcode != 0:  # e.g. killed by the kernel when the whole-image pipeline runs out of memory
            print(f"{mode:8s}: died after {time.perf_counter() - start:.0f} s (exit code {process.exitcode}; "
                  "-9 = killed, usually out of memory); try a smaller --shape-zyx", flush=True)
            continue
        results[mode] = r = queue.get()
        print(f"{mode:8s}: {r['wall_s']:7.1f} s (network {r['network_s']:.1f} s), peak +{r['peak_extra_mib']:.0f} MiB "
              f"(total {r['peak_total_mib']:.0f} MiB), lesion voxels {r['lesion_voxels']}", flush=True)
    print(f"image {tuple(args.shape_zyx)} (z,y,x) at 0.8x0.8x2.5 mm, ResEnc-L random weights, patch {PATCH_ZYX}, preset fast, "
          f"network in {'bfloat16' if args.bf16 else 'float32'}, {args.threads} threads")
    roi = results.get("roi")
    if roi is None:
        return
    for mode in ("exact", "official"):
        if mode in results:
            other = results[mode]
            print(f"ratio {mode}/roi: wall time {other['wall_s'] / roi['wall_s']:.1f}x, "
                  f"peak memory {other['peak_extra_mib'] / max(roi['peak_extra_mib'], 1):.1f}x")
    print(f"roi mode: network pass {100 * roi['network_s'] / roi['wall_s']:.0f}% of the time")
    flops = network_pass_flops() * roi["tiles"]
    print(f"network pass: {flops / 1e12:.2f} TFLOP ({roi['tiles']} patch), run at {flops / roi['network_s'] / 1e9:.0f} "
          "GFLOP/s in roi mode")
    if "exact" in results:
        print(f"highest exact/roi wall-time ratio on this machine (roi without anything but its network pass): "
              f"{results['exact']['wall_s'] / roi['network_s']:.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
