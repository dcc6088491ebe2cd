"""Pictures: the run timeline and the profile chart (PNG, matplotlib imported here only).

``timeline_png``: a Gantt chart of the stage copies (rows) against time, as in the
GPipe paper's figure but measured: every compute span a box coloured by its
micro-batch (loop rows: by loop group, one box per iteration, so iterations show),
transfers as thin dark bars under them, and idle time shaded grey with the row's
busy share on the right.

``profile_chart``: per-part seconds per micro-batch (loops: all iterations) as bars,
coloured by node, with the plan's stage cuts drawn as dashed lines and each stage's
total on top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

IDLE = "#e9e9e9"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _row_label(r: dict[str, Any], ranks: bool) -> str:
    copy = f" copy {r['replica']}" if r.get("replica") else ""
    where = f"rank{r.get('rank', 0)}:{r.get('device', '')}" if ranks else str(r.get("device", ""))
    runs = str(r.get("runs", ""))
    runs = runs if len(runs) <= 34 else runs[:31] + "..."
    return f"stage {r['stage']}{copy} @ {where}\n{runs}" + (" [loop]" if r.get("loop") else "")


def timeline_png(data: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Draw ``Recorder.timeline()`` data into ``path`` (see the module docstring)."""
    plt = _plt()
    rows, end = data["rows"], max(float(data.get("end", 0.0)), 1e-6)
    ranks = len({r.get("rank", 0) for r in rows}) > 1
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.62 * max(1, len(rows))))
    busy_all = 0.0
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        ax.broken_barh([(0.0, end)], (y - 0.38, 0.76), facecolors=IDLE, edgecolor="none", zorder=0)
        spans = r["spans"]
        busy = sum(b - a for a, b, *_ in spans)
        busy_all += busy
        loop = bool(r.get("loop"))
        ax.broken_barh([(a, max(b - a, end * 1e-4)) for a, b, *_ in spans], (y - 0.38, 0.76),
                       facecolors=[cmap(int(s[2]) % 20) for s in spans], edgecolor="white" if loop else "none",
                       linewidth=0.6 if loop else 0.0, zorder=2)
        if len(spans) <= 80:
            for a, b, mb, *_ in spans:
                if (b - a) > end / 60:
                    ax.text((a + b) / 2, y, str(mb), ha="center", va="center", fontsize=7, zorder=3)
        xs = r.get("transfers") or []
        if xs:
            ax.broken_barh([(a, max(b - a, end * 1e-4)) for a, b, *_ in xs], (y - 0.45, 0.07), facecolors="#333333", zorder=3)
        ax.text(end * 1.005, y, f"busy {100 * busy / end:.0f}%", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_row_label(r, ranks) for r in reversed(rows)], fontsize=8)
    ax.set_xlim(0, end * 1.08)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("seconds since the first micro-batch started")
    bubble = 1 - busy_all / (len(rows) * end) if rows else 0.0
    ax.set_title((f"{title}: " if title else "") + f"{len(rows)} stage copies, bubble {100 * bubble:.0f}% (grey: idle, dark bars: transfers)\n"
                 "boxes: compute, coloured and numbered by micro-batch (loop rows: by loop group, one box per iteration)", fontsize=9)
    return _save(plt, fig, path)


def timeline_path(trace: str | Path) -> Path:
    """Where the PNG timeline of a Chrome trace goes: ``run.trace.json`` -> ``run.timeline.png``."""
    p = Path(trace)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    stem = stem[: -len(".trace")] if stem.endswith(".trace") else stem
    return p.with_name(stem + ".timeline.png")


def profile_chart(profile: Any, plan: Any | None, path: str | Path) -> Path:
    """Bars of per-part cost with the plan's cuts (see the module docstring)."""
    plt = _plt()

    labels: list[str] = []
    heights: list[float] = []
    colors: list[Any] = []
    where: dict[Any, Any] = {}
    cmap = plt.get_cmap("tab10")
    for n, (name, nc) in enumerate(profile.nodes.items()):
        for k, pc in enumerate(nc.parts):
            where[(name, k)] = len(labels)
            labels.append(f"{name}.{k}" if nc.num_parts > 1 else name)
            heights.append(1000 * pc.time_s * (nc.iterations_per_mb if nc.loop else 1.0))
            colors.append(cmap(n % 10))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.2))
    ax.bar(range(len(labels)), heights, color=colors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("ms per micro-batch (loops: all iterations)")
    top = max(heights, default=1.0) or 1.0
    if plan is not None:
        for st in plan.stages:
            idx = [where[(u.node, p)] for u in st.units for p in range(u.parts[0], u.parts[1]) if (u.node, p) in where]
            if not idx:
                continue
            lo, hi = min(idx), max(idx)
            ax.axvline(hi + 0.5, color="black", linestyle="--", linewidth=0.8)
            total = sum(heights[i] for i in idx)
            copies = len(st.places)
            note = f"stage {st.index}\n{total:.0f} ms" + (f"\nx{copies}" if copies > 1 else "")
            ax.text((lo + hi) / 2, top * 1.02, note, ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top * 1.3)
    k = profile.key
    ax.set_title(f"profile of {k.recipe} ({k.device}, {k.dtype}, micro-batch {k.microbatch_size}, {k.threads} threads); dashed: stage cuts", fontsize=9)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
