"""Fixtures shared by the test files."""
import shutil

import pytest


@pytest.fixture
def scene():
    """A fresh MRML scene of the slicer-core wheel (real MRML classes, no Slicer application)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def lite_root(tmp_path_factory):
    """A copy of the bundled Lite model that the tests of one module may change (skipped when it is missing)."""
    from LesionLocatorLib.models.layout import MODEL_MANIFEST
    from LesionLocatorLib.models.registry import BUNDLED_LITE_DIR

    if not (BUNDLED_LITE_DIR / MODEL_MANIFEST).is_file():
        pytest.skip("bundled Lite model missing")
    root = tmp_path_factory.mktemp("lite") / "model"
    shutil.copytree(BUNDLED_LITE_DIR, root)
    return root
