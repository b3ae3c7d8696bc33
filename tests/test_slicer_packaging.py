"""Extension packaging: every Python file is installed, resources exist, the extension description files agree,
and loading the module imports nothing that is installed on first use."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LesionLocator"
TOP_CMAKE = (REPO / "CMakeLists.txt").read_text()
MODULE_CMAKE = (MODULE_DIR / "CMakeLists.txt").read_text()
# what Slicer bundles, so the module may import it when it is loaded (before any dependency is installed)
BUNDLED_AT_LOAD = {"__future__", "dataclasses", "datetime", "enum", "functools", "importlib", "itertools", "logging", "os",
                   "pathlib", "queue", "sys", "tempfile", "threading", "typing", "numpy", "SimpleITK", "vtk", "qt",
                   "ctk", "slicer", "LesionLocatorSlicer"}
ENGINE_MODULES_AT_LOAD = {"LesionLocatorLib.errors", "LesionLocatorLib.image"}


def cmakeList(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\n(.*?)\n\s*\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_module_python_file_is_listed_and_every_listed_file_exists():
    listed = {entry.replace("${MODULE_NAME}", "LesionLocator") for entry in cmakeList(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS")}
    present = {str(path.relative_to(MODULE_DIR)) for path in MODULE_DIR.rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(present - listed) == [], "add these to MODULE_PYTHON_SCRIPTS in LesionLocator/CMakeLists.txt"
    assert sorted(listed - present) == [], "these are listed but do not exist"


def test_every_engine_python_file_is_listed_and_every_listed_file_exists():
    listed = set(cmakeList(MODULE_CMAKE, "ENGINE_PYTHON_SCRIPTS"))
    present = {str(path.relative_to(REPO)) for path in (REPO / "LesionLocatorLib").rglob("*.py")
               if "__pycache__" not in path.parts}
    assert sorted(present - listed) == [], "add these to ENGINE_PYTHON_SCRIPTS in LesionLocator/CMakeLists.txt"
    assert sorted(listed - present) == [], "these are listed but do not exist"


def test_listed_resources_exist_and_the_icon_is_128_pixels():
    from PIL import Image

    resources = [entry.replace("${MODULE_NAME}", "LesionLocator") for entry in cmakeList(MODULE_CMAKE, "ENGINE_PYTHON_RESOURCES")]
    assert "Resources/UI/LesionLocator.ui" in resources
    for resource in resources:
        assert (REPO / resource).is_file(), resource
    assert Image.open(REPO / "Resources" / "Icons" / "LesionLocator.png").size == (128, 128)


def test_module_is_built_with_the_slicer_macros_and_a_self_test():
    assert "slicerMacroBuildScriptedModule(" in MODULE_CMAKE
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE
    assert "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in MODULE_CMAKE
    assert "Resources/Models/LesionLocatorLite/*" in MODULE_CMAKE


def test_top_level_cmake_declares_the_extension():
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({variable} \"[^\"]+\"\)", TOP_CMAKE), variable
    assert "set(EXTENSION_DEPENDS PyTorch)" in TOP_CMAKE
    assert re.search(r"^project\(LesionLocator\)$", TOP_CMAKE, re.M)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LesionLocator)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in TOP_CMAKE


def s4ext() -> dict[str, str]:
    entries = {}
    for line in (REPO / "LesionLocator.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value
    return entries


def test_description_files_agree_with_each_other_and_with_cmake():
    description, catalog = s4ext(), json.loads((REPO / "catalog" / "LesionLocator.json").read_text())
    repository = re.search(r'set\(LESIONLOCATOR_REPOSITORY_URL "([^"]+)"\)', TOP_CMAKE).group(1)
    assert description["scmurl"] == catalog["scm_url"] == f"{repository}.git"
    assert description["scmrevision"] == catalog["scm_revision"]
    assert description["category"] == catalog["category"] == "Segmentation"
    assert description["depends"].split() == catalog["build_dependencies"] == ["PyTorch"]
    assert description["iconurl"].endswith("Resources/Icons/LesionLocator.png")


def test_catalog_entry_follows_the_extensions_index_schema():
    catalog = json.loads((REPO / "catalog" / "LesionLocator.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # schema v1.0.2
    assert {"$schema", "category", "scm_url"} <= set(catalog) <= allowed
    assert catalog["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json")
    assert 1 <= catalog["tier"] <= 5


def topLevelImports(path: Path) -> set[str]:
    imported = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    return imported


@pytest.mark.parametrize("path", [MODULE_DIR / "LesionLocator.py", *sorted((MODULE_DIR / "LesionLocatorSlicer").glob("*.py"))],
                         ids=lambda path: path.name)
def test_module_files_import_only_what_slicer_bundles_at_load_time(path):
    for name in topLevelImports(path):
        if name.startswith(".") or name in ENGINE_MODULES_AT_LOAD:
            continue
        assert name.split(".")[0] in BUNDLED_AT_LOAD, f"{path.name} imports {name} when the module loads"


def test_helpers_load_without_the_engine_dependencies():
    """torch, cc3d, skimage, nnunetv2 ... are installed on first use: importing the Logic must not need them."""
    blocked = ["torch", "cc3d", "skimage", "nnunetv2", "dynamic_network_architectures", "icon_registration", "scipy"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(MODULE_DIR)!r}]\n"
        "import LesionLocatorSlicer.logic, LesionLocatorSlicer.selftest\n"
        "import slicer\n"
        "logic = LesionLocatorSlicer.logic.LesionTrackingLogic(slicer.vtkMRMLScene())\n"
        "import vtk\n"
        "volume = logic.scene.AddNewNodeByClass('vtkMRMLScalarVolumeNode')\n"
        "voxels = vtk.vtkImageData(); voxels.SetDimensions(4, 4, 4); voxels.AllocateScalars(vtk.VTK_FLOAT, 1)\n"
        "volume.SetAndObserveImageData(voxels)\n"
        "print(repr(logic.intensityWarning([volume])), logic.lesionTable().rows)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("'' []")  # no warning before the engine can judge
