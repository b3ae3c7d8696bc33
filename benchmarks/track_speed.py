"""Tracking speed: registration shared across lesions vs registered per lesion (the official behaviour).

Makes a baseline and two follow-ups (a CT-like phantom with lesions, the follow-ups shifted and deformed) and an
official-format Track checkpoint with full-size random weights (uniGradICON reg_net + a ResEnc-L U-Net), then on
the CPU, in one run:
- tracks 1 and 5 lesions through the chain with the registration computed once per scan pair (ours),
- tracks 5 lesions registering again for every lesion (what the official tracker does: it re-runs the registration
  inside every lesion's forward pass), once with our registration (only φ_AB: the gain of sharing alone) and once
  with the official network's full forward (GradientICONSparse: φ_AB, φ_BA and its losses, as the official runs it),
- times one GradICON registration and one classical (SimpleITK) registration of the same pair,
and prints per-lesion costs and the ratio.

    python benchmarks/track_speed.py [--work DIR] [--threads 2] [--lesions 5]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import timed

from LesionLocatorLib.checkpoint import build_network_from_architecture, save_checkpoint
from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.prompts import MaskPrompt
from LesionLocatorLib.registration import make_registration
from LesionLocatorLib.registration.base import Registration
from LesionLocatorLib.registration.gradicon import GradICONDeformation, GradICONRegistration, build_unigradicon
from LesionLocatorLib.tracking import Tracker, preprocessed_volume

TRACK_ARCH = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
PATCH_ZYX = [32, 96, 96]
SPACING_ZYX = [3.0, 0.8418, 0.8418]
SHAPE_ZYX = (80, 320, 320)  # 240 x 256 x 256 mm at 3 x 0.8 x 0.8 mm


def write_track_checkpoint(root: Path) -> None:
    source = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official" / "tiny" / "LesionLocatorTrack"
    architecture = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                    "arch_kwargs": TRACK_ARCH, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    resampling_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "LesionLocatorTrack", "plans_name": "nnUNetResEncUNetLPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "foreground_intensity_properties_per_channel": {"0": {"mean": -63.0, "std": 282.4, "percentile_00_5": -918.0,
                                                              "percentile_99_5": 723.0}},
        "configurations": {"3d_fullres": {
            "patch_size": PATCH_ZYX, "spacing": SPACING_ZYX, "batch_size": 2, "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False], "preprocessor_name": "DefaultPreprocessor", "data_identifier": "bench",
            "architecture": architecture, "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": resampling_kwargs,
            "resampling_fn_seg_kwargs": {**resampling_kwargs, "is_seg": True, "order": 1},
            "resampling_fn_probabilities_kwargs": {**resampling_kwargs, "order": 1}}},
    }
    torch.manual_seed(0)
    weights = {f"unet.{k}": v for k, v in build_network_from_architecture(architecture, 2, 2).state_dict().items()}
    registration = build_unigradicon()
    for parameter in registration.parameters():  # small random weights keep the displacement plausible
        parameter.data.mul_(0.1)
    weights.update({f"reg_net.{k}": v for k, v in registration.state_dict().items()})
    weights["unet_patch_size"] = torch.tensor(PATCH_ZYX)
    folder = root / "LesionLocatorTrack"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    save_checkpoint(folder / "fold_0", weights, "LesionLocatorTrainerTrack", "3d_fullres")
    if (source.parent / "LesionLocatorSeg").is_dir():  # tracking needs a Seg folder only for point/box prompts
        shutil.copytree(source.parent / "LesionLocatorSeg", root / "LesionLocatorSeg")


LESION_CENTRES_ZYX = [(40, 160, 110), (30, 120, 200), (50, 200, 160), (45, 110, 120), (35, 210, 220)]


class OfficialForwardRegistration(Registration):
    """The same weights run as the official tracker runs them: the whole GradientICONSparse forward (both
    directions, warped images, LNCC similarity and the gradient-inverse-consistency loss); φ_AB is then used."""

    name = "gradicon-official-forward"

    def __init__(self, ours: GradICONRegistration):
        import icon_registration as icon
        from icon_registration.losses import GradientICONSparse

        self.ours = ours
        self.network = GradientICONSparse(ours.network.regis_net, icon.LNCC(sigma=5), lmbda=1.5)
        self.network.assign_identity_map([1, 1, *ours.input_shape_zyx])
        self.network.eval()

    def register(self, moving, fixed):
        image_a, image_b = self.ours._on_network_grid(moving.array), self.ours._on_network_grid(fixed.array)
        with torch.inference_mode():
            self.network(image_a, image_b)
        return GradICONDeformation(self.network.phi_AB_vectorfield.float(), moving.shape_zyx, fixed.shape_zyx)


def make_scans() -> tuple[list[ImageVolume], dict[int, np.ndarray]]:
    z, y, x = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
    rng = np.random.default_rng(0)
    scans, masks = [], {}
    for timepoint, shift in enumerate((0, 3, 6)):
        yy, xx = y - shift, x + shift // 2
        body = ((yy - 160) / 130.0) ** 2 + ((xx - 160) / 145.0) ** 2 < 1
        array = np.where(body, 40, -1000) + rng.normal(0, 12, SHAPE_ZYX)
        for k, (cz, cy, cx) in enumerate(LESION_CENTRES_ZYX, start=1):
            lesion = ((z - cz) * 3.0) ** 2 + ((yy - cy) * 0.8) ** 2 + ((xx - cx) * 0.8) ** 2 < (12 + timepoint) ** 2
            array[lesion] = 110
            if timepoint == 0:
                masks[k] = lesion.astype(np.uint8)
        scans.append(ImageVolume(array.astype(np.int16), spacing_xyz=(0.8, 0.8, 3.0)))
    return scans, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lesions", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.work or tempfile.mkdtemp(prefix="ll_track_bench_")) / "track_random"
    if not root.exists():
        write_track_checkpoint(root)
    scans, masks = make_scans()
    prompts = {k: MaskPrompt(masks[k]) for k in list(masks)[: args.lesions]}

    tracker = Tracker(root, device="cpu", preset="fast", registration="gradicon")
    _, warmup = timed(lambda: tracker.scan(scans[0]) and tracker.scan(scans[1]) and tracker.scan(scans[2]))
    _, one = timed(lambda: tracker.track(scans, {1: prompts[1]}))
    tracker._deformations.clear()
    tracker.registrations_computed = 0
    _, shared = timed(lambda: tracker.track(scans, prompts))
    shared_registrations = tracker.registrations_computed

    def per_lesion(lesion_tracker: Tracker) -> None:  # the official behaviour: every lesion registers every pair again
        for lesion_id, prompt in prompts.items():
            lesion_tracker._deformations.clear()  # scans stay preprocessed: only registration is repeated
            lesion_tracker.track(scans, {lesion_id: prompt})

    tracker.registrations_computed = 0
    _, separate = timed(lambda: per_lesion(tracker))
    separate_registrations = tracker.registrations_computed
    official_tracker = Tracker(root, device="cpu", preset="fast",
                               registration=OfficialForwardRegistration(tracker.folds[0].registration))
    for scan in scans:
        official_tracker.scan(scan)
    _, official = timed(lambda: per_lesion(official_tracker))

    pair = tracker.scan(scans[0]), tracker.scan(scans[1])
    moving = preprocessed_volume(pair[0].pre, scans[0], slice(0, pair[0].pre.grid_shape_zyx[0]))
    fixed = preprocessed_volume(pair[1].pre, scans[1], slice(0, pair[1].pre.grid_shape_zyx[0]))
    _, gradicon_time = timed(lambda: tracker.folds[0].registration.register(moving, fixed))
    _, classical_time = timed(lambda: make_registration("classical").register(moving, fixed))

    n = len(prompts)
    print(f"scans {SHAPE_ZYX} (z,y,x) at 0.8x0.8x3 mm, 1 baseline + 2 follow-ups, CPU {args.threads} threads, "
          f"full-size random uniGradICON + ResEnc-L track U-Net (preprocessing, cached: {warmup:.1f} s)")
    print(f"1 lesion, shared registration:  {one:7.1f} s")
    print(f"{n} lesions, shared registration: {shared:7.1f} s  ({shared / n:.1f} s per lesion, {shared_registrations} registrations)")
    print(f"{n} lesions, per-lesion registration (ours, φ_AB only): {separate:7.1f} s  ({separate / n:.1f} s per lesion, "
          f"{separate_registrations} registrations)")
    print(f"{n} lesions, per-lesion registration with the official full forward (both directions + losses): "
          f"{official:7.1f} s  ({official / n:.1f} s per lesion, {official_tracker.registrations_computed} registrations)")
    print(f"ratio per-lesion / shared with {n} lesions, same registration (the gain of sharing alone): "
          f"{separate / shared:.2f}x")
    print(f"ratio official per-lesion behaviour / ours with {n} lesions: {official / shared:.2f}x")
    print(f"one registration of a pair: GradICON {gradicon_time:.1f} s, classical (SimpleITK) {classical_time:.1f} s")


if __name__ == "__main__":
    main()
