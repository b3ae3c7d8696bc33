"""Change over time and RECIST 1.1 target-lesion response.

Conventions:
- Timepoint 0 is the baseline. Lesions first prompted at timepoint 0 and found there are the target lesions;
  lesions first prompted at a follow-up are new lesions (RECIST: progression).
- A lesion's RECIST diameter is its long axis, or its short axis when it is a lymph node.
- `LesionSeries.measurements[t]` is None when the lesion was not segmented at timepoint t; a measurement
  with `found=False` means the segmentation came back empty. Either makes the timepoint not evaluable,
  unless the timepoint is listed in `confirmed_absent` (a reader confirmed the lesion disappeared: 0 mm).
- Nadir: the smallest evaluable sum of diameters before the timepoint (baseline included), as RECIST 1.1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from .errors import LesionLocatorError
from .measurements import LesionMeasurement

PR_FRACTION = -0.30  # partial response: sum <= baseline - 30 %
PD_FRACTION = 0.20  # progression: sum >= nadir + 20 % ...
PD_ABSOLUTE_MM = 5.0  # ... and at least 5 mm more
NODE_NORMAL_SHORT_AXIS_MM = 10.0  # a lymph node below this short axis counts as normal (CR)
_TOLERANCE = 1e-9  # so that exactly -30 % / +20 % / 5 mm meet their thresholds despite rounding

BASELINE, CR, PR, SD, PD, NE = "BL", "CR", "PR", "SD", "PD", "NE"
CATEGORY_NAMES = {
    BASELINE: "Baseline",
    CR: "Complete response",
    PR: "Partial response",
    SD: "Stable disease",
    PD: "Progressive disease",
    NE: "Not evaluable",
}


class ResponseError(LesionLocatorError, ValueError):
    """Lesion series and timepoints do not fit together."""


@dataclass(frozen=True)
class TimepointInfo:
    index: int
    name: str
    study_date: str | None = None


@dataclass
class LesionSeries:
    """One lesion over all timepoints (`measurements[t]` for timepoint index t)."""

    lesion_id: int
    name: str
    is_lymph_node: bool
    first_timepoint: int
    measurements: list[LesionMeasurement | None]
    confirmed_absent: frozenset[int] = field(default_factory=frozenset)

    def status(self, timepoint: int) -> str:
        """'found', 'absent' (confirmed gone), 'not found' (empty mask), 'not segmented' or 'not yet present'."""
        if timepoint < self.first_timepoint:
            return "not yet present"
        if timepoint in self.confirmed_absent:
            return "absent"
        measurement = self.measurements[timepoint]
        if measurement is None:
            return "not segmented"
        return "found" if measurement.found else "not found"

    def diameter_mm(self, timepoint: int) -> float | None:
        """RECIST diameter (short axis for a lymph node, long axis otherwise); 0 when confirmed absent."""
        status = self.status(timepoint)
        if status == "absent":
            return 0.0
        if status != "found":
            return None
        measurement = self.measurements[timepoint]
        return measurement.short_axis_mm if self.is_lymph_node else measurement.long_axis_mm

    def volume_ml(self, timepoint: int) -> float | None:
        status = self.status(timepoint)
        if status == "absent":
            return 0.0
        return self.measurements[timepoint].volume_ml if status == "found" else None


@dataclass(frozen=True)
class Change:
    """A value at one timepoint and its change against the baseline and the nadir (None when undefined)."""

    value: float | None
    baseline: float | None
    nadir: float | None
    change_from_baseline: float | None
    change_from_baseline_pct: float | None
    change_from_nadir: float | None
    change_from_nadir_pct: float | None


@dataclass(frozen=True)
class LesionChange:
    lesion_id: int
    timepoint: int
    status: str
    volume_ml: Change
    diameter_mm: Change


@dataclass(frozen=True)
class TimepointResponse:
    timepoint: TimepointInfo
    category: str
    reason: str
    sum_diameters: Change  # over the target lesions measured at this timepoint
    sum_is_complete: bool  # every target lesion measured (or confirmed absent)
    new_lesion_ids: tuple[int, ...]
    missing_target_ids: tuple[int, ...]


@dataclass(frozen=True)
class ResponseTable:
    timepoints: list[TimepointResponse]
    lesions: list[LesionChange]
    target_ids: tuple[int, ...]
    new_lesion_ids: tuple[int, ...]
    excluded_ids: tuple[int, ...]  # prompted at baseline but not found there: cannot be targets
    notes: list[str]

    def lesion_changes(self, lesion_id: int) -> list[LesionChange]:
        return [change for change in self.lesions if change.lesion_id == lesion_id]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_response(series: list[LesionSeries], timepoints: Sequence[TimepointInfo]) -> ResponseTable:
    """Per-lesion changes and the RECIST 1.1 category at every follow-up."""
    _validate(series, timepoints)
    targets = [s for s in series if s.first_timepoint == 0 and s.status(0) == "found"]
    excluded = [s for s in series if s.first_timepoint == 0 and s.status(0) != "found"]
    new = [s for s in series if s.first_timepoint > 0]
    notes = [
        f"{s.name} (id {s.lesion_id}) was {s.status(0)} at baseline and is not used as a target lesion."
        for s in excluded
    ]
    if not targets:
        notes.append("No target lesion was measured at baseline: follow-ups are evaluable only for new lesions.")
    sums = _sum_changes(targets, len(timepoints))
    return ResponseTable(
        timepoints=[_timepoint_response(info, targets, new, sums) for info in timepoints],
        lesions=[change for s in series for change in _lesion_changes(s, len(timepoints))],
        target_ids=tuple(s.lesion_id for s in targets),
        new_lesion_ids=tuple(s.lesion_id for s in new),
        excluded_ids=tuple(s.lesion_id for s in excluded),
        notes=notes,
    )


def _validate(series: list[LesionSeries], timepoints: Sequence[TimepointInfo]) -> None:
    if [t.index for t in timepoints] != list(range(len(timepoints))):
        raise ResponseError("Timepoints must be given in order with indices 0, 1, 2, ... (0 = baseline).")
    ids = [s.lesion_id for s in series]
    if len(set(ids)) != len(ids):
        raise ResponseError(f"Lesion ids must be unique; got {sorted(ids)}.")
    for s in series:
        if len(s.measurements) != len(timepoints):
            raise ResponseError(
                f"Lesion {s.lesion_id} has {len(s.measurements)} measurements for {len(timepoints)} timepoints; "
                "give one entry per timepoint (None where it was not segmented)."
            )
        if not 0 <= s.first_timepoint < len(timepoints):
            raise ResponseError(f"Lesion {s.lesion_id}: first timepoint {s.first_timepoint} is not a timepoint index.")
        if any(not 0 <= t < len(timepoints) for t in s.confirmed_absent):
            raise ResponseError(
                f"Lesion {s.lesion_id}: confirmed-absent timepoints {sorted(s.confirmed_absent)} must be timepoint "
                f"indices 0-{len(timepoints) - 1}."
            )


# --- changes -------------------------------------------------------------------------------------------------
_NO_CHANGE = Change(None, None, None, None, None, None, None)


def _changes(values: list[float | None]) -> list[Change]:
    """Change of each value against the first one and against the smallest earlier one (None = missing)."""
    baseline = values[0] if values else None
    changes, nadir = [], None
    for value in values:
        changes.append(
            Change(
                value=value,
                baseline=baseline,
                nadir=nadir,
                change_from_baseline=_difference(value, baseline),
                change_from_baseline_pct=_percent(value, baseline),
                change_from_nadir=_difference(value, nadir),
                change_from_nadir_pct=_percent(value, nadir),
            )
        )
        if value is not None:
            nadir = value if nadir is None else min(nadir, value)
    return changes


def _difference(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def _percent(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / reference


def _lesion_changes(series: LesionSeries, n_timepoints: int) -> list[LesionChange]:
    present = range(series.first_timepoint, n_timepoints)
    volumes = _changes([series.volume_ml(t) for t in present])
    diameters = _changes([series.diameter_mm(t) for t in present])
    before = [
        LesionChange(series.lesion_id, t, series.status(t), _NO_CHANGE, _NO_CHANGE)
        for t in range(series.first_timepoint)
    ]
    return before + [
        LesionChange(series.lesion_id, t, series.status(t), volume, diameter)
        for t, volume, diameter in zip(present, volumes, diameters)
    ]


def _sum_changes(targets: list[LesionSeries], n_timepoints: int) -> list[tuple[Change, bool]]:
    """Sum of target diameters per timepoint, its changes (nadir from complete sums only), completeness."""
    complete_sums, partial_sums = [], []
    for t in range(n_timepoints):
        diameters = [s.diameter_mm(t) for s in targets]
        known = [d for d in diameters if d is not None]
        partial_sums.append(sum(known) if targets else None)
        complete_sums.append(sum(known) if len(known) == len(diameters) and targets else None)
    reference = _changes(complete_sums)
    return [
        (
            Change(
                value=value,
                baseline=ref.baseline,
                nadir=ref.nadir,
                change_from_baseline=_difference(value, ref.baseline),
                change_from_baseline_pct=_percent(value, ref.baseline),
                change_from_nadir=_difference(value, ref.nadir),
                change_from_nadir_pct=_percent(value, ref.nadir),
            ),
            complete is not None,
        )
        for value, complete, ref in zip(partial_sums, complete_sums, reference)
    ]


# --- RECIST category -----------------------------------------------------------------------------------------
def _timepoint_response(
    info: TimepointInfo,
    targets: list[LesionSeries],
    new: list[LesionSeries],
    sums: list[tuple[Change, bool]],
) -> TimepointResponse:
    t = info.index
    sum_change, complete = sums[t]
    new_ids = tuple(
        s.lesion_id for s in new if t == s.first_timepoint or (t > s.first_timepoint and s.status(t) == "found")
    )
    missing = tuple(s.lesion_id for s in targets if s.diameter_mm(t) is None)
    category, reason = _category(t, targets, sum_change, complete, new_ids, missing)
    return TimepointResponse(info, category, reason, sum_change, complete, new_ids, missing)


def _category(
    t: int,
    targets: list[LesionSeries],
    sum_change: Change,
    complete: bool,
    new_ids: tuple[int, ...],
    missing: tuple[int, ...],
) -> tuple[str, str]:
    if t == 0:
        return BASELINE, "baseline"
    if new_ids:
        return PD, f"new lesion(s): {', '.join(map(str, new_ids))}"
    # With targets missing the measured sum is a lower bound of the true one, so it can still prove progression.
    if _is_progression(sum_change):
        return PD, (
            f"sum {sum_change.value:.1f} mm is {sum_change.change_from_nadir:+.1f} mm "
            f"({_format_pct(sum_change.change_from_nadir_pct)}) from the nadir {sum_change.nadir:.1f} mm"
        )
    if not targets:
        return NE, "no target lesion"
    if not complete:
        return NE, f"target lesion(s) not measured: {', '.join(map(str, missing))}"
    if _is_complete_response(t, targets):
        return CR, "all non-nodal targets gone, all nodal targets < 10 mm short axis"
    from_baseline_pct = sum_change.change_from_baseline_pct
    if from_baseline_pct is not None and from_baseline_pct <= 100 * PR_FRACTION + _TOLERANCE:
        return PR, f"sum {_format_pct(from_baseline_pct)} from baseline"
    return SD, "neither partial response nor progression"


def _is_progression(sum_change: Change) -> bool:
    increase = sum_change.change_from_nadir
    if increase is None or increase < PD_ABSOLUTE_MM - _TOLERANCE:
        return False
    # A nadir of 0 (after a complete response) makes any 5 mm increase a progression.
    return sum_change.nadir == 0 or increase / sum_change.nadir >= PD_FRACTION - _TOLERANCE


def _is_complete_response(t: int, targets: list[LesionSeries]) -> bool:
    return all(
        s.diameter_mm(t) < NODE_NORMAL_SHORT_AXIS_MM if s.is_lymph_node else s.diameter_mm(t) == 0 for s in targets
    )


def _format_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"
