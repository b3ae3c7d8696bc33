"""The HTML report rendered by a real headless Chromium: slices, contours, axes and plots are visible."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.image import imread
from test_report import synthetic_study

from LesionLocatorLib.report import build_report, write_report
from LesionLocatorLib.report.figures import (
    CONTOUR_COLOUR,
    DIAMETER_COLOUR,
    LONG_AXIS_COLOUR,
    SHORT_AXIS_COLOUR,
    VOLUME_COLOUR,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium)"
)


def screenshot(html_path, png_path, profile_dir) -> np.ndarray:
    """RGB (rows, columns, 3) uint8 screenshot of the page, 1400 x 3000 pixels."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile_dir}", f"--screenshot={png_path}", "--window-size=1400,3000",
        "--hide-scrollbars", "--force-device-scale-factor=1", html_path.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return (imread(png_path)[..., :3] * 255).round().astype(np.uint8)


def colour_mask(pixels: np.ndarray, hex_colour: str, tolerance: int = 12) -> np.ndarray:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return np.all(np.abs(pixels.astype(int) - rgb) <= tolerance, axis=-1)


def test_report_page_shows_slices_contours_and_plots(tmp_path):
    images, masks = synthetic_study()
    report = build_report(images, masks, lymph_nodes=[2], intensity_unit="HU")
    html_path = write_report(report, tmp_path / "report")["html"]
    pixels = screenshot(html_path, tmp_path / "page.png", tmp_path / "profile")
    assert pixels.shape[:2] == (3000, 1400)

    contour = colour_mask(pixels, CONTOUR_COLOUR)
    # Two lesions at two timepoints: four contours, each well over 50 magenta pixels.
    assert contour.sum() > 4 * 50
    for colour in (LONG_AXIS_COLOUR, SHORT_AXIS_COLOUR, VOLUME_COLOUR, DIAMETER_COLOUR):
        assert colour_mask(pixels, colour).sum() > 100, colour

    # Around the contours lies the CT slice: many grey levels, not a blank or flat area.
    rows, columns = np.nonzero(contour)
    around = pixels[max(rows.min() - 40, 0) : rows.max() + 40, max(columns.min() - 40, 0) : columns.max() + 40]
    grey = around[(around.max(axis=-1) - around.min(axis=-1)) < 8, 0]
    assert len(np.unique(grey)) > 30 and grey.std() > 10

    # The page is laid out (white cards on a grey background), not one flat colour.
    assert colour_mask(pixels, "#ffffff", tolerance=0).mean() > 0.2
    assert colour_mask(pixels, "#f3f4f6", tolerance=0).mean() > 0.02
