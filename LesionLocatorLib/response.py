"""Change over time and RECIST 1.1 response.

Conventions:
- Timepoint 0 is the baseline. Lesions first prompted at a follow-up are new lesions (RECIST: progression).
- Lesions first prompted at timepoint 0 and found there are measurable or not by RECIST 1.1: a non-nodal
  lesion needs a long axis of at least 10 mm, a lymph node a short axis of at least 15 mm. Up to five
  measurable lesions, the largest first, are the target lesions; the others found at baseline are
  non-target lesions (RECIST's limit of two targets per organ needs organs, which are not known here: a note
  says so when it could matter).
- A lesion's RECIST diameter is the sum of the long axes of its parts (one part: its long axis; RECIST adds
  the fragments of a lesion that broke up), or its largest short axis when it is a lymph node.
- `LesionSeries.measurements[t]` is None when the lesion was not segmented at timepoint t; a measurement
  with `found=False` means the segmentation came back empty. Either makes the lesion not evaluated at t,
  unless the timepoint is listed in `confirmed_absent` (a reader confirmed the lesion disappeared: 0 mm).
- Nadir: the smallest complete sum of target diameters before the timepoint (baseline included).
- The response at a follow-up combines the target lesions' response with the non-target lesions' as RECIST
  1.1's tables 4 and 5 do. Unequivocal progression of non-target lesions is a reader's judgement and is not
  assessed; a non-nodal lesion that comes back after a complete response is progression.
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
MEASURABLE_LONG_AXIS_MM = 10.0  # a non-nodal lesion shorter than this is not measurable (a non-target)
MEASURABLE_NODE_SHORT_AXIS_MM = 15.0  # a lymph node thinner than this is not a target
MAX_TARGETS = 5
_TOLERANCE = 1e-9  # so that exactly -30 % / +20 % / 5 mm meet their thresholds despite rounding

BASELINE, CR, PR, SD, PD, NE, NON_CR_NON_PD = "BL", "CR", "PR", "SD", "PD", "NE", "NN"
CATEGORY_NAMES = {
    BASELINE: "Baseline",
    CR: "Complete response",
    PR: "Partial response",
    SD: "Stable disease",
    PD: "Progressive disease",
    NE: "Not evaluable",
    NON_CR_NON_PD: "Non-CR/non-PD",
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
        """RECIST diameter (largest short axis for a lymph node, the parts' long axes summed otherwise); 0 when
        confirmed absent."""
        status = self.status(timepoint)
        if status == "absent":
            return 0.0
        if status != "found":
            return None
        measurement = self.measurements[timepoint]
        return measurement.largest_short_axis_mm if self.is_lymph_node else measurement.parts_long_axis_sum_mm

    def is_gone(self, timepoint: int) -> bool:
        """Confirmed absent, or a lymph node back to normal size: what a complete response asks of every lesion."""
        diameter = self.diameter_mm(timepoint)
        if self.is_lymph_node:
            return diameter is not None and diameter < NODE_NORMAL_SHORT_AXIS_MM - _TOLERANCE
        return self.status(timepoint) == "absent"

    def is_present(self, timepoint: int) -> bool:
        """Measured and not gone."""
        return self.status(timepoint) == "found" and not self.is_gone(timepoint)

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
    non_target_ids: tuple[int, ...]  # found at baseline, not measurable or beyond the five largest
    new_lesion_ids: tuple[int, ...]
    excluded_ids: tuple[int, ...]  # prompted at baseline but not found there, or normal-size nodes: not followed
    notes: list[str]

    def lesion_changes(self, lesion_id: int) -> list[LesionChange]:
        return [change for change in self.lesions if change.lesion_id == lesion_id]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_response(series: list[LesionSeries], timepoints: Sequence[TimepointInfo]) -> ResponseTable:
    """Per-lesion changes and the RECIST 1.1 category at every follow-up."""
    _validate(series, timepoints)
    at_baseline = [s for s in series if s.first_timepoint == 0]
    found = [s for s in at_baseline if s.status(0) == "found"]
    # RECIST 1.1 does not count a node under 10 mm short axis as a lesion at all.
    normal_nodes = [s for s in found if s.is_gone(0)]
    lesions = [s for s in found if not s.is_gone(0)]
    not_found = [s for s in at_baseline if s.status(0) != "found"]
    new = [s for s in series if s.first_timepoint > 0]
    targets, non_targets, selection_notes = _select_targets(lesions)
    notes = _excluded_notes(not_found, normal_nodes) + selection_notes
    if not lesions:
        notes.append("No lesion was found at baseline: follow-ups are evaluable only for new lesions.")
    sums = _sum_changes(targets, len(timepoints))
    responses: list[TimepointResponse] = []
    for info in timepoints:
        responses.append(_timepoint_response(info, targets, non_targets, new, sums[info.index], responses))
    return ResponseTable(
        timepoints=responses,
        lesions=[change for s in series for change in _lesion_changes(s, len(timepoints))],
        target_ids=tuple(s.lesion_id for s in targets),
        non_target_ids=tuple(s.lesion_id for s in non_targets),
        new_lesion_ids=tuple(s.lesion_id for s in new),
        excluded_ids=tuple(s.lesion_id for s in not_found + normal_nodes),
        notes=notes,
    )


def _excluded_notes(not_found: list[LesionSeries], normal_nodes: list[LesionSeries]) -> list[str]:
    return [
        f"{s.name} (id {s.lesion_id}) was {s.status(0)} at baseline and is neither a target nor a non-target lesion."
        for s in not_found
    ] + [
        f"{s.name} (id {s.lesion_id}) is a lymph node of {s.diameter_mm(0):.1f} mm short axis at baseline, under "
        f"{NODE_NORMAL_SHORT_AXIS_MM:.0f} mm: a normal-size node is not a lesion for RECIST 1.1 and is not followed."
        for s in normal_nodes
    ]


def _select_targets(found: list[LesionSeries]) -> tuple[list[LesionSeries], list[LesionSeries], list[str]]:
    """Target and non-target lesions among those found at baseline (in their given order), and notes why."""
    measurable = [s for s in found if s.diameter_mm(0) >= _measurable_minimum_mm(s) - _TOLERANCE]
    largest = sorted(measurable, key=lambda s: -s.diameter_mm(0))[:MAX_TARGETS]
    target_ids = {s.lesion_id for s in largest}
    measurable_ids = {s.lesion_id for s in measurable}
    notes = [_not_measurable_note(s) for s in found if s.lesion_id not in measurable_ids]
    if len(measurable) > MAX_TARGETS:
        notes.append(
            f"{len(measurable)} lesions are measurable at baseline; RECIST 1.1 takes at most {MAX_TARGETS} target "
            f"lesions, so the {MAX_TARGETS} largest are targets and the others non-target lesions. Check the choice: "
            "RECIST also takes at most 2 targets per organ, and organs are not known here."
        )
    elif len(target_ids) > 2:
        notes.append("RECIST 1.1 takes at most 2 target lesions per organ; organs are not known here, so check this.")
    return (
        [s for s in found if s.lesion_id in target_ids],
        [s for s in found if s.lesion_id not in target_ids],
        notes,
    )


def _measurable_minimum_mm(series: LesionSeries) -> float:
    return MEASURABLE_NODE_SHORT_AXIS_MM if series.is_lymph_node else MEASURABLE_LONG_AXIS_MM


def _not_measurable_note(series: LesionSeries) -> str:
    diameter = series.diameter_mm(0)
    if series.is_lymph_node:
        return (
            f"{series.name} (id {series.lesion_id}) is a lymph node of {diameter:.1f} mm short axis at baseline, under "
            f"{MEASURABLE_NODE_SHORT_AXIS_MM:.0f} mm: a pathological node but not a target, a non-target lesion."
        )
    return (
        f"{series.name} (id {series.lesion_id}) measures {diameter:.1f} mm at baseline, under "
        f"{MEASURABLE_LONG_AXIS_MM:.0f} mm: not measurable by RECIST 1.1, a non-target lesion."
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
    """Sum of target diameters per timepoint, whether it is complete, and its changes.

    The nadir comes from complete sums only. A partial sum (a target not measured) keeps its value, baseline and
    nadir but has no changes: it would compare fewer lesions with more.
    """
    complete_sums, partial_sums = [], []
    for t in range(n_timepoints):
        diameters = [s.diameter_mm(t) for s in targets]
        known = [d for d in diameters if d is not None]
        partial_sums.append(sum(known) if targets else None)
        complete_sums.append(sum(known) if len(known) == len(diameters) and targets else None)
    return [
        (reference if complete is not None else Change(value, reference.baseline, reference.nadir, *[None] * 4),
         complete is not None)
        for value, complete, reference in zip(partial_sums, complete_sums, _changes(complete_sums))
    ]


# --- RECIST category -----------------------------------------------------------------------------------------
def _timepoint_response(
    info: TimepointInfo,
    targets: list[LesionSeries],
    non_targets: list[LesionSeries],
    new: list[LesionSeries],
    target_sum: tuple[Change, bool],
    earlier: list[TimepointResponse],
) -> TimepointResponse:
    t = info.index
    sum_change, complete = target_sum
    # A new lesion stays new until a reader confirms it is gone: losing track of it does not undo progression.
    new_ids = tuple(s.lesion_id for s in new if t >= s.first_timepoint and s.status(t) != "absent")
    missing = tuple(s.lesion_id for s in targets if s.diameter_mm(t) is None)
    if t == 0:
        category, reason = BASELINE, "baseline"
    else:
        category, reason = _category(t, targets, non_targets, new, sum_change, complete, new_ids, missing, earlier)
    return TimepointResponse(info, category, reason, sum_change, complete, new_ids, missing)


def _category(
    t: int,
    targets: list[LesionSeries],
    non_targets: list[LesionSeries],
    new: list[LesionSeries],
    sum_change: Change,
    complete: bool,
    new_ids: tuple[int, ...],
    missing: tuple[int, ...],
    earlier: list[TimepointResponse],
) -> tuple[str, str]:
    if new_ids:
        unmeasured = [s.lesion_id for s in new if s.lesion_id in new_ids and s.status(t) != "found"]
        detail = f" ({_ids(unmeasured)} not measured here and not confirmed absent)" if unmeasured else ""
        return PD, f"new lesion(s): {_ids(new_ids)}{detail}"
    # With targets missing the measured sum is a lower bound of the true one, so it can still prove progression.
    if _is_progression(sum_change.value, sum_change.nadir):
        measured = "sum" if complete else "the measured target lesions alone sum"
        increase = sum_change.value - sum_change.nadir
        percent = _percent(sum_change.value, sum_change.nadir)
        return PD, (
            f"{measured} {sum_change.value:.1f} mm, {increase:+.1f} mm ({_format_pct(percent)}) from the nadir "
            f"{sum_change.nadir:.1f} mm"
        )
    # A node growing back past 10 mm is judged by the sum like any target; a non-nodal lesion that reappears after
    # a complete response is progression (RECIST 1.1 FAQ).
    back = [s.lesion_id for s in targets + non_targets if not s.is_lymph_node and s.status(t) == "found"]
    if back and _last_evaluated_category(earlier) == CR:
        return PD, f"lesion(s) {_ids(back)} came back after the complete response"
    non_target_state = _non_target_state(t, non_targets)
    if not targets:
        return _non_target_only_category(non_targets, non_target_state)
    if not complete:
        return NE, f"target lesion(s) not measured: {_ids(missing)}"
    if all(s.is_gone(t) for s in targets):
        if non_target_state == "gone":
            return CR, "all lesions gone (lymph nodes under 10 mm short axis)"
        return PR, f"all target lesions gone, but non-target lesion(s) {non_target_state}"
    from_baseline_pct = sum_change.change_from_baseline_pct
    if from_baseline_pct is not None and from_baseline_pct <= 100 * PR_FRACTION + _TOLERANCE:
        return PR, f"sum {_format_pct(from_baseline_pct)} from baseline"
    return SD, "neither partial response nor progression"


def _non_target_state(t: int, non_targets: list[LesionSeries]) -> str:
    """'gone' (all of them, or none), 'present: <ids>' or 'not evaluated: <ids>' (none present)."""
    present = [s.lesion_id for s in non_targets if s.is_present(t)]
    if present:
        return f"present: {_ids(present)}"
    unknown = [s.lesion_id for s in non_targets if not s.is_gone(t)]
    return f"not evaluated: {_ids(unknown)}" if unknown else "gone"


def _non_target_only_category(non_targets: list[LesionSeries], state: str) -> tuple[str, str]:
    """RECIST 1.1 table 5: no target lesion at baseline."""
    if not non_targets:
        return NE, "no lesion was found at baseline"
    if state == "gone":
        return CR, "all non-target lesions gone (no target lesion at baseline)"
    if state.startswith("present"):
        return NON_CR_NON_PD, f"no target lesion at baseline; non-target lesion(s) {state}"
    return NE, f"no target lesion at baseline; non-target lesion(s) {state}"


def _last_evaluated_category(earlier: list[TimepointResponse]) -> str | None:
    categories = [row.category for row in earlier if row.category not in (BASELINE, NE)]
    return categories[-1] if categories else None


def _is_progression(value: float | None, nadir: float | None) -> bool:
    if value is None or nadir is None or value - nadir < PD_ABSOLUTE_MM - _TOLERANCE:
        return False
    # A nadir of 0 (all non-nodal targets gone) makes any 5 mm increase a progression.
    return nadir == 0 or (value - nadir) / nadir >= PD_FRACTION - _TOLERANCE


def _ids(ids) -> str:
    return ", ".join(map(str, ids))


def _format_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"
