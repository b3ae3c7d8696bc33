"""Changes against baseline/nadir and RECIST 1.1 categories on constructed lesion series."""
from __future__ import annotations

import pytest

from LesionLocatorLib.measurements import LesionMeasurement
from LesionLocatorLib.response import (
    CR,
    NE,
    NON_CR_NON_PD,
    PD,
    PR,
    SD,
    LesionSeries,
    ResponseError,
    TimepointInfo,
    compute_response,
)


def found(
    long_mm: float, short_mm: float | None = None, volume_ml: float = 1.0, *, largest_short_mm: float | None = None,
    parts_long_mm: float | None = None,
) -> LesionMeasurement:
    """A measured lesion in one piece whose largest short axis lies in its long axis' plane, unless told otherwise."""
    short_mm = short_mm or 0.6 * long_mm
    return LesionMeasurement(
        found=True, voxel_count=1, volume_ml=volume_ml, long_axis_mm=long_mm, short_axis_mm=short_mm,
        largest_short_axis_mm=largest_short_mm or short_mm, parts_long_axis_sum_mm=parts_long_mm or long_mm,
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
    # A partial sum is not compared with the complete baseline: fewer lesions would look like shrinkage.
    partial = table.timepoints[1].sum_diameters
    assert partial.value == pytest.approx(29.0) and partial.baseline == pytest.approx(50.0)
    assert partial.change_from_baseline is None and partial.change_from_baseline_pct is None
    assert partial.change_from_nadir is None and partial.change_from_nadir_pct is None


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
    # Even when it comes back smaller than the 5 mm that progression from a nadir needs (RECIST 1.1 FAQ).
    table = compute_response([lesion(1, [found(30), NOT_FOUND, None, found(3)], absent={1})], timepoints(4))
    assert [row.category for row in table.timepoints] == ["BL", CR, NE, PD]
    assert "came back after the complete response" in table.timepoints[3].reason
    # After a partial response a returning lesion only adds to the sum.
    series = [lesion(1, [found(30), NOT_FOUND, found(3)], absent={1}), lesion(2, [found(30), found(20), found(20)])]
    assert categories(series) == ["BL", PR, PR]


def test_a_new_lesion_stays_progression_until_confirmed_absent():
    old = lesion(1, [found(30), found(20), found(20), found(20)])
    new = lesion(2, [None, found(10), NOT_FOUND, None], first=1)
    table = compute_response([old, new], timepoints(4))
    assert [row.category for row in table.timepoints] == ["BL", PD, PD, PD]
    assert "not confirmed absent" in table.timepoints[2].reason
    gone = lesion(2, [None, found(10), NOT_FOUND, None], first=1, absent={2, 3})
    assert categories([old, gone]) == ["BL", PD, PR, PR]


def test_lesions_too_small_to_measure_are_non_targets():
    """RECIST 1.1: non-nodal targets need 10 mm, nodal targets 15 mm short axis; smaller ones are non-targets."""
    normal_node = lesion(1, [found(12, short_mm=8), found(12, short_mm=8)], node=True)
    table = compute_response([normal_node], timepoints(2))
    assert table.target_ids == table.non_target_ids == () and table.excluded_ids == (1,)
    assert table.timepoints[1].category == NE  # an unchanged normal node is not a complete response
    assert "normal-size node is not a lesion" in table.notes[0]
    small = lesion(2, [found(4), found(4)])
    pathological_node = lesion(3, [found(20, short_mm=12), found(20, short_mm=12)], node=True)
    table = compute_response([small, pathological_node], timepoints(2))
    assert table.non_target_ids == (2, 3) and table.timepoints[1].category == NON_CR_NON_PD
    assert "not measurable" in table.notes[0] and "pathological node" in table.notes[1]
    gone = compute_response([lesion(2, [found(4), NOT_FOUND], absent={1})], timepoints(2))
    assert gone.timepoints[1].category == CR
    unknown = compute_response([lesion(2, [found(4), NOT_FOUND])], timepoints(2))
    assert unknown.timepoints[1].category == NE


def test_complete_target_response_with_a_non_target_left_is_partial():
    target = lesion(1, [found(30), NOT_FOUND], absent={1})
    non_target = lesion(2, [found(6), found(6)])
    table = compute_response([target, non_target], timepoints(2))
    assert table.target_ids == (1,) and table.non_target_ids == (2,)
    assert table.timepoints[1].category == PR
    assert "non-target lesion(s) present: 2" in table.timepoints[1].reason
    unmeasured = compute_response([target, lesion(2, [found(6), None])], timepoints(2))
    assert unmeasured.timepoints[1].category == PR
    both_gone = compute_response([target, lesion(2, [found(6), NOT_FOUND], absent={1})], timepoints(2))
    assert both_gone.timepoints[1].category == CR


def test_at_most_five_targets_the_largest():
    series = [lesion(i, [found(10.0 + i), found(10.0 + i)]) for i in range(1, 8)]
    table = compute_response(series, timepoints(2))
    assert table.target_ids == (3, 4, 5, 6, 7) and table.non_target_ids == (1, 2)
    assert "at most 5 target lesions" in table.notes[0] and "per organ" in table.notes[0]
    assert table.timepoints[0].sum_diameters.value == pytest.approx(13 + 14 + 15 + 16 + 17)


def test_recist_diameters_use_the_parts_and_the_largest_short_axis():
    # A lesion that broke into two 9 mm parts: 9 + 9 mm, not the 41 mm its parts span together (PR, not SD).
    fragmented = lesion(1, [found(40), found(41, parts_long_mm=18)])
    table = compute_response([fragmented], timepoints(2))
    assert table.timepoints[1].sum_diameters.value == pytest.approx(18.0)
    assert table.timepoints[1].category == PR
    # A node thickest away from its longest slice: its largest short axis counts.
    thick = found(31, short_mm=9, largest_short_mm=19)
    node = lesion(2, [thick, thick], node=True)
    table = compute_response([node], timepoints(2))
    assert table.target_ids == (2,) and table.timepoints[1].category == SD
    assert table.lesion_changes(2)[1].diameter_mm.value == pytest.approx(19.0)


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
