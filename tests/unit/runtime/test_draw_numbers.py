"""The numbers the pictures print: each row's busy share, the bubble in the title, the
profile chart's bar heights. (A sampled mutation session showed no test read them.)"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure the drawing code closes, kept for reading."""
    from mmpipe.runtime import draw

    plt = draw._plt()
    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    return kept


def test_timeline_prints_busy_shares_and_the_bubble(tmp_path: Path, figures: list[Any]) -> None:
    from mmpipe.runtime.draw import timeline_png

    data = {"end": 10.0, "rows": [
        {"stage": 0, "replica": 0, "device": "cpu", "spans": [(0.0, 2.0, 0), (3.0, 5.0, 1)]},  # busy 4 of 10 s
        {"stage": 1, "replica": 0, "device": "cpu", "spans": [(2.0, 10.0, 0)]},  # busy 8 of 10 s
    ]}
    timeline_png(data, tmp_path / "t.png", title="x")
    (fig,) = figures
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "busy 40%" in texts and "busy 80%" in texts
    assert "bubble 40%" in ax.get_title()  # 1 - 12 / (2 * 10)


def test_profile_chart_bars_are_milliseconds_per_micro_batch(tmp_path: Path, figures: list[Any]) -> None:
    from mmpipe.runtime.draw import profile_chart

    part = lambda t: SimpleNamespace(time_s=t)  # noqa: E731
    key = SimpleNamespace(recipe="r", device="cpu", dtype="float32", microbatch_size=4, threads=1)
    prof = SimpleNamespace(key=key, nodes={
        "enc": SimpleNamespace(parts=[part(0.002), part(0.003)], num_parts=2, loop=False, iterations_per_mb=1.0),
        "dec": SimpleNamespace(parts=[part(0.001)], num_parts=1, loop=True, iterations_per_mb=5.0),
    })
    profile_chart(prof, None, tmp_path / "p.png")
    heights = [round(p.get_height(), 6) for p in figures[0].axes[0].patches]
    assert heights[:3] == [2.0, 3.0, 5.0]  # ms; a loop part counts all its iterations
    # all-zero bars still get a drawable scale (the stage notes sit above the bars)
    zero = SimpleNamespace(key=key, nodes={"enc": SimpleNamespace(parts=[part(0.0)], num_parts=1, loop=False, iterations_per_mb=1.0)})
    plan = SimpleNamespace(stages=[SimpleNamespace(index=0, units=[SimpleNamespace(node="enc", parts=(0, 1))], places=[0])])
    profile_chart(zero, plan, tmp_path / "z.png")
    assert figures[1].axes[0].get_ylim() == pytest.approx((0.0, 1.3))
