"""LesionLocatorLib: promptable lesion segmentation and longitudinal tracking (engine, no Slicer imports)."""

__version__ = "0.1.0"
