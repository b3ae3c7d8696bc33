"""Longitudinal report: files written (CSV, JSON, HTML, PNG), never overwritten silently, CLI inputs."""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from LesionLocatorLib.image import ImageVolume, write_mask
from LesionLocatorLib.report import REPORT_FILES, ReportError, build_report, write_report
from LesionLocatorLib.report.cli import configure_parser, run
from LesionLocatorLib.report.figures import axial_view, summary_png

SPACING_XYZ = (0.8, 0.8, 2.5)
SHAPE_ZYX = (20, 64, 64)


def synthetic_study(n_timepoints: int = 2, seed: int = 0):
    """CT-like timepoints (HU) with a shrinking lesion 1, a lymph node 2 and, from timepoint 2, a new lesion 3."""
    rng = np.random.default_rng(seed)
    radii = {1: [10.0, 5.0, 5.0], 2: [6.0, 5.0, 5.0], 3: [0.0, 0.0, 4.0]}
    centres_lps = {1: (18.0, 22.0, 25.0), 2: (36.0, 34.0, 20.0), 3: (20.0, 38.0, 25.0)}
    images, masks = [], {1: [], 2: [], 3: []}
    for t in range(n_timepoints):
        image = ImageVolume(np.zeros(SHAPE_ZYX, dtype=np.int16), SPACING_XYZ, name=f"tp{t}")
        points_lps = image.index_zyx_to_lps(np.indices(SHAPE_ZYX).reshape(3, -1).T).reshape(*SHAPE_ZYX, 3)
        values = 40.0 + rng.normal(0.0, 12.0, SHAPE_ZYX)
        for lesion_id, lesion_radii in radii.items():
            inside = np.linalg.norm((points_lps - centres_lps[lesion_id]) / (1.0, 0.8, 1.0), axis=-1) <= lesion_radii[t]
            values[inside] += 80.0
            first = next(i for i, r in enumerate(radii[lesion_id]) if r > 0)
            masks[lesion_id].append(inside.astype(np.uint8) if t >= first else None)
        images.append(image.with_array(values.astype(np.int16)))
    return images, {lesion_id: m for lesion_id, m in masks.items() if any(x is not None for x in m)}


def embedded_pngs(html: str) -> list[np.ndarray]:
    encoded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    return [imread(io.BytesIO(base64.b64decode(data)), format="png") for data in encoded]


def test_report_files_hold_the_numbers(tmp_path):
    images, masks = synthetic_study()
    report = build_report(images, masks, lymph_nodes=[2], intensity_unit="HU", study_dates=["2024-01-02", None])
    paths = write_report(report, tmp_path / "report")
    assert {p.name for p in paths.values()} == set(REPORT_FILES.values())

    rows = list(csv.DictReader(open(paths["measurements_csv"], encoding="utf-8")))
    assert len(rows) == 2 * 2
    node_follow_up = next(r for r in rows if r["lesion_id"] == "2" and r["timepoint"] == "1")
    measured = report.lesion(2).measurements[1]
    assert float(node_follow_up["recist_diameter_mm"]) == pytest.approx(measured.short_axis_mm, abs=1e-4)
    assert node_follow_up["lymph_node"] == "True" and node_follow_up["intensity_unit"] == "HU"

    document = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert document["format"] == "lesionlocator-report/1"
    assert [r["category"] for r in document["response"]] == [r.category for r in report.response.timepoints]
    lesion_1 = document["lesions"][0]["timepoints"][0]["measurement"]
    assert lesion_1["volume_ml"] == pytest.approx(report.lesion(1).measurements[0].volume_ml, abs=1e-4)

    response_rows = list(csv.DictReader(open(paths["response_csv"], encoding="utf-8")))
    assert [r["category"] for r in response_rows] == ["BL", "PR"]

    html = paths["html"].read_text(encoding="utf-8")
    pictures = embedded_pngs(html)
    assert len(pictures) == 1 + 2 * len(masks)  # summary, then slices and plots per lesion
    assert all(picture.std() > 0.01 for picture in pictures)
    assert "Partial response" in html and "2024-01-02" in html
    summary = imread(paths["summary_png"])
    assert summary.shape[0] > 300 and summary.shape[1] > 1000


def test_summary_figure_shows_every_lesion():
    images, masks = synthetic_study()
    # Lesion 2, drawn second (second palette colour), is larger than lesion 1 at both timepoints.
    report = build_report(images, {1: masks[2], 2: [masks[1][0], masks[1][0]]})
    summary = imread(io.BytesIO(summary_png(report)), format="png")[..., :3]
    second_colour = np.all(np.abs(summary - np.array([1.0, 0.4, 0.0])) < 0.05, axis=-1)
    width = summary.shape[1]
    diameter_panel, volume_panel = slice(width // 3, 2 * width // 3), slice(2 * width // 3, 7 * width // 8)
    assert second_colour[:, diameter_panel].sum() > 300
    assert second_colour[:, volume_panel].sum() > 300


def test_existing_report_is_not_overwritten_without_permission(tmp_path):
    images, masks = synthetic_study()
    report = build_report(images, {1: masks[1]})
    paths = write_report(report, tmp_path)
    paths["html"].write_text("edited by the user", encoding="utf-8")
    with pytest.raises(ReportError, match="--overwrite"):
        write_report(report, tmp_path)
    assert paths["html"].read_text(encoding="utf-8") == "edited by the user"
    write_report(report, tmp_path, overwrite=True)
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_failed_report_leaves_no_file_behind_and_the_rerun_works(tmp_path, monkeypatch):
    """Every file is made before any is written: a failure (here, the page) leaves nothing that blocks a rerun."""
    from LesionLocatorLib.report import output

    images, masks = synthetic_study()
    report = build_report(images, {1: masks[1]})

    def broken_page(*_):
        raise RuntimeError("page failed")

    monkeypatch.setattr(output, "render_html", broken_page)
    with pytest.raises(RuntimeError, match="page failed"):
        write_report(report, tmp_path / "report")
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())
    monkeypatch.undo()
    assert {p.name for p in write_report(report, tmp_path / "report").values()} == set(REPORT_FILES.values())
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES.values())
    (tmp_path / "file").write_text("user data")
    for out, message in [(tmp_path / "file", "is a file"), (tmp_path / "file" / "x", "lies under the file")]:
        with pytest.raises(ReportError, match=message):
            write_report(report, out)
    assert (tmp_path / "file").read_text() == "user data"


def test_new_lesion_and_missing_masks(tmp_path):
    images, masks = synthetic_study(n_timepoints=3)
    masks[2][2] = np.zeros(SHAPE_ZYX, dtype=np.uint8)  # the node's segmentation came back empty
    report = build_report(images, masks, lymph_nodes=[2])
    assert report.role(3) == "new" and report.lesion(3).first_timepoint == 2
    assert [row.category for row in report.response.timepoints] == ["BL", "PR", "PD"]
    assert report.lesion(2).status(2) == "not found"
    html = write_report(report, tmp_path)["html"].read_text(encoding="utf-8")
    assert len(embedded_pngs(html)) == 1 + 2 * 3
    assert "new lesion(s): 3" in html


def test_inconsistent_inputs_are_refused():
    images, masks = synthetic_study()
    with pytest.raises(ReportError, match="one per timepoint"):
        build_report(images, {1: masks[1][:1]})
    with pytest.raises(ReportError, match=r"\[7\]"):
        build_report(images, masks, lymph_nodes=[7])
    with pytest.raises(ReportError, match="Lesion 1, timepoint 0"):
        build_report(images, {1: [np.ones((2, 2, 2), dtype=np.uint8), None]})


def test_axial_view_samples_the_patient_axial_plane_of_an_oblique_grid():
    angle = np.radians(30.0)
    tilt_about_y = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    image = ImageVolume(np.zeros((40, 30, 40), dtype=np.float32), (1.0, 1.0, 1.0), direction_lps=tilt_about_y)
    centre_lps = image.index_zyx_to_lps((19.5, 14.5, 19.5))
    points_lps = image.index_zyx_to_lps(np.indices(image.shape_zyx).reshape(3, -1).T)
    semi_axes = np.array([10.0, 6.0, 14.0])
    mask = ((((points_lps - centre_lps) / semi_axes) ** 2).sum(axis=1) <= 1).reshape(image.shape_zyx)
    view = axial_view(image.with_array(mask.astype(np.float32)), mask, centre_lps, half_width_mm=15.0, pixels=151)
    pixel_area = (30.0 / 150) ** 2
    assert (view.mask >= 0.5).sum() * pixel_area == pytest.approx(np.pi * 10.0 * 6.0, rel=0.05)
    # Rows run along LPS y (6 mm semi-axis), columns along LPS x (10 mm).
    rows, columns = np.nonzero(view.mask >= 0.5)
    assert np.ptp(columns) > np.ptp(rows) * 1.4


def call_cli(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return run(parser.parse_args(arguments))


def write_study(folder, images, masks) -> list:
    image_paths = []
    for t, image in enumerate(images):
        image_paths.append(folder / f"{image.name}.nii.gz")
        sitk.WriteImage(image.to_sitk(), str(image_paths[-1]))
        for lesion_id, lesion_masks in masks.items():
            if lesion_masks[t] is not None:
                write_mask(lesion_masks[t], image, folder / f"{image.name}_lesion_{lesion_id}.nii.gz")
    return image_paths


def tracking_entry(t: int, lesion_id: int, masks) -> dict:
    """A timepoint entry as `lesionlocator track` writes it (mask null when not found)."""
    mask = masks[lesion_id][t]
    found = mask is not None and bool(mask.any())
    return {
        "timepoint": t,
        "found": found,
        "volume_ml": None,
        "centre_lps": None,
        "centre_ras": None,
        "source": "tracked" if mask is not None else "new",
        "message": "" if found else "not found at this timepoint",
        "mask": f"tp{t}_lesion_{lesion_id}.nii.gz" if found else None,
    }


def test_cli_reads_the_tracking_result(tmp_path, capsys):
    images, masks = synthetic_study(n_timepoints=3)
    masks[2][2] = np.zeros(SHAPE_ZYX, dtype=np.uint8)  # the tracker lost the node at the last follow-up
    write_study(tmp_path, images, masks)
    tracking = {
        "format": "lesionlocator-tracking/1",
        "timepoints": [
            {"index": t, "name": name, "image": f"tp{t}.nii.gz", "study_date": date}
            for t, (name, date) in enumerate([("baseline", "2024-01-02"), ("fu1", None), ("fu2", None)])
        ],
        "lesions": {
            str(lesion_id): {
                "name": f"Liver {lesion_id}",
                "is_lymph_node": False,
                "first_timepoint": 2 if lesion_id == 3 else 0,
                "timepoints": [tracking_entry(t, lesion_id, masks) for t in range(3)],
            }
            for lesion_id in masks
        },
        "registrations_computed": 2,
    }
    (tmp_path / "lesions.json").write_text(json.dumps(tracking), encoding="utf-8")
    out = tmp_path / "report"
    arguments = [str(tmp_path / "lesions.json"), "-o", str(out), "--lymph-nodes", "2", "--intensity-unit", "HU"]
    assert call_cli(arguments) == 0
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [lesion["is_lymph_node"] for lesion in document["lesions"]] == [False, True, False]
    assert document["timepoints"][0] == {"index": 0, "name": "baseline", "study_date": "2024-01-02"}
    assert document["lesions"][0]["name"] == "Liver 1"
    assert [t["status"] for t in document["lesions"][1]["timepoints"]] == ["found", "found", "not found"]
    assert [t["status"] for t in document["lesions"][2]["timepoints"]][:2] == ["not yet present"] * 2
    assert [r["category"] for r in document["response"]] == ["BL", "PR", "PD"]
    assert "fu2: PD" in capsys.readouterr().out

    assert call_cli(arguments) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert call_cli(arguments + ["--overwrite"]) == 0


def test_cli_reads_images_and_a_mask_folder(tmp_path, capsys):
    images, masks = synthetic_study()
    image_paths = write_study(tmp_path, images, masks)
    out = tmp_path / "report"
    arguments = ["--images", *map(str, image_paths), "--masks-dir", str(tmp_path), "-o", str(out)]
    assert call_cli(arguments + ["--study-dates", "2024-01-02", "2024-03-30", "--confirmed-absent", "2:1"]) == 0
    rows = list(csv.DictReader(open(out / "measurements.csv", encoding="utf-8")))
    assert [(r["lesion_id"], r["timepoint"], r["status"]) for r in rows] == [
        ("1", "0", "found"), ("1", "1", "found"), ("2", "0", "found"), ("2", "1", "absent")
    ]
    assert rows[1]["study_date"] == "2024-03-30"

    assert call_cli(["--images", str(image_paths[0]), "-o", str(out)]) == 1
    assert "--masks-dir" in capsys.readouterr().err


def test_cli_finds_the_baseline_masks_a_tracking_run_kept_under_prompts(tmp_path):
    """`track -t prev_mask` writes the follow-up masks and keeps the baseline's under prompts/: not new lesions."""
    images, masks = synthetic_study()
    image_paths = write_study(tmp_path, images, masks)
    (tmp_path / "prompts").mkdir()
    for baseline_mask in tmp_path.glob(f"{images[0].name}_lesion_*.nii.gz"):
        baseline_mask.rename(tmp_path / "prompts" / baseline_mask.name)
    out = tmp_path / "report"
    assert call_cli(["--images", *map(str, image_paths), "--masks-dir", str(tmp_path), "-o", str(out)]) == 0
    document = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert document["new_lesion_ids"] == [] and document["target_ids"] == [1, 2]


def test_cli_rejects_a_file_that_is_not_a_tracking_result(tmp_path, capsys):
    (tmp_path / "lesions.json").write_text(json.dumps({"format": "something-else"}), encoding="utf-8")
    assert call_cli([str(tmp_path / "lesions.json"), "-o", str(tmp_path / "out")]) == 1
    assert "lesionlocator-tracking/1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_says_what_to_give_for_a_folder_or_a_malformed_tracking_result(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    out = tmp_path / "out"
    assert call_cli([str(tmp_path / "run"), "-o", str(out)]) == 1
    assert "is a folder; give the lesions.json inside it" in capsys.readouterr().err
    malformed = [([], "'lesions' must map lesion ids to lesions"), ({"1": []}, "lesion 1 must be an object")]
    for lesions, message in malformed:
        document = {"format": "lesionlocator-tracking/1", "timepoints": [], "lesions": lesions}
        (tmp_path / "lesions.json").write_text(json.dumps(document), encoding="utf-8")
        assert call_cli([str(tmp_path / "lesions.json"), "-o", str(out)]) == 1
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_shows_a_numeric_study_date_as_written(tmp_path):
    """A user who fills in the tracker's `"study_date": null` with a number gets the report, not a crash."""
    images, masks = synthetic_study()
    write_study(tmp_path, images, {1: masks[1]})
    tracking = {
        "format": "lesionlocator-tracking/1",
        "timepoints": [{"index": t, "name": f"tp{t}", "image": f"tp{t}.nii.gz", "study_date": 20240102 + t}
                       for t in range(2)],
        "lesions": {"1": {"timepoints": [tracking_entry(t, 1, masks) for t in range(2)]}},
    }
    (tmp_path / "lesions.json").write_text(json.dumps(tracking), encoding="utf-8")
    assert call_cli([str(tmp_path / "lesions.json"), "-o", str(tmp_path / "report")]) == 0
    document = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert [t["study_date"] for t in document["timepoints"]] == ["20240102", "20240103"]
    assert "20240103" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
