"""Fine-tuning on the user's own annotated CTs (an nnU-Net raw dataset): pairing, lesions, cache, mixing, command."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.checkpoint import load_checkpoint_folder, resolve_task_folder
from LesionLocatorLib.errors import LesionLocatorError
from LesionLocatorLib.synthetic.cases import make_case
from LesionLocatorLib.synthetic.phantoms import make_phantom
from LesionLocatorLib.training import cli
from LesionLocatorLib.training.own_data import dataset_cases, fill_own_cache, lesion_masks, read_case
from LesionLocatorLib.training.plans import LiteModelConfig
from LesionLocatorLib.training.samples import TrainingSample, load_sample, save_sample
from LesionLocatorLib.training.trainer import MixedPool, SamplePool

TINY = LiteModelConfig(patch_size_zyx=(16, 32, 32), spacing_zyx=(3.0, 3.0, 3.0), features_per_stage=(4, 8, 16),
                       blocks_per_stage=(1, 1, 1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, int]:
    """Two head-phantom CTs with 2 lesions each; labels binary (case a) and an instance map with an id > 255 (b)."""
    folder = tmp_path_factory.mktemp("Dataset001_Lesions")
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(11)
    lesions = 0
    for name, instance in (("a", False), ("b", True)):
        case = make_case(make_phantom("head_phantom", rng, max_voxels=300_000), rng, lesion_count=2,
                         diameter_range_mm=(12.0, 25.0))
        labels = np.zeros(case.image.shape_zyx, np.uint16)
        for number, lesion in enumerate(case.lesions):
            labels[case.lesion_mask(lesion.lesion_id) > 0] = 300 + number if instance else 1
        lesions += len(case.lesions)
        sitk.WriteImage(case.image.to_sitk(), str(folder / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(case.image.to_sitk(labels), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return folder, lesions


def test_cases_pair_by_name(dataset):
    folder, _ = dataset
    assert [(case, image.name, label.name) for case, image, label in dataset_cases(folder)] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b_0000.nii.gz", "b.nii.gz")]


@pytest.mark.parametrize("broken, message", [
    ("no_labels_dir", "not an nnU-Net raw dataset"),
    ("unlabelled", "No label for image"),
    ("orphan_label", "has no image"),
    ("second_channel", "not a channel-0 image"),
])
def test_dataset_mistakes_are_clear_errors(tmp_path, broken, message):
    (tmp_path / "imagesTr").mkdir()
    image = sitk.Image(4, 4, 4, sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "imagesTr" / "c_0000.nii.gz"))
    if broken != "no_labels_dir":
        (tmp_path / "labelsTr").mkdir()
    if broken in ("orphan_label", "second_channel"):
        sitk.WriteImage(image, str(tmp_path / "labelsTr" / "c.nii.gz"))
    if broken == "orphan_label":
        sitk.WriteImage(image, str(tmp_path / "labelsTr" / "d.nii.gz"))
    if broken == "second_channel":
        sitk.WriteImage(image, str(tmp_path / "imagesTr" / "c_0001.nii.gz"))
    with pytest.raises(LesionLocatorError, match=message):
        dataset_cases(tmp_path)


def test_every_connected_component_of_every_label_is_a_lesion():
    labels = np.zeros((10, 10, 10), np.int64)
    labels[1:3, 1:3, 1:3] = 1
    labels[6:8, 6:8, 6:8] = 1  # a second lesion with the same label value
    labels[1:3, 6:8, 1:3] = 700  # an id above 255
    labels[4, 4, 4] = 2
    labels[5, 5, 5] = 2  # touches (4, 4, 4) diagonally: one lesion (26-connected)
    masks = lesion_masks(labels)
    assert sorted(int(m.sum()) for m in masks) == [2, 8, 8, 8]


def test_cache_has_one_sample_per_lesion_and_is_reused(dataset, tmp_path):
    folder, lesions = dataset
    paths = fill_own_cache(folder, tmp_path / "own", TINY)
    assert len(paths) == lesions
    sample = load_sample(paths[0])
    assert sample.meta["source"] == "own" and sample.target.any() and sample.image.shape == sample.target.shape
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert fill_own_cache(folder, tmp_path / "own", TINY) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_cache_of_another_configuration_is_refused_not_deleted(dataset, tmp_path):
    folder, _ = dataset
    paths = fill_own_cache(folder, tmp_path / "own", TINY)
    other = LiteModelConfig(patch_size_zyx=(16, 32, 32), spacing_zyx=(2.0, 2.0, 2.0), features_per_stage=(4, 8, 16),
                            blocks_per_stage=(1, 1, 1))
    with pytest.raises(LesionLocatorError, match="another dataset or model configuration"):
        fill_own_cache(folder, tmp_path / "own", other)
    assert all(p.is_file() for p in paths)


def test_labels_on_another_grid_are_a_clear_error(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    image = sitk.Image(8, 8, 8, sitk.sitkInt16) - 1000
    labels = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    labels.SetSpacing((2.0, 1.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "imagesTr" / "c_0000.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labelsTr" / "c.nii.gz"))
    with pytest.raises(LesionLocatorError, match="not on the grid"):
        fill_own_cache(tmp_path, tmp_path / "cache", TINY)


def test_images_that_are_not_ct_in_hu_are_warned_about_and_still_read(dataset, tmp_path, capsys):
    folder, _ = dataset
    read_case(folder / "imagesTr" / "a_0000.nii.gz", folder / "labelsTr" / "a.nii.gz")
    assert "warning" not in capsys.readouterr().err
    ct = sitk.ReadImage(str(folder / "imagesTr" / "a_0000.nii.gz"), sitk.sitkFloat32)
    sitk.WriteImage((ct + 1000.0) * 0.4, str(tmp_path / "mr_0000.nii.gz"))  # MR-like magnitudes
    image, masks = read_case(tmp_path / "mr_0000.nii.gz", folder / "labelsTr" / "a.nii.gz")
    assert "mr_0000.nii.gz's intensities do not look like CT in Hounsfield units" in capsys.readouterr().err
    assert image.shape_zyx == masks[0].shape and len(masks) == 2


def test_mixed_pool_draws_at_the_share(tmp_path):
    rng = np.random.default_rng(0)
    pools = []
    for source in ("synthetic", "own"):
        folder = tmp_path / source
        folder.mkdir()
        for index in range(3):
            save_sample(folder, index, TrainingSample(np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), bool),
                                                      {"source": source}))
        pools.append(SamplePool(folder, 3, rng))
    drawn = MixedPool(pools, [0.75, 0.25], rng).draw(2000)
    share = np.mean([s.meta["source"] == "own" for s in drawn])
    assert 0.22 < share < 0.28


def test_train_command_fine_tunes_on_own_data_only(dataset, tmp_path):
    folder, lesions = dataset
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([
        "--output", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), "--steps", "2",
        "--patch-size", "16", "32", "32", "--spacing", "3", "3", "3", "--features", "4", "8", "16", "--blocks", "1",
        "1", "1", "--own-data", str(folder), "--own-data-share", "1", "--device", "cpu", "--no-validate",
    ])
    assert cli.run(args) == 0
    assert len(list((tmp_path / "work" / "own_samples").glob("sample_*.npz"))) == lesions
    assert not (tmp_path / "work" / "samples").exists()  # share 1: no synthetic samples are made
    model = load_checkpoint_folder(resolve_task_folder(tmp_path / "model", "box"))
    model.build_network().load_state_dict(model.fold_weights[0], strict=True)


def test_train_command_mixes_own_and_synthetic_samples(dataset, tmp_path):
    folder, _ = dataset
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    args = parser.parse_args([
        "--output", str(tmp_path / "model"), "--work-dir", str(tmp_path / "work"), "--steps", "2", "--cache-size", "2",
        "--patch-size", "16", "32", "32", "--spacing", "3", "3", "3", "--features", "4", "8", "16", "--blocks", "1",
        "1", "1", "--backgrounds", "head_phantom=1", "--own-data", str(folder), "--own-data-share", "0.5",
        "--device", "cpu", "--no-validate",
    ])
    assert cli.run(args) == 0
    assert len(list((tmp_path / "work" / "samples").glob("sample_*.npz"))) == 2
    assert (tmp_path / "work" / "own_samples" / "source.json").is_file()


def test_evaluate_scores_every_own_lesion_with_point_and_box(dataset, tmp_path, capsys):
    import json

    from LesionLocatorLib.training import evaluate
    from LesionLocatorLib.training.plans import build_lite_network, write_model_root

    folder, lesions = dataset
    model = tmp_path / "model"
    write_model_root(model, TINY, build_lite_network(TINY).state_dict(), {"current_epoch": 0})
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    args = parser.parse_args(["-m", str(model), "--skip", "segmentation", "tracking", "open_ms", "--own-data",
                              str(folder), "--own-data-split", "Tr", "-o", str(tmp_path / "eval.json")])
    assert evaluate.run(args) == 0
    own = json.loads((tmp_path / "eval.json").read_text())["own_data"]
    assert own["summary"]["point"]["lesions"] == own["summary"]["box"]["lesions"] == lesions
    assert all(0.0 <= row["dice"] <= 1.0 and row["diameter_mm"] >= 12.0 * 0.5 for row in own["lesions"])
    # the terminal gets a table, one row per prompt, and where the per-lesion scores went
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index("own data (Tr):") + 1:][:3]
    assert table[0].startswith("prompt") and "mean Dice [95 % CI]" in table[0]
    assert [row.split()[:2] for row in table[1:]] == [["box", str(lesions)], ["point", str(lesions)]]
    assert printed[-1] == f"every lesion's scores: {tmp_path / 'eval.json'}"


def test_evaluate_uses_the_model_point_search_and_box_refinement_unless_disabled(dataset, tmp_path):
    import json

    from LesionLocatorLib.box_refinement import FEATURES, BoxRefiner
    from LesionLocatorLib.checkpoint import MODEL_MANIFEST
    from LesionLocatorLib.tanh_layer import TanhLayer
    from LesionLocatorLib.training import evaluate
    from LesionLocatorLib.training.plans import build_lite_network, write_model_root

    model = tmp_path / "model"
    write_model_root(model, TINY, build_lite_network(TINY).state_dict(), {"current_epoch": 0})
    manifest = json.loads((model / MODEL_MANIFEST).read_text())
    count = len(FEATURES)
    refiner = BoxRefiner([TanhLayer(np.zeros(count), np.ones(count), np.zeros((1, count)), np.zeros(1), np.zeros(1))])
    (model / MODEL_MANIFEST).write_text(json.dumps({**manifest, "point_search": {"box_sizes_mm": [10, 30]},
                                                    "box_refinement": refiner.manifest_entry()}))
    parser = argparse.ArgumentParser()
    evaluate.configure_parser(parser)
    common = ["-m", str(model), "--skip", "segmentation", "tracking", "open_ms", "--own-data", str(dataset[0]),
              "--own-data-split", "Tr"]
    for extra, sizes, refined in (([], [10.0, 30.0], True),
                                  (["--disable-point-search", "--disable-box-refinement"], None, False)):
        output = tmp_path / f"eval{len(extra)}.json"
        assert evaluate.run(parser.parse_args(common + extra + ["-o", str(output)])) == 0
        results = json.loads(output.read_text())
        assert results["point_search_box_sizes_mm"] == sizes
        assert results["box_refinement"] is refined
        assert results["point_search_selector"] is False
        assert results["own_data"]["summary"]["point"]["lesions"] == dataset[1]


def test_evaluate_needs_the_test_split_or_says_so(dataset):
    with pytest.raises(LesionLocatorError, match="imagesTs"):
        dataset_cases(dataset[0], "Ts")


def test_samples_of_unknown_origin_are_never_deleted(dataset, tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    foreign = save_sample(folder, 0, TrainingSample(np.zeros((4, 4, 4), np.float32), np.ones((4, 4, 4), bool), {}))
    with pytest.raises(LesionLocatorError, match="did not make"):
        fill_own_cache(dataset[0], folder, TINY)
    assert foreign.is_file()


def test_point_search_selector_fits_on_own_data_alone(dataset, tmp_path):
    """Each annotated lesion clicked three times in its core: 12 clicks, enough to fit a selector."""
    import json
    import shutil

    from LesionLocatorLib import cli
    from LesionLocatorLib.checkpoint import MODEL_MANIFEST
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
    from LesionLocatorLib.segmentation import Segmenter

    if not (BUNDLED_LITE_DIR / MODEL_MANIFEST).is_file():
        pytest.skip("bundled Lite model missing")
    root = tmp_path / "model"
    shutil.copytree(BUNDLED_LITE_DIR, root)
    manifest = json.loads((root / MODEL_MANIFEST).read_text())
    manifest["point_search"] = {"box_sizes_mm": [10, 30]}
    (root / MODEL_MANIFEST).write_text(json.dumps(manifest))
    saved = tmp_path / "features.npz"
    command = ["fit-point-search", "-m", str(root), "--cases-per-background", "0", "--own-data", str(dataset[0]),
               "--steps", "30", "--seeds", "1", "--save-features", str(saved)]
    assert cli.main(command) == 0
    with np.load(saved) as data:
        assert data["dice"].shape == (3 * dataset[1], 3)
        assert data["dice"].max(axis=1).min() > 0  # every click's candidates find its lesion
    assert Segmenter.from_folder(root, device="cpu").point_search.selector is not None
    assert cli.main(command[:-2] + ["--clicks-per-lesion", "1"]) == 2  # 4 clicks are too few to fit on


def test_point_extent_fits_on_own_data_alone(dataset, tmp_path):
    """Each annotated lesion clicked 15 times in its core: 60 clicks, enough to fit the extent network."""
    import json
    import shutil

    from LesionLocatorLib import cli
    from LesionLocatorLib.checkpoint import MODEL_MANIFEST
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
    from LesionLocatorLib.segmentation import Segmenter

    if not (BUNDLED_LITE_DIR / MODEL_MANIFEST).is_file():
        pytest.skip("bundled Lite model missing")
    root = tmp_path / "model"
    shutil.copytree(BUNDLED_LITE_DIR, root)
    before = (root / "point_extent.pth").read_bytes()
    command = ["fit-point-extent", "-m", str(root), "--cases-per-background", "0", "--own-data", str(dataset[0]),
               "--steps", "2", "--batch-size", "4", "--threads", "1", "--tuning-cases-per-background", "0"]
    assert cli.main(command + ["--clicks-per-lesion", "15"]) == 0
    assert (root / "point_extent.previous.pth").read_bytes() == before
    assert (root / "point_extent.pth").read_bytes() != before
    assert json.loads((root / MODEL_MANIFEST).read_text())["point_search"]["extent"]["min_size_mm"] == 0.0
    assert Segmenter.from_folder(root, device="cpu").point_search.extent is not None
    assert cli.main(command + ["--clicks-per-lesion", "3"]) == 2  # 12 clicks are too few to fit on
