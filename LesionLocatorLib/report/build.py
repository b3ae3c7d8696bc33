"""Assemble a longitudinal report: measure every lesion mask at every timepoint, then the response."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from .. import __version__
from ..errors import LesionLocatorError
from ..image import ImageVolume
from ..measurements import LesionMeasurement, measure_lesion
from ..response import LesionSeries, ResponseTable, TimepointInfo, compute_response

Progress = Callable[[float, str], None]


class ReportError(LesionLocatorError, ValueError):
    """The report's inputs do not fit together or its output cannot be written."""


@dataclass
class Report:
    """Everything a report shows: inputs (for the pictures), measurements and response."""

    title: str
    timepoints: list[TimepointInfo]
    images: list[ImageVolume]
    masks: dict[int, list[np.ndarray | None]]
    series: list[LesionSeries]
    response: ResponseTable
    intensity_unit: str
    created_utc: str
    engine_version: str = __version__

    def lesion(self, lesion_id: int) -> LesionSeries:
        return next(s for s in self.series if s.lesion_id == lesion_id)

    def role(self, lesion_id: int) -> str:
        """'target', 'non-target', 'new' or 'excluded' (not found at baseline, or a normal-size node)."""
        if lesion_id in self.response.target_ids:
            return "target"
        if lesion_id in self.response.non_target_ids:
            return "non-target"
        return "new" if lesion_id in self.response.new_lesion_ids else "excluded"


def build_report(
    timepoints: list[ImageVolume],
    masks: Mapping[int, Sequence[np.ndarray | None]],
    *,
    timepoint_names: Sequence[str] | None = None,
    study_dates: Sequence[str | None] | None = None,
    lesion_names: Mapping[int, str] | None = None,
    lymph_nodes: Iterable[int] = (),
    first_timepoints: Mapping[int, int] | None = None,
    confirmed_absent: Mapping[int, Iterable[int]] | None = None,
    intensity_unit: str = "unknown",
    title: str = "Longitudinal lesion report",
    progress: Progress | None = None,
) -> Report:
    """Measure `masks[lesion_id][t]` (a (z, y, x) mask on `timepoints[t]`'s grid, None = not segmented).

    Timepoint 0 is the baseline. A lesion's first timepoint defaults to its first non-None mask; lesions
    first seen at a follow-up are new lesions. `confirmed_absent[lesion_id]` lists the timepoints where a
    reader confirmed the lesion disappeared (it then counts as 0 mm instead of not evaluable).
    """
    infos = _timepoint_infos(timepoints, timepoint_names, study_dates)
    node_ids = set(lymph_nodes)
    _check_lesion_ids(masks, node_ids, lesion_names, first_timepoints, confirmed_absent)
    series = []
    for number, (lesion_id, lesion_masks) in enumerate(sorted(masks.items())):
        if progress is not None:
            progress(number / max(len(masks), 1), f"Measuring lesion {lesion_id}")
        series.append(
            LesionSeries(
                lesion_id=lesion_id,
                name=(lesion_names or {}).get(lesion_id, f"Lesion {lesion_id}"),
                is_lymph_node=lesion_id in node_ids,
                first_timepoint=_first_timepoint(lesion_id, lesion_masks, first_timepoints),
                measurements=_measure_series(lesion_id, timepoints, lesion_masks, intensity_unit),
                confirmed_absent=frozenset((confirmed_absent or {}).get(lesion_id, ())),
            )
        )
    if progress is not None:
        progress(1.0, "Computing the response")
    return Report(
        title=title,
        timepoints=infos,
        images=list(timepoints),
        masks={lesion_id: list(lesion_masks) for lesion_id, lesion_masks in masks.items()},
        series=series,
        response=compute_response(series, infos),
        intensity_unit=intensity_unit,
        created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _timepoint_infos(
    images: list[ImageVolume], names: Sequence[str] | None, dates: Sequence[str | None] | None
) -> list[TimepointInfo]:
    if not images:
        raise ReportError("A report needs at least one timepoint image (the baseline).")
    for label, values in (("timepoint names", names), ("study dates", dates)):
        if values is not None and len(values) != len(images):
            raise ReportError(f"Got {len(values)} {label} for {len(images)} timepoints; give one per timepoint.")
    default_names = ["Baseline"] + [f"Follow-up {t}" for t in range(1, len(images))]
    return [
        TimepointInfo(
            index=t,
            name=(names[t] if names is not None else images[t].name) or default_names[t],
            study_date=dates[t] if dates is not None else None,
        )
        for t in range(len(images))
    ]


def _check_lesion_ids(
    masks: Mapping[int, Sequence],
    node_ids: set[int],
    *optional_maps: Mapping[int, object] | None,
) -> None:
    if not masks:
        raise ReportError("No lesion masks given: segment or track at least one lesion first.")
    unknown = (node_ids | {key for mapping in optional_maps for key in (mapping or {})}) - set(masks)
    if unknown:
        raise ReportError(
            f"Lesion id(s) {sorted(unknown)} are not among the segmented lesions {sorted(masks)}; check the ids."
        )


def _first_timepoint(lesion_id: int, lesion_masks: Sequence, first_timepoints: Mapping[int, int] | None) -> int:
    if first_timepoints and lesion_id in first_timepoints:
        return int(first_timepoints[lesion_id])
    return next((t for t, mask in enumerate(lesion_masks) if mask is not None), 0)


def _measure_series(
    lesion_id: int, images: list[ImageVolume], lesion_masks: Sequence[np.ndarray | None], intensity_unit: str
) -> list[LesionMeasurement | None]:
    if len(lesion_masks) != len(images):
        raise ReportError(
            f"Lesion {lesion_id} has {len(lesion_masks)} masks for {len(images)} timepoints; "
            "give one per timepoint (None where it was not segmented)."
        )
    measurements = []
    for t, (image, mask) in enumerate(zip(images, lesion_masks)):
        try:
            measurements.append(None if mask is None else measure_lesion(image, mask, intensity_unit))
        except LesionLocatorError as error:
            raise ReportError(f"Lesion {lesion_id}, timepoint {t}: {error}") from error
    return measurements
