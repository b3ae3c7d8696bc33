"""The warning for images that do not look like CT in Hounsfield units, given to a model that normalizes as CT."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib import cli
from LesionLocatorLib.image import read_image, write_volume
from LesionLocatorLib.intensity_check import expects_hounsfield_units, hu_warning
from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR
from golden import FIXTURES, require

TINY = FIXTURES / "tiny"
IMAGE = FIXTURES / "inputs" / "A_ts1" / "image" / "A_ts1.nii.gz"
LESION_1_ZYX = (24.15, 33.10, 19.97)


def body_ct_hu(shape_zyx=(40, 64, 64)) -> np.ndarray:
    """Air outside an ellipse of soft tissue (40 HU) with fat (-100 HU) and a bone rod (700 HU), plus noise."""
    z, y, x = np.indices(shape_zyx)
    ct = np.full(shape_zyx, -1000.0)
    body = ((y - 32) / 28) ** 2 + ((x - 32) / 24) ** 2 <= 1
    ct[body] = 40.0
    ct[body & (((y - 32) / 28) ** 2 + ((x - 32) / 24) ** 2 > 0.8)] = -100.0
    ct[(y - 40) ** 2 + (x - 32) ** 2 <= 16] = 700.0
    return ct + np.random.default_rng(0).normal(0, 10, shape_zyx)


def skull_stripped_brain_hu(shape_zyx=(40, 64, 64)) -> np.ndarray:
    """Background 0, CSF 8 HU, white matter 28 HU, grey matter 40 HU: a CT brain atlas's range."""
    z, y, x = np.indices(shape_zyx)
    r = np.sqrt(((z - 20) / 18) ** 2 + ((y - 32) / 28) ** 2 + ((x - 32) / 26) ** 2)
    brain = np.select([r < 0.3, r < 0.8, r < 1.0], [8.0, 28.0, 40.0], 0.0)
    return brain + np.where(r < 1.0, np.random.default_rng(1).normal(0, 3, shape_zyx), 0.0)


def test_ct_in_hounsfield_units_gives_no_warning():
    assert hu_warning(body_ct_hu()) == ""
    assert hu_warning(skull_stripped_brain_hu()) == ""
    assert hu_warning(np.full((4, 4, 4), np.nan)) == ""  # nothing to judge


@pytest.mark.parametrize("name, array", [
    ("MR magnitudes", (body_ct_hu() + 1000.0) * 0.4),
    ("CT stored without its intercept", body_ct_hu() + 1024.0),
    ("PET SUV", np.clip(body_ct_hu() / 200.0 + 5.0, 0, None)),
    ("z-scored", (body_ct_hu() - body_ct_hu().mean()) / body_ct_hu().std()),
])
def test_other_intensities_are_named_with_their_range_and_what_to_do(name, array):
    warning = hu_warning(array, "scan_1")
    low, high = np.percentile(array, [0.5, 99.5])
    assert warning.startswith("scan_1's intensities do not look like CT in Hounsfield units"), name
    assert f"{low:.4g} to {high:.4g}" in warning and "convert the CT to HU" in warning


def test_a_large_image_is_judged_from_a_subsample_as_from_all_voxels():
    big = np.tile(body_ct_hu(), (3, 4, 4))  # 120 x 256 x 256 voxels: sampled every other voxel
    assert hu_warning(big) == "" and hu_warning(big + 1024.0) != ""


def test_models_that_normalize_as_ct_expect_hounsfield_units(tmp_path: Path):
    if not (BUNDLED_LITE_DIR / "net" / "plans.json").is_file():
        pytest.skip("bundled Lite model missing")
    assert expects_hounsfield_units(BUNDLED_LITE_DIR)
    mr_model = tmp_path / "mr"
    shutil.copytree(BUNDLED_LITE_DIR / "net", mr_model, ignore=shutil.ignore_patterns("fold_*"))
    plans = json.loads((mr_model / "plans.json").read_text())
    for configuration in plans["configurations"].values():
        if "normalization_schemes" in configuration:
            configuration["normalization_schemes"] = ["ZScoreNormalization"]
    (mr_model / "plans.json").write_text(json.dumps(plans))
    assert not expects_hounsfield_units(mr_model)
    assert expects_hounsfield_units(require(TINY))  # the official layout: every network is read


def test_segment_and_track_warn_on_an_image_that_is_not_in_hu_and_still_answer(tmp_path: Path, capsys):
    ct = read_image(require(IMAGE))
    assert hu_warning(ct.array) == ""
    mr_like = tmp_path / "mr_like.nii.gz"
    write_volume(((ct.array + 1000.0) * 0.4).astype(np.float32), ct, mr_like)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"1": {"point": list(LESION_1_ZYX)}}))
    common = ["-m", str(require(TINY)), "-device", "cpu", "--preset", "fast", "--disable_progress_bar"]
    segment = ["segment", "-p", str(prompts), "-t", "point", *common]
    assert cli.main(segment + ["-i", str(IMAGE), "-o", str(tmp_path / "ct")]) == 0
    assert "Hounsfield" not in capsys.readouterr().err
    assert cli.main(segment + ["-i", str(mr_like), "-o", str(tmp_path / "mr")]) == 0
    assert "mr_like's intensities do not look like CT in Hounsfield units" in capsys.readouterr().err
    assert (tmp_path / "mr" / "mr_like_lesion_1.nii.gz").is_file()
    track = ["track", "-bl", str(IMAGE), "-fu", str(mr_like), "-p", str(prompts), "-t", "point", *common,
             "--registration", "classical", "-o", str(tmp_path / "track")]
    assert cli.main(track) == 0
    err = capsys.readouterr().err
    assert "mr_like's intensities do not look like CT" in err and "A_ts1's intensities" not in err
