"""Changes against baseline/nadir and RECIST 1.1 categories on constructed lesion series."""
from __future__ import annotations

import pytest

from LesionLocatorLib.measurements import LesionMeasurement
from LesionLocatorLib.response import (
    CR,
    NE,
    PD,
    PR,
    SD,
    LesionSeries,
    ResponseError,
    TimepointInfo,
    compute_response,
)


def found(long_mm: float, short_mm: float | None = None, volume_ml: float = 1.0) -> LesionMeasurement:
    return LesionMeasurement(
        found=True, voxel_count=1, volume_ml=volume_ml, long_axis_mm=long_mm, short_axis_mm=short_mm or 0.6 * long_mm
    )


NOT_FOUND = LesionMeasurement.not_found()


def lesion(lesion_id, measurements, first=0, node=False, absent=()) -> LesionSeries:
    return LesionSeries(lesion_id, f"Lesion {lesion_id}", node, first, list(measurements), frozenset(absent))


def timepoints(n: int) -> list[TimepointInfo]:
    return [TimepointInfo(t, f"tp{t}") for t in range(n)]


def categories(series: list[LesionSeries]) -> list[str]:
    n = len(series[0].measurements)
    return [row.category for row in compute_response(series, timepoints(n)).timepoints]


def test_partial_response_at_minus_30_percent_of_baseline():
    series = [lesion(1, [found(60), found(42), found(42.1)]), lesion(2, [found(40), found(28), found(28)])]
    table = compute_response(series, timepoints(3))
    assert [row.category for row in table.timepoints] == ["BL", PR, SD]
    assert table.timepoints[1].sum_diameters.change_from_baseline_pct == pytest.approx(-30.0)
    assert table.timepoints[1].sum_diameters.change_from_baseline == pytest.approx(-30.0)


def test_progression_needs_20_percent_and_5_mm_over_the_nadir():
    # Nadir 30 mm at tp1: tp2 +6 mm (+20 %) is PD; a slightly smaller growth is SD.
    assert categories([lesion(1, [found(50), found(30), found(36)])]) == ["BL", PR, PD]
    assert categories([lesion(1, [found(50), found(30), found(35.9)])]) == ["BL", PR, SD]
    table = compute_response([lesion(1, [found(50), found(30), found(36)])], timepoints(3))
    assert table.timepoints[2].sum_diameters.nadir == 30
    assert table.timepoints[2].sum_diameters.change_from_nadir_pct == pytest.approx(20.0)


def test_twenty_percent_but_less_than_5_mm_is_stable():
    series = [lesion(1, [found(20), found(24)])]
    table = compute_response(series, timepoints(2))
    assert table.timepoints[1].sum_diameters.change_from_nadir_pct == pytest.approx(20.0)
    assert table.timepoints[1].category == SD


def test_complete_response_needs_non_nodal_targets_gone_and_nodes_below_10_mm():
    tumour = lesion(1, [found(30), NOT_FOUND, NOT_FOUND], absent={1, 2})
    small_node = lesion(2, [found(25, short_mm=18), found(14, short_mm=9.5), found(16, short_mm=10.0)], node=True)
    table = compute_response([tumour, small_node], timepoints(3))
    assert [row.category for row in table.timepoints] == ["BL", CR, PR]
    # The node counts with its short axis: 30 + 18 at baseline, 0 + 9.5 at tp1.
    assert table.timepoints[0].sum_diameters.value == pytest.approx(48.0)
    assert table.timepoints[1].sum_diameters.value == pytest.approx(9.5)


def test_not_found_or_not_segmented_target_is_not_evaluable():
    assert categories([lesion(1, [found(30), found(29)]), lesion(2, [found(20), NOT_FOUND])]) == ["BL", NE]
    table = compute_response([lesion(1, [found(30), found(29)]), lesion(2, [found(20), None])], timepoints(2))
    assert table.timepoints[1].category == NE
    assert table.timepoints[1].missing_target_ids == (2,)
    assert not table.timepoints[1].sum_is_complete


def test_progression_is_proven_even_with_a_missing_target():
    # The measured target alone exceeds the nadir (50 mm) by 15 mm: the missing one can only add to that.
    table = compute_response([lesion(1, [found(30), found(65)]), lesion(2, [found(20), None])], timepoints(2))
    assert table.timepoints[1].category == PD
    not_proven = compute_response([lesion(1, [found(30), found(40)]), lesion(2, [found(20), None])], timepoints(2))
    assert not_proven.timepoints[1].category == NE


def test_new_lesion_is_progression():
    old = lesion(1, [found(30), found(20), found(20)])
    new = lesion(2, [None, None, found(8)], first=2)
    table = compute_response([old, new], timepoints(3))
    assert [row.category for row in table.timepoints] == ["BL", PR, PD]
    assert table.new_lesion_ids == (2,)
    assert table.timepoints[2].new_lesion_ids == (2,)
    # New lesions are not part of the sum of target diameters.
    assert table.timepoints[2].sum_diameters.value == pytest.approx(20.0)


def test_reappearance_after_complete_response_is_progression():
    series = [lesion(1, [found(12), NOT_FOUND, found(6)], absent={1})]
    assert categories(series) == ["BL", CR, PD]


def test_lesion_changes_against_baseline_and_nadir():
    series = [lesion(1, [found(20, volume_ml=4.0), found(10, volume_ml=1.0), None, found(15, volume_ml=2.0)])]
    table = compute_response(series, timepoints(4))
    changes = table.lesion_changes(1)
    assert [c.status for c in changes] == ["found", "found", "not segmented", "found"]
    last = changes[3]
    assert last.diameter_mm.change_from_baseline == pytest.approx(-5.0)
    assert last.diameter_mm.change_from_baseline_pct == pytest.approx(-25.0)
    assert last.diameter_mm.change_from_nadir == pytest.approx(5.0)
    assert last.diameter_mm.change_from_nadir_pct == pytest.approx(50.0)
    assert last.volume_ml.change_from_baseline_pct == pytest.approx(-50.0)
    assert last.volume_ml.change_from_nadir_pct == pytest.approx(100.0)
    assert changes[2].volume_ml.value is None


def test_lymph_node_changes_use_the_short_axis():
    node = lesion(1, [found(30, short_mm=15), found(28, short_mm=12)], node=True)
    change = compute_response([node], timepoints(2)).lesion_changes(1)[1]
    assert change.diameter_mm.value == 12
    assert change.diameter_mm.change_from_baseline_pct == pytest.approx(-20.0)


def test_target_not_found_at_baseline_is_excluded_with_a_note():
    series = [lesion(1, [found(30), found(20)]), lesion(2, [NOT_FOUND, found(10)])]
    table = compute_response(series, timepoints(2))
    assert table.target_ids == (1,) and table.excluded_ids == (2,)
    assert table.timepoints[1].category == PR
    assert "Lesion 2" in table.notes[0]


def test_inconsistent_series_are_refused():
    with pytest.raises(ResponseError, match="one entry per timepoint"):
        compute_response([lesion(1, [found(10)])], timepoints(2))
    with pytest.raises(ResponseError, match="unique"):
        compute_response([lesion(1, [found(10)]), lesion(1, [found(10)])], timepoints(1))
    with pytest.raises(ResponseError, match="confirmed-absent"):
        compute_response([lesion(1, [found(10), found(10)], absent={5})], timepoints(2))
