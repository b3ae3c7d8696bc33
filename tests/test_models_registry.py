"""Model registry, cache folder rules, model-root validation and the `models` CLI (no network, no torch)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import LesionLocatorLib
from LesionLocatorLib.models import cli
from LesionLocatorLib.models.cache import CACHE_ENV_VAR, platform_cache_dir, user_cache_dir
from LesionLocatorLib.models.layout import ModelLayoutError, find_model_root, validate_model_root
from LesionLocatorLib.models.registry import (
    BUNDLED_LITE_DIR,
    LESIONLOCATOR_OFFICIAL,
    ModelNotInstalledError,
    UnknownModelError,
    expected_location,
    list_models,
    model_root,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "fixtures" / "official" / "tiny"
NETWORK_FOLDERS = ("LesionLocatorSeg/point_optimized", "LesionLocatorSeg/bbox_optimized", "LesionLocatorTrack")


def write_model_root(root: Path, folders: tuple[str, ...] = NETWORK_FOLDERS, folds: tuple[int, ...] = (0,)) -> Path:
    """A model root with the official file layout; the files are placeholders (layout checks read no weights)."""
    for folder in folders:
        for name in ("plans.json", "dataset.json"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_text("{}")
        for fold in folds:
            (root / folder / f"fold_{fold}").mkdir()
            (root / folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"weights")
    return root


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args(argv))


def test_platform_cache_dirs():
    home = Path("/home/ann")
    assert platform_cache_dir("linux", {}, home) == home / ".cache" / "lesionlocator"
    assert platform_cache_dir("linux", {"XDG_CACHE_HOME": "/xdg"}, home) == Path("/xdg/lesionlocator")
    assert platform_cache_dir("linux", {"XDG_CACHE_HOME": "relative"}, home) == home / ".cache" / "lesionlocator"
    assert platform_cache_dir("darwin", {}, home) == home / "Library" / "Caches" / "lesionlocator"
    assert platform_cache_dir("win32", {"LOCALAPPDATA": "C:/Users/ann/AppData/Local"}, home) == Path(
        "C:/Users/ann/AppData/Local/lesionlocator/Cache"
    )


def test_cache_dir_precedence_explicit_then_env_then_platform(tmp_path):
    env = {CACHE_ENV_VAR: str(tmp_path / "env"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert user_cache_dir(tmp_path / "setting", env) == tmp_path / "setting"
    assert user_cache_dir(None, env) == tmp_path / "env"
    assert user_cache_dir(None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}).name == "lesionlocator"


def test_bundled_lite_model_is_resolved_from_the_repository():
    assert BUNDLED_LITE_DIR == Path(LesionLocatorLib.__file__).parents[1] / "Resources" / "Models" / "LesionLocatorLite"


@pytest.mark.skipif(not TINY.is_dir(), reason=f"official tiny fixture not found at {TINY}")
def test_official_tiny_fixture_is_a_valid_model_root():
    layout = validate_model_root(TINY)
    assert layout.tasks == ("point", "box", "track")
    assert layout.folds == {"point": (0, 1), "box": (0,), "track": (0,)}


def test_missing_fold_checkpoint_is_named(tmp_path):
    root = write_model_root(tmp_path / "m", folds=(0, 1))
    missing = root / "LesionLocatorSeg" / "bbox_optimized" / "fold_1" / "checkpoint_final.pth"
    missing.unlink()
    with pytest.raises(ModelLayoutError, match="fold_1/checkpoint_final.pth"):
        validate_model_root(root)


def test_missing_json_and_missing_box_model_are_named(tmp_path):
    root = write_model_root(tmp_path / "m")
    (root / "LesionLocatorTrack" / "dataset.json").unlink()
    with pytest.raises(ModelLayoutError, match="LesionLocatorTrack/dataset.json"):
        validate_model_root(root)
    point_only = write_model_root(tmp_path / "p", folders=("LesionLocatorSeg/point_optimized",))
    with pytest.raises(ModelLayoutError, match="bbox_optimized/plans.json"):
        validate_model_root(point_only)


def test_track_only_root_is_valid(tmp_path):
    assert validate_model_root(write_model_root(tmp_path / "t", folders=("LesionLocatorTrack",))).tasks == ("track",)


def test_wrong_folders_get_a_hint(tmp_path):
    root = write_model_root(tmp_path / "LesionLocatorCheckpoint")
    with pytest.raises(ModelLayoutError, match=f"probably {root}"):
        validate_model_root(root / "LesionLocatorSeg" / "point_optimized")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLayoutError, match="not a LesionLocator model folder"):
        validate_model_root(tmp_path / "empty")


def test_manifest_layout_and_escaping_manifest(tmp_path):
    root = write_model_root(tmp_path / "lite", folders=("net",))
    (root / "lesionlocator_model.json").write_text(json.dumps({"tasks": {"point": "net", "box": "net"}}))
    assert validate_model_root(root).task_folders == {"point": root / "net", "box": root / "net"}
    (root / "lesionlocator_model.json").write_text(json.dumps({"tasks": {"point": "../elsewhere"}}))
    with pytest.raises(ModelLayoutError, match="outside the model folder"):
        validate_model_root(root)


def test_find_model_root_looks_inside_archive_wrappers(tmp_path):
    (tmp_path / "__MACOSX" / "LesionLocatorSeg").mkdir(parents=True)
    root = write_model_root(tmp_path / "LesionLocatorCheckpoint")
    assert find_model_root(tmp_path) == root
    with pytest.raises(ModelLayoutError, match="No LesionLocator model"):
        find_model_root(root / "LesionLocatorSeg" / "point_optimized" / "fold_0")


def test_not_installed_official_model_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelNotInstalledError) as error:
        model_root("lesionlocator", tmp_path)
    message = str(error.value)
    assert "--accept-licence" in message
    assert LESIONLOCATOR_OFFICIAL.manual_download_page in message
    assert str(tmp_path / "models" / "lesionlocator") in message


def test_model_root_of_names_and_folders(tmp_path):
    write_model_root(expected_location(LESIONLOCATOR_OFFICIAL, tmp_path))
    assert model_root("lesionlocator", tmp_path) == tmp_path / "models" / "lesionlocator"
    local = write_model_root(tmp_path / "download" / "LesionLocatorCheckpoint")
    assert model_root(tmp_path / "download") == local
    with pytest.raises(UnknownModelError, match="neither a known model"):
        model_root(tmp_path / "nowhere")


def test_list_models_reports_installation(tmp_path):
    before = {status.source.name: status for status in list_models(tmp_path)}
    assert not before["lesionlocator"].installed and "not installed" in before["lesionlocator"].problem
    assert before["lesionlocator-lite"].source.path == BUNDLED_LITE_DIR
    write_model_root(tmp_path / "models" / "lesionlocator")
    local = write_model_root(tmp_path / "mine", folders=("LesionLocatorTrack",))
    after = {status.source.name: status for status in list_models(tmp_path, (local,))}
    assert after["lesionlocator"].installed and after["mine"].layout.tasks == ("track",)


def test_cli_list_path_clear(tmp_path, capsys):
    assert run_cli(["--cache-dir", str(tmp_path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "lesionlocator-lite" in listing and "not installed" in listing and "zenodo.org/records/15174217" in listing
    assert run_cli(["--cache-dir", str(tmp_path), "path", "lesionlocator"]) == 1
    assert "models download lesionlocator --accept-licence" in capsys.readouterr().err
    installed = write_model_root(tmp_path / "models" / "lesionlocator")
    assert run_cli(["--cache-dir", str(tmp_path), "path", "lesionlocator"]) == 0
    assert capsys.readouterr().out.strip() == str(installed)
    assert run_cli(["--cache-dir", str(tmp_path), "clear", "lesionlocator"]) == 0
    assert f"deleted {installed}" in capsys.readouterr().out and not installed.exists()


def test_cli_clear_deletes_only_what_the_package_put_in_the_cache(tmp_path, capsys):
    """A user-chosen cache folder may hold the user's own models and files, even under models/ and downloads/."""
    installed = write_model_root(tmp_path / "models" / "lesionlocator")
    staging = tmp_path / "models" / ".staging-lesionlocator-x1y2"
    staging.mkdir()
    part = tmp_path / "downloads" / "LesionLocatorModel.zip.part"
    part.parent.mkdir()
    part.write_bytes(b"half")
    own = [write_model_root(tmp_path / "models" / "my_finetuned_model"), tmp_path / "downloads" / "patient_scans.zip",
           tmp_path / "notes.txt"]
    for path in own[1:]:
        path.write_text("user data")
    assert run_cli(["--cache-dir", str(tmp_path), "clear"]) == 0
    printed = capsys.readouterr().out
    assert all(f"deleted {path}" in printed for path in (installed, staging, part))
    assert not any(path.exists() for path in (installed, staging, part))
    assert all(path.exists() for path in own) and "my_finetuned_model" not in printed
    assert run_cli(["--cache-dir", str(tmp_path), "clear"]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_cli_download_requires_licence_acceptance(tmp_path, capsys):
    assert run_cli(["--cache-dir", str(tmp_path), "download", "lesionlocator"]) == 1
    assert "--accept-licence" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
