"""uniGradICON registration of the Track checkpoint against the official intermediates (fixtures §6, §7).

The fixture inputs are preprocessed here with nnU-Net's own functions and the Track plans, as the official tracker
does, so these tests do not depend on the engine's preprocessing. Registrations at the official 175³ grid take
20-60 s on this CPU: those tests are `slow`; the default suite checks the wiring on a small grid.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from icon_registration import networks

from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.image import ImageVolume
from LesionLocatorLib.registration import UnknownRegistrationError, make_registration
from LesionLocatorLib.registration.classical import ClassicalRegistration
from LesionLocatorLib.registration.gradicon import GradICONRegistration

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"
TRACK = FIXTURES / "tiny" / "LesionLocatorTrack"
TRACK_INPUTS = FIXTURES / "inputs" / "A_trk"
SMALL_GRID = (72, 72, 72)

torch.set_num_threads(2)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared fixture missing: {path}")
    return path


@lru_cache(maxsize=1)
def track_weights() -> dict[str, torch.Tensor]:
    checkpoint = torch.load(require(TRACK / "fold_0" / "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    return checkpoint["network_weights"]


def track_preprocessed(image_path: Path, labels_path: Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """nnU-Net's DefaultPreprocessor steps with the Track plans: crop to non-zero, CTNormalization, resampling.

    Returns the (z, y, x) float32 image and, if given, the label map resampled like a segmentation."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

    plans = json.loads(require(TRACK / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    statistics = plans["foreground_intensity_properties_per_channel"]["0"]
    image = sitk.ReadImage(str(require(image_path)))
    data = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    labels = None
    if labels_path is not None:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(require(labels_path))))[None].astype(np.int16)
    spacing_zyx = list(image.GetSpacing())[::-1]
    data, cropped_labels, _ = crop_to_nonzero(data, labels)  # without labels it returns the non-zero mask
    shape = compute_new_shape(data.shape[1:], spacing_zyx, configuration["spacing"])
    data = np.clip(data, statistics["percentile_00_5"], statistics["percentile_99_5"])
    data = (data - statistics["mean"]) / statistics["std"]
    data = resample_data_or_seg_to_shape(
        data, shape, spacing_zyx, configuration["spacing"], **configuration["resampling_fn_data_kwargs"]
    )
    if labels is not None:
        labels = resample_data_or_seg_to_shape(
            cropped_labels, shape, spacing_zyx, configuration["spacing"], **configuration["resampling_fn_seg_kwargs"]
        )[0]
    return data[0].astype(np.float32), labels


def intermediates(run_id: str) -> tuple[dict, dict[str, np.ndarray]]:
    archive = np.load(require(FIXTURES / "intermediates" / f"{run_id}.npz"))
    return json.loads(str(archive["meta_json"])), {k: archive[k] for k in archive.files if k != "meta_json"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def count_unet_calls(registration: GradICONRegistration) -> list[int]:
    """One counter for all tallUNet2 forward calls: 4 for φ_AB alone, 8 if the reverse direction also ran."""
    calls = [0]
    for module in registration.network.modules():
        if isinstance(module, networks.UNet2):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- loading ----------------------------------------------------------------------------------------------------
def test_reg_net_loads_strictly_with_unigradicons_key_layout():
    registration = GradICONRegistration.from_track_state_dict(track_weights(), input_shape=SMALL_GRID)
    keys = list(registration.network.state_dict())
    assert len(keys) == 188 and not any("identity_map" in k for k in keys)  # identity maps are not persistent
    unigradicon = pytest.importorskip("unigradicon")
    official = unigradicon.make_network([1, 1, *SMALL_GRID], include_last_step=True)
    assert keys == list(official.state_dict())
    assert not registration.network.training and all(not m.training for m in registration.network.modules())


def test_incomplete_weights_are_refused_with_a_checkpoint_error():
    weights = {k[len("reg_net."):]: v for k, v in track_weights().items() if k.startswith("reg_net.")}
    weights.pop(next(k for k in weights if k.endswith("running_var")))
    with pytest.raises(CheckpointError, match="uniGradICON"):
        GradICONRegistration(weights, input_shape=SMALL_GRID)
    unet_only = {k: v for k, v in track_weights().items() if not k.startswith("reg_net.")}
    with pytest.raises(CheckpointError, match="no registration network"):
        GradICONRegistration.from_track_state_dict(unet_only)


def test_make_registration_by_name():
    assert isinstance(make_registration("classical"), ClassicalRegistration)
    assert isinstance(make_registration("GradICON", track_weights()), GradICONRegistration)
    with pytest.raises(CheckpointError, match="classical"):
        make_registration("gradicon")
    with pytest.raises(UnknownRegistrationError, match="gradicon, classical"):
        make_registration("elastix")


# --- behaviour on a small grid (fast) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_fov_pair() -> tuple[ImageVolume, ImageVolume, np.ndarray]:
    baseline, labels = track_preprocessed(
        TRACK_INPUTS / "A_trk_small_bl.nii.gz", TRACK_INPUTS / "prompts" / "A_trk_small_bl_inst.nii.gz"
    )
    followup, _ = track_preprocessed(TRACK_INPUTS / "A_trk_small_fu.nii.gz")
    return ImageVolume(baseline), ImageVolume(followup), (labels == 1).astype(np.uint8)


def test_only_phi_ab_is_computed(small_fov_pair):
    moving, fixed, _ = small_fov_pair
    registration = GradICONRegistration.from_track_state_dict(track_weights(), input_shape=SMALL_GRID)
    calls = count_unet_calls(registration)
    registration.register(moving, fixed)
    assert calls[0] == 4  # the four tallUNet2 of φ_AB; the official forward also runs them for φ_BA


@pytest.mark.slow
def test_phi_ab_equals_the_one_of_the_official_full_forward(small_fov_pair):
    """GradientICONSparse.forward (both directions, losses) gives the same φ_AB as our φ_AB-only pass."""
    unigradicon = pytest.importorskip("unigradicon")
    moving, fixed, _ = small_fov_pair
    registration = GradICONRegistration.from_track_state_dict(track_weights(), input_shape=SMALL_GRID)
    deformation = registration.register(moving, fixed)
    official = unigradicon.make_network([1, 1, *SMALL_GRID], include_last_step=True)
    official.regis_net.load_state_dict(registration.network.regis_net.state_dict())
    official.eval()
    with torch.no_grad():
        official(registration._on_network_grid(moving.array), registration._on_network_grid(fixed.array))
    torch.testing.assert_close(deformation.phi_ab, official.phi_AB_vectorfield, rtol=0, atol=1e-6)


def test_warp_mask_returns_a_binary_mask_on_the_fixed_grid(small_fov_pair):
    moving, fixed, lesion = small_fov_pair
    deformation = GradICONRegistration.from_track_state_dict(track_weights(), input_shape=SMALL_GRID).register(
        moving, fixed
    )
    warped = deformation.warp_mask(lesion)
    assert warped.shape == fixed.shape_zyx and warped.dtype == np.uint8 and set(np.unique(warped)) <= {0, 1}
    # The tiny network moves by a few grid voxels: the lesion stays close to where it was.
    assert dice(warped, lesion) > 0.5
    assert deformation.displacement_voxels().shape == (3, *SMALL_GRID)
    with pytest.raises(ValueError, match="moving"):
        deformation.warp_mask(lesion[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fp16 autocast path)")
def test_cuda_fp16_is_close_to_cpu_fp32(small_fov_pair):
    moving, fixed, _ = small_fov_pair
    cpu = GradICONRegistration.from_track_state_dict(track_weights(), input_shape=SMALL_GRID).register(moving, fixed)
    cuda = GradICONRegistration.from_track_state_dict(track_weights(), "cuda", SMALL_GRID).register(moving, fixed)
    assert cuda.phi_ab.dtype == torch.float32
    assert np.abs(cuda.displacement_voxels() - cpu.displacement_voxels()).max() < 0.05


# --- the official intermediates at 175³ (slow) ------------------------------------------------------------------
def assert_pass_matches(meta_pass: dict, arrays: dict, prefix: str, deformation, warped: np.ndarray) -> None:
    displacement = deformation.displacement_voxels()
    official = arrays[f"{prefix}__disp175_vox_sub7"].astype(np.float32)
    assert np.abs(displacement[:, ::7, ::7, ::7] - official).max() < 5e-3  # float16 storage
    length = np.linalg.norm(displacement, axis=0)
    assert length.max() == pytest.approx(meta_pass["disp175_vox_max"], abs=1e-4)
    assert length.mean() == pytest.approx(meta_pass["disp175_vox_mean"], abs=1e-4)
    official_mask = arrays[f"{prefix}__warped_mask_fu"]
    assert dice(warped, official_mask) >= 0.99
    assert (warped != official_mask).sum() <= 0.002 * official_mask.sum()


@pytest.mark.slow
def test_a20_chain_first_pair_matches_the_official_displacement_and_warped_masks():
    meta, arrays = intermediates("A20_trk_chain3_prevmask_gap")
    baseline, labels = track_preprocessed(
        TRACK_INPUTS / "A_trk_bl.nii.gz", TRACK_INPUTS / "prompts" / "A_trk_bl_gap_inst.nii.gz"
    )
    followup, _ = track_preprocessed(TRACK_INPUTS / "A_trk_fu1.nii.gz")
    registration = GradICONRegistration.from_track_state_dict(track_weights())
    calls = count_unet_calls(registration)
    deformation = registration.register(ImageVolume(baseline), ImageVolume(followup))
    assert calls[0] == 4
    for pair in (0, 1):  # lesions 1 and 3 share the registration
        record = meta["trk_pairs"][pair]
        warped = deformation.warp_mask(labels == record["lesion_index"])
        assert_pass_matches(record["passes"][0], arrays, f"trk_pairs{pair}__pass0", deformation, warped)
    assert calls[0] == 4  # warping does not run the network again


@pytest.mark.slow
def test_a23_small_field_of_view_matches_the_official_displacement_and_warped_mask(small_fov_pair):
    meta, arrays = intermediates("A23_trk_smallfov_pad")
    moving, fixed, lesion = small_fov_pair
    record = meta["trk_pairs"][0]["passes"][0]
    assert [list(moving.shape_zyx), list(fixed.shape_zyx)] == [record["x0_shape"], record["x1_shape"]]
    deformation = GradICONRegistration.from_track_state_dict(track_weights()).register(moving, fixed)
    assert_pass_matches(record, arrays, "trk_pairs0__pass0", deformation, deformation.warp_mask(lesion))


@pytest.mark.slow
def test_a22_z_aligned_pair_matches_the_official_warped_masks():
    from LesionLocatorLib.registration.zalign import z_alignment_windows

    meta, arrays = intermediates("A22_trk_zalign_listmasks")
    baseline, _ = track_preprocessed(TRACK_INPUTS / "A_trk_bl.nii.gz")
    followup, _ = track_preprocessed(TRACK_INPUTS / "A_trk_fulong.nii.gz")
    moving_window, fixed_window = z_alignment_windows(baseline, followup)
    deformation = GradICONRegistration.from_track_state_dict(track_weights()).register(
        ImageVolume(baseline[moving_window]), ImageVolume(followup[fixed_window])
    )
    for pair, mask_name in enumerate(("A_trk_bl_les1.nii.gz", "A_trk_bl_les2.nii.gz")):
        _, lesion = track_preprocessed(TRACK_INPUTS / "A_trk_bl.nii.gz", TRACK_INPUTS / "prompts" / mask_name)
        record = meta["trk_pairs"][pair]["passes"][0]
        warped = deformation.warp_mask((lesion == 1)[moving_window])
        assert_pass_matches(record, arrays, f"trk_pairs{pair}__pass0", deformation, warped)
