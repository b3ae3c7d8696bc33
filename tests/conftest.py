"""Fixtures shared by the test files."""
import pytest


@pytest.fixture
def scene():
    """A fresh MRML scene of the slicer-core wheel (real MRML classes, no Slicer application)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML classes) is not installed")
    return slicer.vtkMRMLScene()
