"""Lite model training: samples made like inference input, a tiny training run, an official-format checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from LesionLocatorLib.checkpoint import MODEL_MANIFEST, load_checkpoint_folder, resolve_task_folder
from LesionLocatorLib.prompts import BOX_MARGIN_VOXELS, POINT_BALL_RADIUS, box_to_preprocessed
from LesionLocatorLib.synthetic.cases import make_case
from LesionLocatorLib.synthetic.phantoms import make_phantom
from LesionLocatorLib.synthetic.prompts import jittered_box
from LesionLocatorLib.preprocessing import Preprocessor
from LesionLocatorLib.training.plans import (
    LiteModelConfig, build_lite_network, config_from_plans, make_plans, plans_model_folder, write_model_root,
)
from LesionLocatorLib.training.samples import (
    cached_sample_paths, load_sample, make_batch, place_patch, samples_from_case, save_sample, simulate_dense_prompt,
    user_box_in_preprocessed,
)
from LesionLocatorLib.training.trainer import (
    TrainingOptions, TrainingState, deep_supervision_loss, dice_ce_loss, export_model, train,
)

TINY = LiteModelConfig(patch_size_zyx=(16, 32, 32), spacing_zyx=(3.0, 3.0, 3.0), features_per_stage=(4, 8, 16),
                       blocks_per_stage=(1, 1, 1))
REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "Resources" / "Models" / "LesionLocatorLite"


@pytest.fixture(scope="module")
def tiny_samples():
    rng = np.random.default_rng(3)
    background = make_phantom("head_phantom", rng, max_voxels=300_000)
    case = make_case(background, rng, lesion_count=3, diameter_range_mm=(12.0, 30.0))
    samples = samples_from_case(case, Preprocessor(plans_model_folder(TINY)), TINY)
    assert samples, "no lesion survived resampling"
    return samples


def test_plans_are_complete_nnunet_plans():
    plans = make_plans(LiteModelConfig())
    configuration = plans["configurations"]["3d_fullres"]
    for key in ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                "resampling_fn_seg", "resampling_fn_probabilities", "resampling_fn_data_kwargs", "architecture"):
        assert key in configuration
    assert configuration["architecture"]["network_class_name"].endswith("unet.ResidualEncoderUNet")
    assert set(plans["foreground_intensity_properties_per_channel"]["0"]) >= {"mean", "std", "percentile_00_5",
                                                                              "percentile_99_5"}
    assert plans["transpose_forward"] == plans["transpose_backward"] == [0, 1, 2]
    assert config_from_plans(plans) == LiteModelConfig()


def test_bundled_model_fits_its_size_budget():
    """Issue #5: the bundled Lite model, everything under Resources/Models/LesionLocatorLite, is at most 25 MB."""
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR

    files = [path for path in BUNDLED_LITE_DIR.rglob("*") if path.is_file()]
    if not files:
        pytest.skip("bundled Lite model missing")
    assert sum(path.stat().st_size for path in files) <= 25e6


def test_default_network_size_and_cpu_speed():
    network = build_lite_network(LiteModelConfig()).eval()
    parameters = sum(p.numel() for p in network.parameters())
    assert parameters * 4 < 20e6  # fp32 weights well under the 25 MB budget
    with torch.no_grad():
        output = network(torch.zeros((1, 2) + LiteModelConfig().patch_size_zyx))
    assert output.shape == (1, 2) + LiteModelConfig().patch_size_zyx


def test_samples_are_preprocessed_crops_with_the_lesion(tiny_samples):
    for sample in tiny_samples:
        assert sample.image.dtype == np.float32 and sample.target.any()
        assert sample.image.shape == sample.target.shape
        # CT normalization with the plans' statistics: clipped HU range maps to about [-3.0, 2.8]
        assert -3.1 < sample.image.min() and sample.image.max() < 2.9


def test_prompt_encoding_and_patch_placement_match_inference(tiny_samples):
    rng = np.random.default_rng(0)
    sample = max(tiny_samples, key=lambda s: s.target.sum())
    point = simulate_dense_prompt(sample.target, "point", rng)
    centre = np.argwhere(point == 1).mean(axis=0)
    assert sample.target[tuple(np.round(centre).astype(int))]
    if np.all((centre >= POINT_BALL_RADIUS) & (centre < np.asarray(point.shape) - POINT_BALL_RADIUS)):
        assert point.sum() == 739  # skimage ball(5, strict_radius=False)
    box = simulate_dense_prompt(sample.target, "box", rng)
    assert np.all(box[sample.target] == 1) or box[sample.target].mean() > 0.9  # box covers the lesion up to jitter
    image, target, prompt = place_patch(sample.image, sample.target, box, TINY.patch_size_zyx, rng, "box")
    assert image.shape == target.shape == prompt.shape == TINY.patch_size_zyx
    lo, hi = np.argwhere(prompt > 0).min(axis=0), np.argwhere(prompt > 0).max(axis=0)
    patch = np.asarray(TINY.patch_size_zyx)
    free = (lo > 0) & (hi < patch - 1)  # axes where the patch was not shifted by the crop border
    assert np.all(np.abs((lo + hi) / 2 - (patch - 1) / 2)[free] <= 1.0)


def test_training_boxes_are_the_boxes_inference_gets_from_a_coarser_scan():
    # native scan (z, y, x) with 3 mm slices and 1 mm pixels; the network grid is 1 mm: scale (3, 1, 1)
    native_mask = np.zeros((12, 40, 40), bool)
    native_mask[4:7, 10:22, 15:30] = True
    scale_zyx = np.array([3.0, 1.0, 1.0])
    preprocessed_target = np.repeat(native_mask, 3, axis=0)  # grids aligned: the resampled mask is exact
    for seed in range(20):
        native_box = jittered_box(native_mask, np.random.default_rng(seed), max_jitter_voxels=2)
        inference_box = box_to_preprocessed(*native_box, np.zeros(3), scale_zyx, preprocessed_target.shape)
        training_box = user_box_in_preprocessed(preprocessed_target, scale_zyx, np.random.default_rng(seed))
        np.testing.assert_array_equal(training_box, inference_box)
    # the jitter spans up to 2 native voxels: 6 preprocessed slices in z (+1 margin), 2 voxels (+1) in y and x
    boxes = [user_box_in_preprocessed(preprocessed_target, scale_zyx, np.random.default_rng(s)) for s in range(200)]
    target_lo, target_hi = np.array([12, 10, 15]), np.array([21, 22, 30])
    outward = np.array([np.maximum(target_lo - lo, hi - target_hi) for lo, hi in boxes])
    assert outward.max(axis=0).tolist() == [6 + BOX_MARGIN_VOXELS, 2 + BOX_MARGIN_VOXELS, 2 + BOX_MARGIN_VOXELS]
    # without a native spacing the preprocessed grid is taken as the scan's: 2 voxels (+1) on every axis
    for seed in range(50):
        box = np.argwhere(simulate_dense_prompt(preprocessed_target, "box", np.random.default_rng(seed)))
        assert np.all(np.maximum(target_lo - box.min(axis=0), box.max(axis=0) + 1 - target_hi) <= 2 + BOX_MARGIN_VOXELS)


def test_batches_have_network_layout(tiny_samples):
    inputs, targets = make_batch(tiny_samples[:2], TINY.patch_size_zyx, TINY.spacing_zyx, np.random.default_rng(1))
    assert inputs.shape == (2, 2) + TINY.patch_size_zyx and targets.shape == (2,) + TINY.patch_size_zyx
    assert inputs.dtype == np.float32 and targets.dtype == np.int64
    assert np.all(inputs[:, 1].reshape(2, -1).max(axis=1) == 1)  # every sample has a prompt


def test_dice_loss_counts_every_lesion_equally():
    target = torch.zeros((2, 8, 8, 8), dtype=torch.long)
    target[0, 2:6, 2:6, 2:6] = 1  # a 64-voxel lesion, predicted perfectly
    target[1, 4, 4, 4] = 1  # a one-voxel lesion, missed
    logits = torch.stack([torch.full(target.shape, 20.0), torch.zeros(target.shape)], dim=1)
    logits[:, 1][target == 1] = 40.0
    logits[1, 1, 4, 4, 4] = 0.0
    assert dice_ce_loss(logits, target).item() == pytest.approx(0.5, abs=0.03)  # a batch Dice would give ~0.03
    outputs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
    assert deep_supervision_loss(outputs, target).item() > 0.5 * dice_ce_loss(logits, target).item()


def test_a_two_stage_network_trains_on_its_single_output(tiny_samples, tmp_path):
    target = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    target[0, 2:6, 2:6, 2:6] = 1
    logits = torch.randn((1, 2, 8, 8, 8))
    # a single output is the full-resolution one: it keeps its weight (it used to get 0/0 = NaN)
    assert deep_supervision_loss([logits], target).item() == pytest.approx(dice_ce_loss(logits, target).item())
    (tmp_path / "cache").mkdir()
    save_sample(tmp_path / "cache", 0, tiny_samples[0])
    two_stages = LiteModelConfig(patch_size_zyx=(16, 32, 32), spacing_zyx=(3.0, 3.0, 3.0), features_per_stage=(4, 8),
                                 blocks_per_stage=(1, 1))
    options = TrainingOptions(steps=3, log_every=1, device="cpu", prompt_mix=(0.0, 1.0, 0.0))
    _, state = train(two_stages, options, tmp_path / "cache", tmp_path / "work", progress=None)
    assert state.step == 3 and np.all(np.isfinite(state.losses))


def test_a_loss_that_is_not_finite_stops_training_before_the_weights_change(tiny_samples, tmp_path, monkeypatch):
    from LesionLocatorLib.errors import LesionLocatorError
    from LesionLocatorLib.training import trainer

    (tmp_path / "cache").mkdir()
    save_sample(tmp_path / "cache", 0, tiny_samples[0])
    options = TrainingOptions(steps=4, log_every=1, checkpoint_every=2, device="cpu", prompt_mix=(0.0, 1.0, 0.0))
    train(TINY, TrainingOptions(steps=2, log_every=1, checkpoint_every=2, device="cpu", prompt_mix=(0.0, 1.0, 0.0)),
          tmp_path / "cache", tmp_path / "work", progress=None)
    saved = torch.load(tmp_path / "work" / "checkpoint_latest.pth", weights_only=False)["network_weights"]
    monkeypatch.setattr(trainer, "deep_supervision_loss", lambda outputs, target: outputs[0].sum() * float("nan"))
    seen = {}
    real_step = trainer._step

    def step_and_keep_weights(network, *args):
        seen["network"] = network
        return real_step(network, *args)

    monkeypatch.setattr(trainer, "_step", step_and_keep_weights)
    with pytest.raises(LesionLocatorError, match="loss became nan.*--resume and a lower --lr"):
        train(TINY, options, tmp_path / "cache", tmp_path / "work", resume=True, progress=None)
    after = seen["network"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.items())  # the bad step changed nothing


def test_tiny_training_reduces_loss_and_writes_a_loadable_model(tiny_samples, tmp_path):
    (tmp_path / "cache").mkdir()
    save_sample(tmp_path / "cache", 0, tiny_samples[0])
    assert load_sample(cached_sample_paths(tmp_path / "cache")[0]).target.sum() == tiny_samples[0].target.sum()
    options = TrainingOptions(steps=20, learning_rate=1e-2, warmup_steps=1, log_every=1, checkpoint_every=10, seed=0,
                              device="cpu", prompt_mix=(0.0, 1.0, 0.0))
    network, state = train(TINY, options, tmp_path / "cache", tmp_path / "work", progress=None)
    assert state.step == 20 and len(state.losses) == 20
    assert np.mean(state.losses[-5:]) < 0.8 * np.mean(state.losses[:5])

    root = export_model(network, TINY, tmp_path / "model", state)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    assert manifest["tasks"] == {"point": "net", "box": "net", "track": "net"}
    for task in ("point", "box", "track"):
        assert resolve_task_folder(root, task) == root / "net"
    model = load_checkpoint_folder(root / "net")
    rebuilt = model.build_network()
    rebuilt.load_state_dict(model.fold_weights[0], strict=True)
    assert model.patch_size_zyx == TINY.patch_size_zyx and model.num_image_channels == 1 and model.num_classes == 2


def test_resume_continues_from_the_latest_checkpoint(tiny_samples, tmp_path):
    (tmp_path / "cache").mkdir()
    save_sample(tmp_path / "cache", 0, tiny_samples[0])
    stopped = TrainingOptions(steps=6, time_limit_s=0.0, device="cpu")
    _, state = train(TINY, stopped, tmp_path / "cache", tmp_path / "work", progress=None)
    assert state.step == 0  # the time limit stopped it before the first step, leaving a checkpoint
    _, state = train(TINY, TrainingOptions(steps=3, log_every=1, device="cpu"), tmp_path / "cache", tmp_path / "work",
                     resume=True, progress=None)
    assert state.step == 3
    steps_run = []
    _, state = train(TINY, TrainingOptions(steps=6, log_every=1, device="cpu"), tmp_path / "cache", tmp_path / "work",
                     resume=True, progress=lambda step, *_: steps_run.append(step))
    assert steps_run == [4, 5, 6] and state.step == 6 and len(state.losses) == 6


def test_training_can_start_from_a_model_and_use_smaller_patches(tiny_samples, tmp_path):
    (tmp_path / "cache").mkdir()
    save_sample(tmp_path / "cache", 0, tiny_samples[0])
    start = build_lite_network(TINY)
    root = export_model(start, TINY, tmp_path / "start", TrainingState())
    frozen = TrainingOptions(steps=2, learning_rate=0.0, device="cpu", init_weights=str(root), patch_size_zyx=(16, 16, 16))
    network, _ = train(TINY, frozen, tmp_path / "cache", tmp_path / "work", progress=None)
    for key, value in start.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


@pytest.mark.skipif(not (BUNDLED / MODEL_MANIFEST).is_file(), reason="bundled Lite model not trained yet")
def test_bundled_model_loads_strictly_and_fits_the_size_budget():
    total_bytes = sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file())
    assert total_bytes <= 25 * 1024 * 1024
    for folder in {resolve_task_folder(BUNDLED, task) for task in ("point", "box", "track")}:
        model = load_checkpoint_folder(folder)
        network = model.build_network()
        network.load_state_dict(model.fold_weights[0], strict=True)
        assert all(v.dtype == torch.float32 for v in model.fold_weights[0].values() if v.is_floating_point())


ABDOMEN_CT = REPO.parent / "shared" / "data" / "totalsegmentator_examples" / "example_ct.nii.gz"


@pytest.mark.skipif(not ABDOMEN_CT.is_file(), reason=f"shared data missing: {ABDOMEN_CT}")
def test_train_command_generates_trains_and_exports(tmp_path):
    import argparse

    from LesionLocatorLib.training import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([
        "--output", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), "--cache-size", "3", "--steps", "2",
        "--patch-size", "16", "32", "32", "--spacing", "3", "3", "3", "--features", "4", "8", "16", "--blocks", "1", "1",
        "1", "--backgrounds", "abdomen_ct=1", "--data-root", str(ABDOMEN_CT.parents[1]), "--device", "cpu",
        "--no-validate",
    ])
    assert cli.run(args) == 0
    assert len(list((tmp_path / "work" / "samples").glob("sample_*.npz"))) == 3
    model = load_checkpoint_folder(resolve_task_folder(tmp_path / "model", "box"))
    model.build_network().load_state_dict(model.fold_weights[0], strict=True)
    manifest = json.loads((tmp_path / "model" / MODEL_MANIFEST).read_text())
    assert manifest["point_search"] == {"box_sizes_mm": [8.0, 12.0, 18.0, 27.0, 40.0, 60.0]}  # as the bundled model


def test_train_command_sets_or_removes_the_point_search(tmp_path, capsys):
    import argparse

    from LesionLocatorLib.errors import LesionLocatorError
    from LesionLocatorLib.segmentation import Segmenter
    from LesionLocatorLib.training import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    root = tmp_path / "model"
    common = ["--output", str(root), "--work-dir", str(tmp_path / "work"), "--cache-size", "2", "--steps", "1",
              "--patch-size", "16", "32", "32", "--spacing", "3", "3", "3", "--features", "4", "8", "16", "--blocks",
              "1", "1", "1", "--backgrounds", "head_phantom:7=1", "--device", "cpu", "--no-validate"]

    def manifest() -> dict:
        return json.loads((root / MODEL_MANIFEST).read_text())

    assert cli.run(parser.parse_args(common + ["--tasks", "point"])) == 0  # no box network: no search yet
    assert "point_search" not in manifest() and "needs a box network" in capsys.readouterr().err
    assert cli.run(parser.parse_args(common + ["--tasks", "box", "track", "--point-search", "10", "30",
                                               "--overwrite"])) == 0
    assert manifest()["point_search"] == {"box_sizes_mm": [10.0, 30.0]}
    assert Segmenter(root, device="cpu").point_search.box_sizes_mm == (10.0, 30.0)
    capsys.readouterr()
    (root / MODEL_MANIFEST).write_text(json.dumps({**manifest(), "box_refinement": {"fitted": "for the old network"}}))
    assert cli.run(parser.parse_args(common + ["--tasks", "box", "--no-point-search", "--overwrite"])) == 0
    assert "point_search" not in manifest() and manifest()["tasks"]["point"] == "net_point"
    assert "box_refinement" not in manifest() and "fit-box-refinement" in capsys.readouterr().err
    with pytest.raises(LesionLocatorError, match="positive"):
        cli.run(parser.parse_args(common + ["--point-search", "0", "10"]))


def test_train_command_keeps_an_earlier_checkpoint_and_model_unless_told_to_overwrite(tmp_path):
    """A second run into the same --output neither restarts over the resumable checkpoint nor replaces the exported
    network: it stops at once (before making samples) and says what to do; --overwrite replaces both."""
    import argparse

    from LesionLocatorLib.errors import LesionLocatorError
    from LesionLocatorLib.training import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    root, work = tmp_path / "model", tmp_path / "work"
    common = ["--output", str(root), "--cache-size", "2", "--steps", "1", "--patch-size", "16", "32", "32",
              "--spacing", "3", "3", "3", "--features", "4", "8", "16", "--blocks", "1", "1", "1", "--backgrounds",
              "head_phantom:7=1", "--device", "cpu", "--no-validate"]
    assert cli.run(parser.parse_args(common + ["--work-dir", str(work)])) == 0
    saved = [work / "checkpoint_latest.pth", root / "net" / "fold_0" / "checkpoint_final.pth"]
    before = [path.read_bytes() for path in saved]
    with pytest.raises(LesionLocatorError, match="holds an earlier training run.*--resume.*--overwrite"):
        cli.run(parser.parse_args(common + ["--work-dir", str(work), "--seed", "1"]))
    with pytest.raises(LesionLocatorError, match=r"holds the network\(s\) in .*net for point/box/track.*--overwrite"):
        cli.run(parser.parse_args(common + ["--work-dir", str(tmp_path / "other_work")]))
    with pytest.raises(LesionLocatorError, match="net for point"):  # net_point is new, but point's network is net
        cli.run(parser.parse_args(common + ["--work-dir", str(tmp_path / "other_work"), "--tasks", "point"]))
    with pytest.raises(LesionLocatorError, match="already holds the network"):  # continuing replaces it too
        cli.run(parser.parse_args(common + ["--work-dir", str(work), "--resume", "--steps", "2"]))
    assert [path.read_bytes() for path in saved] == before and not (tmp_path / "other_work").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(LesionLocatorError, match="lies under the file"):
        cli.run(parser.parse_args(common + ["--work-dir", str(tmp_path / "file" / "work")]))
    assert cli.run(parser.parse_args(common + ["--work-dir", str(work), "--seed", "1", "--overwrite"])) == 0
    assert all(path.read_bytes() != old for path, old in zip(saved, before))


@pytest.mark.parametrize("bad, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--backgrounds", "no_such_scan"], "Unknown background 'no_such_scan'"),
    (["--backgrounds", "body_phantom:x"], "seed must be a whole number"),
    (["--backgrounds", "head_phantom:1=-1"], "must be zero or more"),
    (["--prompt-mix", "0", "0", "0"], "not all zero"),
    (["--init-from", "missing_run/checkpoint_latest.pth"], "no such checkpoint"),
    (["--seed", "-1"], "--seed must be zero or more"),
    (["--validation-cases", "0"], "--validation-cases must be at least 1"),
    (["--features", "8", "--blocks", "1"], "at least 2 stages"),
    (["--features", "8", "16", "--blocks", "1"], "one entry per stage to both --features and --blocks"),
    (["--patch-size", "48", "80", "72"], r"\(48, 80, 72\) must be divisible by 16 .* --patch-size"),
    (["--train-patch-size", "30", "64", "64"], r"\(30, 64, 64\) must be divisible by 16 .* --train-patch-size"),
])
def test_train_command_rejects_bad_settings_before_making_samples(tmp_path, bad, message):
    """Each mistake fails at once with what to do, before minutes of sample generation, and writes nothing."""
    import argparse

    from LesionLocatorLib.errors import LesionLocatorError
    from LesionLocatorLib.training import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args(["--output", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), *bad])
    with pytest.raises(LesionLocatorError, match=message):
        cli.run(args)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad, message", [
    (["--skip", "segmentation", "tracking", "open_ms"], "Nothing to evaluate"),
    (["--seed", "-3"], "--seed must be zero or more"),
    (["--cases-per-background", "0"], "--cases-per-background must be at least 1"),
    (["--lesions-per-case", "0"], "--lesions-per-case must be at least 1"),
])
def test_evaluate_rejects_settings_that_would_score_nothing(tmp_path, capsys, bad, message):
    from LesionLocatorLib import cli

    assert cli.main(["evaluate", *bad, "-o", str(tmp_path / "out.json")]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["fit-box-refinement", "fit-point-search", "fit-point-extent"])
@pytest.mark.parametrize("bad, message", [
    (["--seed", "-1"], "--seed must be zero or more"),
    (["--cases-per-background", "-2"], "--cases-per-background must be zero or more"),
    (["--lesions-per-case", "0"], "--lesions-per-case must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--backgrounds", "brain_atlas_ct"], "are validation backgrounds; fitting on them would leak"),
    (["--backgrounds", "no_such_scan"], "Unknown background 'no_such_scan'"),
])
def test_fit_commands_check_their_settings_before_making_data(tmp_path, capsys, command, bad, message):
    import shutil

    from LesionLocatorLib import cli

    root = tmp_path / "model"
    shutil.copytree(BUNDLED, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert cli.main([command, "-m", str(root), *bad]) == 2
    assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("command, bad, message", [
    ("fit-box-refinement", ["--hidden", "0"], "--hidden must be at least 1"),
    ("fit-box-refinement", ["--voxels-per-lesion", "0"], "--voxels-per-lesion must be at least 1"),
    ("fit-box-refinement", ["--conv-epochs", "0"], "--conv-epochs must be at least 1"),
    ("fit-point-search", ["--seeds", "0"], "--seeds must be at least 1"),
    ("fit-point-search", ["--clicks-per-lesion", "0"], "--clicks-per-lesion must be at least 1"),
    ("fit-point-extent", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("fit-point-extent", ["--lr", "0"], "--lr must be positive"),
])
def test_each_fit_command_checks_its_own_counts(capsys, command, bad, message):
    from LesionLocatorLib import cli

    assert cli.main([command, "-m", str(BUNDLED), *bad]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_rejects_an_unknown_background_at_once(capsys):
    from LesionLocatorLib import cli

    assert cli.main(["evaluate", "--backgrounds", "abdomen", "--skip", "tracking", "open_ms"]) == 2
    assert "Unknown background 'abdomen'; use one of" in capsys.readouterr().err


@pytest.mark.skipif(not (BUNDLED / MODEL_MANIFEST).is_file(), reason="bundled Lite model not trained yet")
def test_bundled_model_segments_clear_lung_lesions_from_boxes():
    from LesionLocatorLib.prompts import BoxPrompt
    from LesionLocatorLib.segmentation import Segmenter
    from LesionLocatorLib.synthetic.prompts import bounding_box
    from LesionLocatorLib.training.validation import dice_score

    rng = np.random.default_rng(1)
    case = make_case(make_phantom("body_phantom", rng, max_voxels=600_000), rng, 2, diameter_range_mm=(20.0, 30.0),
                     sites=["lung"])
    segmenter = Segmenter(BUNDLED, device="cpu")
    for lesion in case.lesions:
        mask = case.lesion_mask(lesion.lesion_id)
        result = segmenter.segment(case.image, {lesion.lesion_id: BoxPrompt(*bounding_box(mask))})
        assert dice_score(result.masks[lesion.lesion_id], mask) > 0.7


def test_size_weighting_draws_large_lesions_more_often(tiny_samples, tmp_path):
    from LesionLocatorLib.training.trainer import SamplePool

    for index, sample in enumerate(tiny_samples):
        save_sample(tmp_path, index, sample)
    sizes = [int(s.target.sum()) for s in tiny_samples]
    largest = int(np.argmax(sizes))

    def share_of_largest(alpha: float) -> float:
        pool = SamplePool(tmp_path, len(tiny_samples), np.random.default_rng(0), size_weighting=alpha)
        drawn = [int(s.target.sum()) for s in pool.draw(3000)]
        return drawn.count(sizes[largest]) / len(drawn)

    uniform, weighted = share_of_largest(0.0), share_of_largest(1.0)
    assert abs(uniform - 1 / len(tiny_samples)) < 0.05
    assert abs(weighted - sizes[largest] / sum(sizes)) < 0.05 and weighted > uniform


def test_a_task_specific_network_joins_an_existing_model_root(tmp_path):
    """A point-only network (like the official point_optimized model) gets its own folder; the other tasks keep theirs."""
    from LesionLocatorLib.training.trainer import initial_weights

    torch.manual_seed(0)
    shared, point_only = build_lite_network(TINY).state_dict(), build_lite_network(TINY).state_dict()
    root = write_model_root(tmp_path / "lite", TINY, shared)
    write_model_root(root, TINY, point_only, tasks=("point",), net_folder="net_point")
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    assert manifest["tasks"] == {"point": "net_point", "box": "net", "track": "net"}
    assert manifest["registration"] == "classical"
    assert resolve_task_folder(root, "point") == root / "net_point"
    loaded_point = load_checkpoint_folder(resolve_task_folder(root, "point")).fold_weights[0]
    loaded_box = load_checkpoint_folder(resolve_task_folder(root, "box")).fold_weights[0]
    name = next(iter(shared))
    assert torch.equal(loaded_point[name], point_only[name]) and torch.equal(loaded_box[name], shared[name])
    # fine-tuning from a root starts from the network of the task being trained
    assert torch.equal(initial_weights(root, "box")[name], shared[name])
    assert torch.equal(initial_weights(root, "point")[name], point_only[name])
    with pytest.raises(ValueError, match="tasks must be"):
        write_model_root(root, TINY, shared, tasks=("segment",))
