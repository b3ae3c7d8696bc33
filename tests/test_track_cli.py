"""The tracking command line: official names, lesions.json, no overwriting, duplicate names, report on top."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib import cli
from LesionLocatorLib.image import read_image, write_volume
from LesionLocatorLib.tracking import flipped_volume
from golden import FIXTURES, require

TINY = FIXTURES / "tiny"
INPUTS = FIXTURES / "inputs" / "A_trk"
INSTANCE_MAP = INPUTS / "prompts" / "A_trk_small_bl_inst.nii.gz"
FOLLOW_UP = INPUTS / "A_trk_small_fu.nii.gz"


def track(tmp_path: Path, followups: list[Path], *extra: str, prompts: list[Path] = (INSTANCE_MAP,),
          prompt_type: str = "prev_mask") -> int:
    return cli.main(["track", "-bl", str(require(INPUTS / "A_trk_small_bl.nii.gz")), "-fu", *map(str, followups),
                     "-p", *map(str, prompts), "-t", prompt_type,
                     "-o", str(tmp_path / "out"), "-m", str(TINY), "-f", "0", "-device", "cpu", "--preset", "fast",
                     "--registration", "classical", "--disable_progress_bar", *extra])


def test_outputs_json_and_report(tmp_path: Path):
    assert track(tmp_path, [FOLLOW_UP]) == 0
    out = tmp_path / "out"
    assert (out / "A_trk_small_fu_lesion_1.nii.gz").is_file()
    assert (out / "prompts" / "A_trk_small_bl_lesion_1.nii.gz").is_file()  # the baseline mask the user gave
    tracking = json.loads((out / "lesions.json").read_text())
    assert tracking["format"] == "lesionlocator-tracking/1"
    assert [t["name"] for t in tracking["timepoints"]] == ["A_trk_small_bl", "A_trk_small_fu"]
    entries = tracking["lesions"]["1"]["timepoints"]
    assert [e["found"] for e in entries] == [True, True]
    assert entries[1]["mask"] == "A_trk_small_fu_lesion_1.nii.gz" and entries[1]["volume_ml"] > 0
    assert len(entries[1]["centre_ras"]) == 3
    assert cli.main(["report", str(out / "lesions.json"), "-o", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").is_file()


def test_existing_outputs_are_not_overwritten(tmp_path: Path, capsys):
    assert track(tmp_path, [FOLLOW_UP]) == 0
    before = (tmp_path / "out" / "lesions.json").read_bytes()
    assert track(tmp_path, [FOLLOW_UP]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "lesions.json").read_bytes() == before


def test_follow_ups_with_the_same_file_name_are_disambiguated(tmp_path: Path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(require(INPUTS / "A_trk_small_fu.nii.gz"), other / "A_trk_small_fu.nii.gz")
    assert track(tmp_path, [INPUTS / "A_trk_small_fu.nii.gz", other / "A_trk_small_fu.nii.gz"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert names == ["A_trk_small_fu_tp1_lesion_1.nii.gz", "A_trk_small_fu_tp2_lesion_1.nii.gz"]
    assert "share the name" in capsys.readouterr().err


def test_wrong_prompt_type_is_a_clear_error(tmp_path: Path, capsys):
    code = cli.main(["track", "-bl", str(require(INPUTS / "A_trk_small_bl.nii.gz")), "-fu",
                     str(INPUTS / "A_trk_small_fu.nii.gz"), "-p", str(INPUTS / "prompts" / "A_trk_small_bl_inst.nii.gz"),
                     "-t", "point", "-o", str(tmp_path / "o"), "-m", str(TINY), "-device", "cpu"])
    assert code == 2 and "needs one JSON prompt file" in capsys.readouterr().err


@pytest.mark.parametrize("prompt_type, code, message", [
    ("prev_mask", 2, "-t prev_mask takes lesion masks of the baseline, not JSON prompts"),
    ("box", 1, "lesion 1 skipped: not a box prompt (-t box)\nlesion 2 skipped: not a box prompt (-t box)\n"
               "error: No usable prompt in file"),
])
def test_a_json_file_of_the_wrong_kind_is_a_clear_error(tmp_path: Path, capsys, prompt_type, code, message):
    result = cli.main(["track", "-bl", str(require(INPUTS / "A_trk_bl.nii.gz")), "-fu", str(INPUTS / "A_trk_fu1.nii.gz"),
                       "-p", str(INPUTS / "prompts" / "A_trk_bl_points.json"), "-t", prompt_type,
                       "-o", str(tmp_path / "o"), "-m", str(TINY), "-device", "cpu"])
    assert result == code and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_points_outside_the_baseline_exit_1_and_track_nothing(tmp_path: Path, capsys):
    prompts = tmp_path / "outside.json"
    prompts.write_text(json.dumps({"1": {"point": [200, 10, 10]}}))
    assert track(tmp_path, [FOLLOW_UP], prompts=[prompts], prompt_type="point") == 1
    err = capsys.readouterr().err
    assert "lesion 1 skipped: Point (z, y, x) = (200, 10, 10) lies outside the image" in err
    assert "No usable prompt in file" in err and not (tmp_path / "out").exists()


def test_an_empty_per_lesion_mask_is_an_error_and_the_others_are_tracked(tmp_path: Path, capsys):
    lesion, empty = tmp_path / "a_lesion.nii.gz", tmp_path / "b_empty.nii.gz"
    shutil.copy(require(INSTANCE_MAP), lesion)
    baseline_map = read_image(INSTANCE_MAP)
    write_volume(np.zeros_like(baseline_map.array), baseline_map, empty)
    assert track(tmp_path, [FOLLOW_UP], prompts=[lesion, empty]) == 1
    assert f"lesion 2 skipped: mask file {empty} (lesion 2) is empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "A_trk_small_fu_lesion_1.nii.gz").is_file()
    assert sorted(json.loads((tmp_path / "out" / "lesions.json").read_text())["lesions"]) == ["1"]


def test_a_mask_stored_on_another_grid_is_resampled_onto_the_baseline(tmp_path: Path, capsys):
    """The instance map stored mirrored (array and direction flipped in y and x) is the same mask physically."""
    mirrored = flipped_volume(read_image(require(INSTANCE_MAP)), (1, 2))
    write_volume(mirrored.array, mirrored, tmp_path / "mirrored.nii.gz")
    assert track(tmp_path / "a", [FOLLOW_UP]) == 0
    assert track(tmp_path / "b", [FOLLOW_UP], prompts=[tmp_path / "mirrored.nii.gz"]) == 0
    assert "mirrored.nii.gz is not on the image's grid" in capsys.readouterr().err
    for name in ("A_trk_small_fu_lesion_1.nii.gz", "prompts/A_trk_small_bl_lesion_1.nii.gz"):
        assert np.array_equal(read_image(tmp_path / "a" / "out" / name).array,
                              read_image(tmp_path / "b" / "out" / name).array)


def test_baseline_copies_under_prompts_are_never_overwritten(tmp_path: Path, capsys):
    prompts = tmp_path / "out" / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "A_trk_small_bl_lesion_1.nii.gz").write_text("user data")
    assert track(tmp_path, [FOLLOW_UP]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (prompts / "A_trk_small_bl_lesion_1.nii.gz").read_text() == "user data"
    # the user's per-lesion masks kept there as ids 2 and 5: the list's lesions 1 and 2 would write onto an input
    (prompts / "A_trk_small_bl_lesion_1.nii.gz").unlink()
    inputs = [prompts / "A_trk_small_bl_lesion_2.nii.gz", prompts / "A_trk_small_bl_lesion_5.nii.gz"]
    for path in inputs:
        shutil.copy(require(INSTANCE_MAP), path)
    assert track(tmp_path, [FOLLOW_UP], "--overwrite", prompts=inputs) == 2
    assert "is an input of this run" in capsys.readouterr().err
    assert all(path.read_bytes() == INSTANCE_MAP.read_bytes() for path in inputs)


def test_an_output_folder_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys):
    (tmp_path / "out").write_text("")
    assert track(tmp_path, [FOLLOW_UP]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_a_missing_follow_up_is_a_clear_error(tmp_path: Path, capsys):
    """An unreadable scan is reported as an error (exit 2) that names the file, not a traceback, and writes nothing."""
    missing = tmp_path / "followup_typo.nii.gz"
    assert track(tmp_path, [missing]) == 2
    assert f"Image not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bf16_flag_reaches_the_tracker(tmp_path: Path, monkeypatch):
    from LesionLocatorLib.tracking import Tracker

    built = []
    original = Tracker.from_folder.__func__

    def recording(cls, model_root, **options):
        built.append(options)
        return original(cls, model_root, **options)

    monkeypatch.setattr(Tracker, "from_folder", classmethod(recording))
    assert track(tmp_path, [FOLLOW_UP], "--bf16") == 0
    assert built[0]["cpu_bf16"] is True
