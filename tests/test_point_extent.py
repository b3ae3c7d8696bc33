"""Point extent: the samples around a click and the face distances in (z, y, x) on anisotropic grids, the manifest
entry and its weights, fitting, the Segmenter's use of the predicted box, and `lesionlocator fit-point-extent`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from LesionLocatorLib.errors import CheckpointError
from LesionLocatorLib.models.layout import MODEL_MANIFEST
from LesionLocatorLib.point_extent import (ExtentNetwork, PointExtent, box_from_faces, box_size_mm, click_samples,
                                           faces_of_mask, mirrored_variants)
from LesionLocatorLib.point_search import PointSearch
from LesionLocatorLib.prompts import BoxPrompt, PointPrompt
from LesionLocatorLib.segmentation import Segmenter
from LesionLocatorLib.training.point_extent import ExtentData, augmented, best_threshold, fit_extent_network

SPACING_ZYX = (2.5, 0.8, 0.8)


def test_samples_are_taken_in_mm_along_each_index_axis():
    """On a (2.5, 0.8, 0.8) mm grid, a sample 5 mm above the click along z is 2 voxels away, 4 mm along x 5 voxels."""
    image = np.zeros((20, 40, 40), np.float32)
    click = np.array([10.0, 20.0, 20.0])
    image[12, 20, 20] = 1.0  # +5 mm in z
    image[10, 20, 25] = 2.0  # +4 mm in x
    # sample i lies (i - 7.5) mm from the click on a grid of 16: move the click half a mm so that sample 7 is on it
    samples = click_samples(image, SPACING_ZYX, click + 0.5 / np.array(SPACING_ZYX), scales_mm=[1.0], grid=16)[0]
    assert samples.shape == (16, 16, 16)
    assert samples[7 + 5, 7, 7] == pytest.approx(1.0)
    assert samples[7, 7, 7 + 4] == pytest.approx(2.0)
    assert samples[7, 7 + 4, 7] == pytest.approx(0.0)  # y is not x
    half = click_samples(image.astype(np.float16), SPACING_ZYX, click, scales_mm=[1.0], grid=16)  # scipy lacks f16
    assert np.array_equal(half, click_samples(image, SPACING_ZYX, click, scales_mm=[1.0], grid=16))


def test_faces_round_trip_to_the_mask_bounding_box_on_an_anisotropic_grid():
    mask = np.zeros((20, 40, 50), bool)
    mask[4:9, 10:31, 7:12] = True
    click = (6, 12, 10)
    faces = faces_of_mask(mask, SPACING_ZYX, click)
    # z- = (6 - 3.5) * 2.5 mm, y+ = (30.5 - 12) * 0.8 mm
    assert faces[0] == pytest.approx(6.25) and faces[4] == pytest.approx(14.8)
    box = box_from_faces(click, faces, SPACING_ZYX, mask.shape)
    assert box == BoxPrompt((4.0, 10.0, 7.0), (9.0, 31.0, 12.0))
    assert box_size_mm(faces) == pytest.approx((5 * 2.5 * 21 * 0.8 * 5 * 0.8) ** (1 / 3))
    clipped = box_from_faces(click, faces * 100, SPACING_ZYX, mask.shape)  # a box past the image is cut to it
    assert clipped.lo_zyx == (0.0, 0.0, 0.0) and clipped.hi_zyx == (20.0, 40.0, 50.0)


def test_augmentation_keeps_the_faces_true_to_the_samples():
    """Mirror and swap y/x: the faces must still describe where the block sits in the samples."""
    samples = np.zeros((1, 16, 16, 16), np.float16)
    samples[0, 3:9, 6:15, 8:10] = 1  # the click sits at the grid centre 7.5
    faces = np.array([7.5 - 2.5, 7.5 - 5.5, 7.5 - 7.5, 8.5 - 7.5, 14.5 - 7.5, 9.5 - 7.5], np.float32)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        out, out_faces = augmented(samples, faces, rng)
        np.testing.assert_allclose(out_faces, block_faces(out))
        seen.add(tuple(out_faces))
    assert len(seen) > 8  # the augmentation does vary


def block_faces(samples) -> np.ndarray:
    """FACES of the bright block in (scales, z, y, x) samples, in sample steps from the grid's centre."""
    block = np.argwhere(np.asarray(samples)[0] > 0.5)
    centre = (samples.shape[-1] - 1) / 2
    return np.concatenate([centre - (block.min(0) - 0.5), (block.max(0) + 0.5) - centre])


def test_each_mirrored_variant_reorders_the_faces_as_its_samples_move():
    samples = np.zeros((3, 16, 16, 16), np.float32)
    samples[:, 3:9, 6:15, 8:10] = 1
    variants = mirrored_variants(samples)
    assert len({np.ascontiguousarray(v).tobytes() for v, _ in variants}) == 16
    for variant, order in variants:
        np.testing.assert_allclose(block_faces(variant), block_faces(samples)[order])


def test_threshold_choice():
    sizes = np.array([5.0, 9.0, 30.0, 50.0])
    threshold, means = best_threshold(sizes, np.array([0.1, 0.2, 0.9, 0.8]), np.array([0.6, 0.7, 0.5, 0.4]))
    assert 9.0 < threshold <= 30.0 and means[threshold] == pytest.approx(0.75)
    assert best_threshold(sizes, np.zeros(4), np.ones(4))[0] == float("inf")


def write_extent(root: Path, min_size_mm: float, channels: int = 4) -> PointExtent:
    torch.manual_seed(0)
    extent = PointExtent(ExtentNetwork(3, 32, channels), "point_extent.pth", channels=channels,
                         min_size_mm=min_size_mm)
    torch.save(extent.network.state_dict(), root / extent.weights)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    manifest["point_search"]["extent"] = extent.manifest_entry()
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    return extent


def test_extent_entry_round_trips_and_bad_entries_fail(tmp_path: Path):
    (tmp_path / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "p", "box": "b"},
                                                       "point_search": {"box_sizes_mm": [8]}}))
    written = write_extent(tmp_path, 12.0)
    manifest = json.loads((tmp_path / MODEL_MANIFEST).read_text())
    search = PointSearch.from_manifest(manifest, "m", tmp_path)
    assert search.extent.min_size_mm == 12.0 and search.manifest_entry() == manifest["point_search"]
    for name, tensor in search.extent.network.state_dict().items():
        assert torch.equal(tensor, written.network.state_dict()[name]), name
    assert PointSearch.from_manifest(manifest, "m", tmp_path, with_extent=False).extent is None
    with pytest.raises(CheckpointError, match="needs the model root"):
        PointSearch.from_manifest(manifest, "m")
    good = manifest["point_search"]["extent"]
    for bad, message in (({**good, "channels": 8}, "does not hold an extent network"),
                         ({**good, "weights": "missing.pth"}, "are missing"),
                         ({**good, "grid": 12}, "multiple of 8"),
                         ({**good, "min_size_mm": -1}, "min_size_mm"),
                         ({**good, "scales_mm": "x"}, "bad setting"),
                         ({"scales_mm": [1.0]}, "weights file")):
        manifest["point_search"]["extent"] = bad
        with pytest.raises(CheckpointError, match=message) as error:
            PointSearch.from_manifest(manifest, "m", tmp_path)
        assert "fit-point-extent" in str(error.value)


def ball(radius_mm: float, shape=(32, 32, 32), spacing=1.5, centre=(15.5, 15.5, 15.5)) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return np.sqrt(sum(((c - m) * spacing) ** 2 for c, m in zip((zz, yy, xx), centre))) <= radius_mm


def test_fitting_learns_the_size_of_balls_around_the_click():
    """Balls of 3-18 mm radius around the click, on noise: the fitted network sizes held-out balls."""
    rng = np.random.default_rng(0)
    radii = rng.uniform(3, 18, 240)
    samples = np.stack([np.stack([ball(r) * 2.0 + rng.normal(0, 0.3, (32, 32, 32))] * 3) for r in radii])
    faces = np.repeat(radii[:, None], 6, axis=1).astype(np.float32)
    data = ExtentData(samples[:200].astype(np.float16), faces[:200])
    torch.set_num_threads(1)
    network = fit_extent_network(data, steps=150, batch_size=8, lr=3e-3, channels=4)
    with torch.no_grad():
        predicted = torch.exp(network(torch.from_numpy(samples[200:].astype(np.float32)))).numpy().mean(axis=1)
    assert np.corrcoef(predicted, radii[200:])[0, 1] > 0.8
    assert np.median(np.abs(np.log(predicted / radii[200:]))) < 0.3


@pytest.fixture(scope="module")
def extent_root(lite_root) -> Path:
    """The bundled model with a point search over two cubes and an (unfitted) extent network."""
    manifest = json.loads((lite_root / MODEL_MANIFEST).read_text())
    manifest["point_search"] = {"box_sizes_mm": [8, 18]}
    (lite_root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    write_extent(lite_root, 0.0)
    return lite_root


def test_a_click_is_answered_by_the_predicted_box_when_it_is_large_enough(extent_root: Path, tmp_path: Path):
    from test_point_search import sphere_image

    image, _ = sphere_image(radius_mm=9, seed=3)
    click = {1: PointPrompt((20.0, 62.0, 58.0))}
    segmenter = Segmenter.from_folder(extent_root, device="cpu", preset="fast")
    box = segmenter.extent_box(image, click[1])
    assert isinstance(box, BoxPrompt)
    by_box = segmenter.segment(image, {1: box}).masks[1]
    assert np.array_equal(segmenter.segment(image, click).masks[1], by_box)
    without = Segmenter.from_folder(extent_root, device="cpu", preset="fast", point_extent=False)
    assert without.point_search.extent is None and without.extent_box(image, click[1]) is None
    searched = without.segment(image, click).masks[1]
    # a box under min_size_mm goes back to the cubes
    root = tmp_path / "model"
    shutil.copytree(extent_root, root)
    write_extent(root, 1e6)
    large_only = Segmenter.from_folder(root, device="cpu", preset="fast")
    assert large_only.extent_box(image, click[1]) is None
    assert np.array_equal(large_only.segment(image, click).masks[1], searched)


def test_fit_point_extent_command_writes_a_network_that_loads(extent_root: Path, tmp_path: Path):
    from LesionLocatorLib import cli

    root = tmp_path / "model"
    shutil.copytree(extent_root, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    del manifest["point_search"]["extent"]
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    (root / "point_extent.pth").unlink()
    base = ["fit-point-extent", "-m", str(root), "--backgrounds", "body_phantom:7", "--cases-per-background", "2",
            "--clicks-per-lesion", "10", "--steps", "3", "--batch-size", "4", "--threads", "1"]
    assert cli.main(base + ["--tuning-cases-per-background", "0", "--dry-run"]) == 0
    assert not (root / "point_extent.pth").exists()  # a dry run writes nothing
    assert cli.main(base + ["--tuning-cases-per-background", "0"]) == 0
    written = json.loads((root / MODEL_MANIFEST).read_text())["point_search"]["extent"]
    assert written["min_size_mm"] == 0.0 and written["weights"] == "point_extent.pth"
    first = (root / "point_extent.pth").read_bytes()
    assert Segmenter.from_folder(root, device="cpu").point_search.extent is not None
    assert cli.main(base + ["--tuning-cases-per-background", "0", "--seed", "5"]) == 0  # keeps the first
    assert (root / "point_extent.previous.pth").read_bytes() == first
    assert (root / "point_extent.pth").read_bytes() != first
    assert (root / "lesionlocator_model.previous.json").is_file()
    written = (root / MODEL_MANIFEST).read_text()
    assert cli.main(base + ["--tuning-cases-per-background", "1", "--dry-run"]) == 0  # tunes, writes nothing
    assert (root / MODEL_MANIFEST).read_text() == written
    assert cli.main(base + ["--steps", "0"]) == 2
    assert cli.main(base + ["--backgrounds", "brain_atlas_ct"]) == 2  # a validation background
    assert cli.main(base + ["--cases-per-background", "0"]) == 2  # too few clicks
    (root / MODEL_MANIFEST).write_text(json.dumps({"tasks": {"point": "net_point", "box": "net"}}))
    assert cli.main(base) == 2  # no point search


def test_tracking_and_the_commands_follow_the_extent_setting(extent_root: Path):
    import argparse

    from LesionLocatorLib import segment_cli, track_cli
    from LesionLocatorLib.tracking import Tracker

    assert Tracker.from_folder(extent_root, device="cpu", registration="classical").segmenter.point_search.extent
    off = Tracker.from_folder(extent_root, device="cpu", registration="classical", point_extent=False)
    assert off.segmenter.point_search.extent is None and off.segmenter.point_search is not None
    for module, argv in ((segment_cli, ["-i", "a.nii.gz", "-p", "p.json", "-t", "point", "-o", "out"]),
                         (track_cli, ["-bl", "a.nii.gz", "-fu", "b.nii.gz", "-p", "p.json", "-t", "point", "-o", "out"])):
        parser = argparse.ArgumentParser()
        module.configure_parser(parser)
        assert parser.parse_args(argv + ["--disable_point_extent"]).disable_point_extent
        assert not parser.parse_args(argv).disable_point_extent
