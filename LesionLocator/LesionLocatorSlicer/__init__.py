"""MRML <-> engine conversions and the Logic of the LesionLocator Slicer module.

Imports only what Slicer bundles (numpy, SimpleITK, VTK, MRML) at module level, so that the module loads before the
engine's dependencies (torch, ...) are installed. Everything here runs headless on slicer-core (tests/test_slicer_*).
"""
