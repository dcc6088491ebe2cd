"""Schedules are pure functions: checked against literal tables."""
from __future__ import annotations

import pytest

from mmpipe.dsl.schedule import Action, bubble, gpipe, grid, loop_reentry, streaming, theory_bubble


def cells(table):
    return [[None if a is None else str(a) for a in row] for row in table]


def test_streaming_literal_table():
    assert cells(streaming(3, 4)) == [
        ["0", None, None],
        ["1", "0", None],
        ["2", "1", "0"],
        ["3", "2", "1"],
        [None, "3", "2"],
        [None, None, "3"],
    ]


def test_gpipe_flushes_between_batches():
    assert cells(gpipe(2, 2, batches=2)) == [
        ["0", None], ["1", "0"], [None, "1"],
        ["2", None], ["3", "2"], [None, "3"],
    ]


def test_bubble_matches_gpipe_theory():
    for p, m in [(2, 1), (4, 4), (8, 16), (3, 7)]:
        assert bubble(streaming(p, m)) == pytest.approx(theory_bubble(p, m))


def test_loop_reentry_literal_table():
    # 2 body stages, micro-batches with 2, 1 and 3 trips, 2 in flight:
    # mb 2 joins when mb 1 leaves.
    assert cells(loop_reentry(2, [2, 1, 3], inflight=2)) == [
        ["0", None],
        ["1", "0"],
        ["0.1", "1"],
        ["2", "0.1"],
        [None, "2"],
        ["2.1", None],
        [None, "2.1"],
        ["2.2", None],
        [None, "2.2"],
    ]


def test_loop_with_enough_inflight_keeps_stages_busy():
    table = loop_reentry(4, [5] * 8, inflight=4)
    # after the fill, every stage works every step while 4 micro-batches circulate
    steady = table[3:-3]
    assert all(a is not None for row in steady[: 5 * 4 - 3] for a in row)


def test_loop_with_one_inflight_serialises():
    table = loop_reentry(3, [2, 2], inflight=1)
    assert all(sum(a is not None for a in row) == 1 for row in table)
    assert len(table) == 12


def test_grid_marks_failing_cell():
    text = grid(streaming(2, 2), mark=(1, 1))
    assert "!0!" in text and text.splitlines()[2].startswith("stage 0")


def test_invalid_arguments():
    with pytest.raises(ValueError):
        streaming(0, 3)
    with pytest.raises(ValueError):
        loop_reentry(2, [0], 1)
    assert Action(3, 1) < Action(4)
