"""The tracking command line: official names, lesions.json, no overwriting, duplicate names, report on top."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from LesionLocatorLib import cli
from golden import FIXTURES, require

TINY = FIXTURES / "tiny"
INPUTS = FIXTURES / "inputs" / "A_trk"


def track(tmp_path: Path, followups: list[Path], *extra: str) -> int:
    return cli.main(["track", "-bl", str(require(INPUTS / "A_trk_small_bl.nii.gz")), "-fu", *map(str, followups),
                     "-p", str(INPUTS / "prompts" / "A_trk_small_bl_inst.nii.gz"), "-t", "prev_mask",
                     "-o", str(tmp_path / "out"), "-m", str(TINY), "-f", "0", "-device", "cpu", "--preset", "fast",
                     "--registration", "classical", "--disable_progress_bar", *extra])


def test_outputs_json_and_report(tmp_path: Path):
    assert track(tmp_path, [INPUTS / "A_trk_small_fu.nii.gz"]) == 0
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
    assert track(tmp_path, [INPUTS / "A_trk_small_fu.nii.gz"]) == 0
    before = (tmp_path / "out" / "lesions.json").read_bytes()
    assert track(tmp_path, [INPUTS / "A_trk_small_fu.nii.gz"]) == 2
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


@pytest.mark.parametrize("prompt_type, message", [
    ("prev_mask", "-t prev_mask takes lesion masks on the baseline's grid, not JSON prompts"),
    ("box", "No usable prompt: lesion 1 is not a box prompt (-t box); lesion 2 is not a box prompt (-t box)."),
])
def test_a_json_file_of_the_wrong_kind_is_a_clear_error(tmp_path: Path, capsys, prompt_type, message):
    code = cli.main(["track", "-bl", str(require(INPUTS / "A_trk_bl.nii.gz")), "-fu", str(INPUTS / "A_trk_fu1.nii.gz"),
                     "-p", str(INPUTS / "prompts" / "A_trk_bl_points.json"), "-t", prompt_type,
                     "-o", str(tmp_path / "o"), "-m", str(TINY), "-device", "cpu"])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


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
    assert track(tmp_path, [INPUTS / "A_trk_small_fu.nii.gz"], "--bf16") == 0
    assert built[0]["cpu_bf16"] is True
