"""Token ids -> text and segments, and stitching the windows of long audio back together.

Each 30 s window of a request is decoded as its own item. Windows cut at a
pause do not overlap and are joined in order; windows that had to be cut
inside speech overlap by a few seconds and are merged on words the way
``transformers``' chunked ASR pipeline merges tokens (longest matching
alignment of the overlap, cut in its middle). Per-window values carry what
the merge needs as attributes (``WindowText``/``WindowSegments``), because
``gather`` sees one port at a time. No torch import here.
"""
from __future__ import annotations

import re
from typing import Any

TIME_STEP = 0.02  # seconds per timestamp token


class WindowText(str):
    """A window's text; ``overlap`` > 0 when it shares audio with the previous window."""

    overlap: float = 0.0

    def __new__(cls, text: str, overlap: float = 0.0) -> "WindowText":
        obj = super().__new__(cls, text)
        obj.overlap = overlap
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # keep the attribute across processes
        return (WindowText, (str(self), self.overlap))


class WindowSegments(list):
    """A window's segments (absolute times), the time range it owns, its overlap with the
    previous window, and whether the times come from timestamp tokens."""

    def __init__(self, segments: list[dict[str, Any]], keep: tuple[float, float], overlap: float = 0.0, timed: bool = False) -> None:
        super().__init__(segments)
        self.keep, self.overlap, self.timed = keep, overlap, timed

    def __reduce__(self) -> tuple[Any, ...]:
        return (WindowSegments, (list(self), self.keep, self.overlap, self.timed))


def segments_of(ids: list[int], text_of: Any, eot: int, ts_begin: int, window: dict[str, Any], timed: bool) -> list[dict[str, Any]]:
    """Segments with absolute times and their tokens: from timestamp tokens (each segment's
    tokens include its timestamps, as openai-whisper's), or one per window without them."""
    start, end = float(window.get("start", 0.0)), window.get("end")
    if not timed:
        body = [t for t in ids if t < eot]
        text = text_of(body).strip()
        k0, k1 = window.get("keep", (start, end if end is not None else start + 30.0))
        return [{"start": round(k0, 3), "end": round(k1, 3), "text": text, "tokens": body}] if text else []
    segs: list[dict[str, Any]] = []
    t0: float | None = None
    body: list[int] = []
    toks: list[int] = []
    for t in ids:
        if t >= ts_begin:
            ts = start + (t - ts_begin) * TIME_STEP
            toks.append(t)
            if t0 is not None and body:
                segs.append({"start": round(t0, 3), "end": round(ts, 3), "text": text_of(body).strip(), "tokens": toks})
                body, toks = [], []
                t0 = None
            else:
                t0 = ts
        elif t < eot:
            body.append(t)
            toks.append(t)
            if t0 is None:
                t0 = segs[-1]["end"] if segs else start
    if body:  # text after the last timestamp runs to the end of the window
        stop = float(end) if end is not None else (t0 or start) + 30.0
        segs.append({"start": round(t0 if t0 is not None else start, 3), "end": round(stop, 3), "text": text_of(body).strip(), "tokens": toks})
    return [s for s in segs if s["text"]]


def attach_words(segs: list[dict[str, Any]], words: list[dict[str, Any]], eot: int) -> None:
    """Give each segment its words (in order, by their text tokens, as openai-whisper does)
    and tighten the segment to them."""
    k = 0
    for seg in segs:
        need = sum(1 for t in seg["tokens"] if t < eot)
        got, mine = 0, []
        while k < len(words) and got < need:
            got += len(words[k].get("tokens") or [0])
            mine.append({key: words[k][key] for key in ("word", "start", "end", "probability") if key in words[k]})
            k += 1
        seg["words"] = mine
        if mine:
            seg["start"], seg["end"] = mine[0]["start"], max(mine[-1]["end"], mine[0]["start"])


# ---------------------------------------------------------------- stitching
def _norm(w: str) -> str:
    return re.sub(r"[^\w']", "", w.lower())


def overlap_cut(left: list[str], right: list[str]) -> tuple[int, int] | None:
    """Where to join two overlapping word lists: keep ``left[:i]`` + ``right[j:]``.

    The best alignment of the end of ``left`` with the start of ``right`` (most
    equal words per aligned word, needing at least 2), cut in its middle; None
    when nothing aligns (then both are kept whole).
    """
    L, R = [_norm(w) for w in left], [_norm(w) for w in right]
    best, where = 0.0, None
    for i in range(1, len(L) + len(R)):
        ls, le = max(0, len(L) - i), min(len(L), len(L) + len(R) - i)
        rs, re_ = max(0, i - len(L)), min(len(R), i)
        matches = sum(a == b and a != "" for a, b in zip(L[ls:le], R[rs:re_]))
        score = matches / i + i / 10000.0
        if matches > 1 and score > best:
            best, where = score, (ls, le, rs, re_)
    if where is None:
        return None
    ls, le, rs, re_ = where
    return (ls + le) // 2, (rs + re_) // 2


def trim_windows(words: list[list[str]], overlaps: list[float]) -> list[tuple[int, int]]:
    """Per window, the ``[a, b)`` range of its words kept once overlaps are resolved."""
    keep = [(0, len(w)) for w in words]
    for k in range(1, len(words)):
        (a0, b0), (a1, b1) = keep[k - 1], keep[k]
        if overlaps[k] > 0 and b0 > a0 and b1 > a1:
            cut = overlap_cut(words[k - 1][a0:b0], words[k][a1:b1])
            if cut is not None:
                keep[k - 1], keep[k] = (a0, a0 + cut[0]), (a1 + cut[1], b1)
    return keep


def gather_text(values: list[Any]) -> str:
    """The request's text from its windows' texts (in order)."""
    words = [str(v or "").split() for v in values]
    keep = trim_windows(words, [float(getattr(v, "overlap", 0.0)) for v in values])
    return " ".join(w for ws, (a, b) in zip(words, keep) for w in ws[a:b])


def gather_segments(values: list[Any]) -> list[dict[str, Any]]:
    """The request's segments from its windows' segments (in order, overlaps resolved,
    numbered from 0).

    Words an overlap made redundant are dropped from the segments that hold them (with their
    word timings); a segment that lost words starts (ends) no earlier (later) than its
    window's share.
    """
    wins = [v if isinstance(v, WindowSegments) else WindowSegments(list(v or []), (0.0, float("inf"))) for v in values]
    per_seg = [[s["text"].split() for s in w] for w in wins]
    keep = trim_windows([[x for ws in segs for x in ws] for segs in per_seg], [w.overlap for w in wins])
    out: list[dict[str, Any]] = []
    open_end = False  # the last segment lost its end words to the next window
    for w, segs, (a, b) in zip(wins, per_seg, keep):
        pos = 0
        for seg, ws in zip(w, segs):
            lo, hi = max(a - pos, 0), min(b - pos, len(ws))
            pos += len(ws)
            if hi <= lo:
                continue
            s = dict(seg, text=" ".join(ws[lo:hi]))
            if (lo, hi) != (0, len(ws)) and "words" in seg:
                s["words"] = _trim_words(seg["words"], ws, lo, hi)
            if lo > 0 and open_end and out and w.timed:  # two halves of a sentence cut by the overlap
                prev = out.pop()
                s = dict(s, start=prev["start"], text=prev["text"] + " " + s["text"])
                if "words" in prev:
                    s["words"] = prev["words"] + s.get("words", [])
            elif lo > 0:
                s["start"] = max(s["start"], w.keep[0])
            open_end = hi < len(ws)
            if open_end:
                s["end"] = min(s["end"], w.keep[1])
            if out:  # times never go backwards
                s["start"] = max(s["start"], out[-1]["end"])
            s["start"], s["end"] = round(s["start"], 3), round(max(s["end"], s["start"]), 3)
            out.append(s)
    return [{**s, "id": i} if list(s)[:1] == ["id"] else {"id": i, **s} for i, s in enumerate(out)]


def _trim_words(words: list[dict[str, Any]], text_words: list[str], lo: int, hi: int) -> list[dict[str, Any]]:
    """The word timings of text words ``lo:hi`` (by position when the counts agree)."""
    if len(words) == len(text_words):
        return words[lo:hi]
    keep = {_norm(w) for w in text_words[lo:hi]}
    return [w for w in words if _norm(w["word"]) in keep]
