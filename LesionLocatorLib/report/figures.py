"""The report's pictures (PNG bytes): axial slices through each lesion, plots over time, a summary figure.

Matplotlib is used through its object API with the Agg canvas, so no GUI backend is touched (safe inside
3D Slicer). Slices are resampled in the patient's axial plane (LPS z = const) shown in radiological
convention (patient's right on the image's left, anterior up), whatever the scan's voxel orientation.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.ndimage import map_coordinates

from ..image import ImageVolume
from ..measurements import LesionMeasurement
from ..response import BASELINE, CR, NE, NON_CR_NON_PD, PD, PR, PR_FRACTION, SD, LesionSeries
from .build import Report

# Pure, distinctive colours: readable on grey CT/MR and easy to find in a rendered page (see the browser test).
CONTOUR_COLOUR = "#ff00ff"
LONG_AXIS_COLOUR = "#00ffff"
SHORT_AXIS_COLOUR = "#ffff00"
VOLUME_COLOUR = "#ff6600"
DIAMETER_COLOUR = "#0066ff"
CATEGORY_COLOURS = {
    BASELINE: "#6b7280", CR: "#15803d", PR: "#65a30d", SD: "#ca8a04", PD: "#dc2626", NE: "#7c3aed",
    NON_CR_NON_PD: "#0e7490",
}
CT_WINDOW_HU = (-160.0, 240.0)  # soft-tissue window (level 40, width 400)
PANEL_PIXELS = 200  # samples across a slice panel
PANELS_PER_ROW = 5
SLICE_COLOURMAP = colormaps["gray"].with_extremes(bad="black")  # outside the scanned volume: black
DPI = 100


@dataclass(frozen=True)
class AxialView:
    """An axial slice resampled on a square LPS (x, y) grid: rows go along LPS y, columns along LPS x."""

    image: np.ndarray
    mask: np.ndarray
    extent_lps: tuple[float, float, float, float]  # imshow extent: x left, x right, y bottom, y top


def axial_view(
    image: ImageVolume, mask: np.ndarray, centre_lps, half_width_mm: float, pixels: int = PANEL_PIXELS
) -> AxialView:
    """Image and mask (linear interpolation) on the axial plane through `centre_lps`, NaN outside the image."""
    offsets = np.linspace(-half_width_mm, half_width_mm, pixels)
    x_lps, y_lps = np.meshgrid(centre_lps[0] + offsets, centre_lps[1] + offsets)
    points_lps = np.stack([x_lps, y_lps, np.full_like(x_lps, centre_lps[2])], axis=-1)
    index_zyx = image.lps_to_index_zyx(points_lps)
    low = np.clip(np.floor(index_zyx.min(axis=(0, 1))).astype(int) - 1, 0, np.array(image.shape_zyx) - 1)
    high = np.maximum(np.clip(np.ceil(index_zyx.max(axis=(0, 1))).astype(int) + 2, 0, image.shape_zyx), low + 1)
    crop = tuple(slice(lo, hi) for lo, hi in zip(low, high))
    coordinates = np.moveaxis(index_zyx - low, -1, 0)
    # Only the crop is converted to float, so full-size volumes are never copied.
    sampled_image = map_coordinates(image.array[crop].astype(np.float32), coordinates, order=1, cval=np.nan)
    sampled_mask = map_coordinates((mask[crop] != 0).astype(np.float32), coordinates, order=1, cval=0.0)
    extent = (
        float(x_lps[0, 0]), float(x_lps[0, -1]), float(y_lps[-1, 0]), float(y_lps[0, 0])
    )
    return AxialView(sampled_image, sampled_mask, extent)


def lesion_slices_png(report: Report, lesion_id: int) -> bytes:
    """One axial slice per timepoint through the lesion, contour and RECIST axes drawn."""
    series = report.lesion(lesion_id)
    n_timepoints = len(report.timepoints)
    n_columns = min(n_timepoints, PANELS_PER_ROW)
    n_rows = math.ceil(n_timepoints / n_columns)
    figure = Figure(figsize=(2.4 * n_columns, 3.0 * n_rows), dpi=DPI, facecolor="white", layout="constrained")
    half_width = _view_half_width(series)
    for t, info in enumerate(report.timepoints):
        axes = figure.add_subplot(n_rows, n_columns, t + 1)
        title = info.name + (f"\n{info.study_date}" if info.study_date else "")
        axes.set_title(title, fontsize=9)
        measurement = series.measurements[t]
        if measurement is not None and measurement.found:
            mask = report.masks[lesion_id][t]
            draw = _draw_node_slice if series.is_lymph_node else _draw_slice
            draw(axes, report.images[t], mask, measurement, half_width, report.intensity_unit)
        else:
            _draw_missing(axes, series.status(t))
    return _png(figure)


def lesion_plots_png(report: Report, lesion_id: int) -> bytes:
    """Volume and diameters of one lesion over the timepoints."""
    series = report.lesion(lesion_id)
    figure = Figure(figsize=(9.6, 3.0), dpi=DPI, facecolor="white", layout="constrained")
    volume_axes, diameter_axes = figure.subplots(1, 2)
    volumes = [series.volume_ml(t) for t in range(len(report.timepoints))]
    _plot_series(volume_axes, volumes, VOLUME_COLOUR, "volume", "-")
    volume_axes.set_ylabel("Volume (mL)")
    n = len(report.timepoints)
    # The RECIST diameter (a lymph node's largest short axis, else the parts' long axes summed) is drawn solid, the
    # other axis dashed.
    if series.is_lymph_node:
        recist_label, other_label, other_field = "RECIST: largest short axis", "long axis", "long_axis_mm"
    else:
        recist_label, other_label, other_field = "RECIST: long axis (parts summed)", "short axis", "short_axis_mm"
    other_axis = [_axis_or_zero(series, t, other_field) for t in range(n)]
    _plot_series(diameter_axes, [series.diameter_mm(t) for t in range(n)], DIAMETER_COLOUR, recist_label, "-")
    _plot_series(diameter_axes, other_axis, DIAMETER_COLOUR, other_label, "--")
    diameter_axes.set_ylabel("Axial diameter (mm)")
    diameter_axes.legend(fontsize=8, frameon=False)
    for axes in (volume_axes, diameter_axes):
        _timepoint_axis(axes, report)
    return _png(figure)


def summary_png(report: Report) -> bytes:
    """Sum of target diameters with the RECIST category per timepoint, diameters and volumes of all lesions."""
    figure = Figure(figsize=(12.0, 4.2), dpi=DPI, facecolor="white", layout="constrained")
    sum_axes, diameter_axes, volume_axes = figure.subplots(1, 3)
    _plot_sum_of_diameters(sum_axes, report)
    colours = _lesion_colours(len(report.series))
    for series, colour in zip(report.series, colours):
        n = len(report.timepoints)
        _plot_series(diameter_axes, [series.diameter_mm(t) for t in range(n)], colour, series.name, "-")
        _plot_series(volume_axes, [series.volume_ml(t) for t in range(n)], colour, series.name, "-")
    diameter_axes.set_title("RECIST diameter per lesion", fontsize=10)
    diameter_axes.set_ylabel("mm (short axis for lymph nodes)")
    volume_axes.set_title("Volume per lesion", fontsize=10)
    volume_axes.set_ylabel("mL")
    volume_axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for axes in (sum_axes, diameter_axes, volume_axes):
        _timepoint_axis(axes, report)
    figure.suptitle(report.title, fontsize=12, fontweight="bold")
    return _png(figure)


# --- slices --------------------------------------------------------------------------------------------------
def _view_half_width(series: LesionSeries) -> float:
    """Same field of view at every timepoint: the largest lesion with a margin, 20-150 mm wide."""
    diameters = [m.max_diameter_3d_mm for m in series.measurements if m is not None and m.found]
    return float(np.clip(1.3 * max(diameters, default=0.0), 10.0, 75.0))


def _show_view(axes: Axes, view: AxialView, unit: str) -> None:
    """The slice image and the mask's contour, on the view's LPS extent."""
    low, high = _display_window(view.image, unit)
    axes.imshow(view.image, cmap=SLICE_COLOURMAP, vmin=low, vmax=high, extent=view.extent_lps, interpolation="bilinear")
    if view.mask.max() >= 0.5:
        x_lps = np.linspace(view.extent_lps[0], view.extent_lps[1], view.mask.shape[1])
        y_lps = np.linspace(view.extent_lps[3], view.extent_lps[2], view.mask.shape[0])
        axes.contour(x_lps, y_lps, view.mask, levels=[0.5], colors=CONTOUR_COLOUR, linewidths=1.6)
    axes.set_xlim(view.extent_lps[0], view.extent_lps[1])
    axes.set_ylim(view.extent_lps[2], view.extent_lps[3])


def _draw_slice(
    axes: Axes, image: ImageVolume, mask: np.ndarray, measurement: LesionMeasurement, half_width: float, unit: str
) -> None:
    view = axial_view(image, mask, np.mean(measurement.long_axis_lps, axis=0), half_width)
    _show_view(axes, view, unit)
    _draw_axis(axes, measurement.long_axis_lps, LONG_AXIS_COLOUR)
    _draw_axis(axes, measurement.short_axis_lps, SHORT_AXIS_COLOUR)
    m = measurement
    axes.set_xlabel(f"LD {m.long_axis_mm:.1f} mm · SA {m.short_axis_mm:.1f} mm\n{m.volume_ml:.2f} mL", fontsize=8)
    _hide_ticks(axes)


def _draw_node_slice(
    axes: Axes, image: ImageVolume, mask: np.ndarray, measurement: LesionMeasurement, half_width: float, unit: str
) -> None:
    """A lymph node on the slice of its largest short axis (its RECIST diameter), with that axis drawn."""
    short_axis = np.asarray(measurement.largest_short_axis_lps)
    view = axial_view(image, mask, short_axis.mean(axis=0), half_width)
    _show_view(axes, view, unit)
    if np.isclose(short_axis[0, 2], measurement.axial_plane_z_lps):  # the long axis lies on this slice too
        _draw_axis(axes, measurement.long_axis_lps, LONG_AXIS_COLOUR)
    _draw_axis(axes, short_axis, SHORT_AXIS_COLOUR)
    m = measurement
    axes.set_xlabel(
        f"SA {m.largest_short_axis_mm:.1f} mm (largest) · LD {m.long_axis_mm:.1f} mm\n{m.volume_ml:.2f} mL", fontsize=8
    )
    _hide_ticks(axes)


def _draw_axis(axes: Axes, segment_lps, colour: str) -> None:
    ends = np.asarray(segment_lps)
    axes.plot(ends[:, 0], ends[:, 1], color=colour, linewidth=1.6, solid_capstyle="butt")


def _draw_missing(axes: Axes, status: str) -> None:
    axes.set_facecolor("#e5e7eb")
    axes.text(0.5, 0.5, status, ha="center", va="center", fontsize=10, color="#374151", transform=axes.transAxes)
    axes.set_xlabel(" \n ", fontsize=8)  # the same height as a measured panel's label
    _hide_ticks(axes)


def _display_window(values: np.ndarray, unit: str) -> tuple[float, float]:
    if unit == "HU":
        return CT_WINDOW_HU
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    return float(low), float(max(high, low + 1e-6))


def _hide_ticks(axes: Axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


# --- plots ---------------------------------------------------------------------------------------------------
def _axis_or_zero(series: LesionSeries, t: int, field_name: str) -> float | None:
    status = series.status(t)
    if status == "absent":
        return 0.0
    return getattr(series.measurements[t], field_name) if status == "found" else None


def _plot_series(axes: Axes, values: list[float | None], colour: str, label: str, style: str) -> None:
    y = np.array([np.nan if v is None else v for v in values], dtype=float)
    axes.plot(np.arange(len(y)), y, style, color=colour, linewidth=2.5, marker="o", markersize=5, label=label)
    axes.grid(True, color="#e5e7eb", linewidth=0.8)


def _plot_sum_of_diameters(axes: Axes, report: Report) -> None:
    rows = report.response.timepoints
    sums = [row.sum_diameters.value if row.sum_is_complete else None for row in rows]
    _plot_series(axes, sums, DIAMETER_COLOUR, "sum of diameters", "-")
    baseline = rows[0].sum_diameters.value
    if baseline:
        axes.axhline(baseline, color="#6b7280", linestyle=":", linewidth=1.2)
        pr_threshold = (1.0 + PR_FRACTION) * baseline
        axes.axhline(
            pr_threshold, color=CATEGORY_COLOURS[PR], linestyle="--", linewidth=1.2, label="PR threshold (-30 %)"
        )
        axes.legend(fontsize=8, frameon=False, loc="lower left")
    top = max([s for s in sums if s is not None], default=1.0)
    axes.set_ylim(0.0, 1.3 * top)
    for t, row in enumerate(rows):
        axes.annotate(
            row.category,
            (t, 1.18 * top),
            ha="center",
            fontsize=9,
            fontweight="bold",
            color="white",
            bbox={"boxstyle": "round,pad=0.3", "facecolor": CATEGORY_COLOURS[row.category], "edgecolor": "none"},
        )
    axes.set_title("Sum of target diameters and RECIST 1.1 response", fontsize=10)
    axes.set_ylabel("mm")


def _timepoint_axis(axes: Axes, report: Report) -> None:
    labels = [info.name + (f"\n{info.study_date}" if info.study_date else "") for info in report.timepoints]
    crowded = len(labels) > 4  # tilt the labels so that names and dates do not overlap
    axes.set_xticks(
        range(len(labels)), labels, fontsize=8, rotation=30 if crowded else 0, ha="right" if crowded else "center"
    )
    axes.set_xlim(-0.4, len(labels) - 0.6)
    axes.set_ylim(bottom=0.0)  # after all series are drawn: fixing a limit stops autoscaling
    axes.spines[["top", "right"]].set_visible(False)


def _lesion_colours(n: int) -> list[str]:
    palette = ["#0066ff", "#ff6600", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#a16207", "#db2777", "#4b5563"]
    return [palette[i % len(palette)] for i in range(n)]


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return buffer.getvalue()
