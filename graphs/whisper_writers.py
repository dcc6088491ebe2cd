"""Transcript files in openai-whisper's conventions: txt, vtt, srt, tsv, json.

* txt: one line per segment, stripped.
* vtt: ``WEBVTT``, then ``[hh:]mm:ss.mmm --> ...`` cues (hours only when needed).
* srt: numbered cues, ``hh:mm:ss,mmm`` times.
* tsv: a ``start end text`` header, times in integer milliseconds (no locale trouble).
* json: ``{"text", "segments", "language"}`` (segments: id, seek, start, end, text, tokens,
  temperature, avg_logprob, compression_ratio, no_speech_prob, and words when asked).

With word timings, a subtitle cue spans its segment's words (first word's start to last
word's end), as openai-whisper's writers do. No torch import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

WRITERS = ("txt", "vtt", "srt", "tsv", "json")


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """``[hh:]mm:ss<marker>mmm`` of a non-negative time (negative times are clamped to 0)."""
    ms = round(max(seconds, 0.0) * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    head = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{head}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def cues(segments: list[dict[str, Any]], hours: bool, marker: str) -> Iterator[tuple[str, str, str]]:
    """(start, end, text) of each subtitle: one per segment, timed by its words when present."""
    for seg in segments:
        words = seg.get("words") or []
        if words:
            start, end = words[0]["start"], words[-1]["end"]
            text = "".join(w["word"] for w in words).strip()
        else:
            start, end, text = seg["start"], seg["end"], seg["text"].strip()
        if not text:
            continue
        yield (format_timestamp(start, hours, marker), format_timestamp(end, hours, marker), text.replace("-->", "->"))


def to_txt(t: dict[str, Any]) -> str:
    return "".join(s["text"].strip() + "\n" for s in t["segments"])


def to_vtt(t: dict[str, Any]) -> str:
    return "WEBVTT\n\n" + "".join(f"{a} --> {b}\n{text}\n\n" for a, b, text in cues(t["segments"], False, "."))


def to_srt(t: dict[str, Any]) -> str:
    return "".join(f"{i}\n{a} --> {b}\n{text}\n\n" for i, (a, b, text) in enumerate(cues(t["segments"], True, ","), 1))


def to_tsv(t: dict[str, Any]) -> str:
    rows = ["start\tend\ttext\n"]
    rows += [f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t{s['text'].strip().replace(chr(9), ' ')}\n" for s in t["segments"]]
    return "".join(rows)


def to_json(t: dict[str, Any]) -> str:
    return json.dumps(t, indent=2, ensure_ascii=False) + "\n"


def write_transcript(transcript: dict[str, Any], stem: Path, formats: tuple[str, ...], extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<stem>.<fmt>`` for each format; ``extra`` keys go into the JSON file first."""
    make = {"txt": to_txt, "vtt": to_vtt, "srt": to_srt, "tsv": to_tsv,
            "json": lambda t: to_json({**(extra or {}), **t})}
    paths = []
    for fmt in formats:
        p = stem.with_name(f"{stem.name}.{fmt}")
        p.write_text(make[fmt](transcript), encoding="utf-8")
        paths.append(p)
    return paths
