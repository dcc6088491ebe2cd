"""Stitching the windows of long audio: times never run backwards, and a lone shared
word in an overlap is not an alignment (no words dropped)."""
from __future__ import annotations

import random

from mmpipe.graphs import whisper_text as wt


def _seg(start: float, end: float, text: str) -> dict:
    return {"start": start, "end": end, "text": text}


def _assert_monotonic(segs: list[dict]) -> None:
    for s in segs:
        assert s["end"] >= s["start"], s
    for a, b in zip(segs, segs[1:]):
        assert b["start"] >= a["end"], (a, b)


def test_times_never_run_backwards_when_overlapping_windows_do_not_align() -> None:
    """Two windows overlap by 4 s but share no words: both are kept whole, and the second
    window's first segment (timed inside the overlap) must not start before the first ends."""
    a = wt.WindowSegments([_seg(0.0, 12.0, "alpha beta gamma"), _seg(12.0, 29.5, "delta epsilon")], (0.0, 28.0), 0.0, True)
    b = wt.WindowSegments([_seg(26.0, 31.0, "zeta eta"), _seg(31.0, 40.0, "theta")], (28.0, 40.0), 4.0, True)
    segs = wt.gather_segments([a, b])
    assert " ".join(s["text"] for s in segs) == "alpha beta gamma delta epsilon zeta eta theta"
    _assert_monotonic(segs)


def test_times_never_run_backwards_after_a_merge() -> None:
    """The overlap aligns; the kept half of the second window's first segment starts no
    earlier than the first window's last kept segment ends."""
    a = wt.WindowSegments([_seg(0.0, 20.0, "one two three"), _seg(20.0, 30.0, "four five six")], (0.0, 27.0), 0.0, False)
    b = wt.WindowSegments([_seg(23.0, 35.0, "five six seven"), _seg(35.0, 40.0, "eight")], (27.0, 40.0), 4.0, False)
    segs = wt.gather_segments([a, b])
    assert " ".join(s["text"] for s in segs) == "one two three four five six seven eight"
    _assert_monotonic(segs)  # the kept half starts no earlier than the last kept segment ends


def test_times_never_run_backwards_on_random_windows() -> None:
    rng = random.Random(0)
    vocab = "a b c d e f g h i j".split()
    for _ in range(300):
        wins, t = [], 0.0
        for k in range(rng.randint(2, 5)):
            start = max(0.0, t - rng.choice([0.0, 4.0]))
            overlap = t - start if k else 0.0
            segs, s = [], start
            for _ in range(rng.randint(1, 4)):
                e = s + rng.uniform(0.5, 9.0)
                segs.append(_seg(round(s, 2), round(e, 2), " ".join(rng.choices(vocab, k=rng.randint(1, 5)))))
                s = e - rng.uniform(0.0, 2.0)  # Whisper's own segment times may overlap too
            wins.append(wt.WindowSegments(segs, (t, s), overlap, rng.random() < 0.5))
            t = s
        _assert_monotonic(wt.gather_segments(wins))


def test_one_shared_word_is_not_an_alignment() -> None:
    """"the" is the only word both sides of the overlap share: taking it as the join would
    drop the words around it. Both windows are kept whole."""
    left = "we walked along the river".split()
    right = "the hills were green and quiet".split()
    assert wt.overlap_cut(left, right) is None
    text = wt.gather_text([wt.WindowText(" ".join(left)), wt.WindowText(" ".join(right), overlap=4.0)])
    assert text.split() == left + right
    a = wt.WindowSegments([_seg(0.0, 29.0, " ".join(left))], (0.0, 27.0), 0.0, False)
    b = wt.WindowSegments([_seg(25.0, 40.0, " ".join(right))], (27.0, 40.0), 4.0, False)
    assert " ".join(s["text"] for s in wt.gather_segments([a, b])).split() == left + right


def test_one_shared_word_at_any_offset_drops_nothing() -> None:
    left = "a b c d e".split()
    for k in range(len(left)):
        right = [left[k], "x", "y", "z"]  # one word in common, at every possible position
        assert wt.overlap_cut(left, right) is None, k
        assert wt.gather_text([wt.WindowText(" ".join(left)), wt.WindowText(" ".join(right), overlap=4.0)]).split() == left + right


def test_two_shared_words_do_align() -> None:
    left = "we walked along the river bank".split()
    right = "the river bank was green".split()
    i, j = wt.overlap_cut(left, right)
    assert left[:i] + right[j:] == "we walked along the river bank was green".split()


def test_a_segment_that_lost_its_first_words_starts_in_its_window_share() -> None:
    """Documented rule: a segment that lost words to the overlap starts no earlier than
    the time its window owns (27 s here), even where the previous window ended earlier."""
    a = wt.WindowSegments([_seg(0.0, 20.0, "one two three"), _seg(20.0, 30.0, "four five")], (0.0, 27.0), 0.0, False)
    b = wt.WindowSegments([_seg(23.0, 35.0, "three four five six")], (27.0, 40.0), 4.0, False)
    segs = wt.gather_segments([a, b])
    assert [(s["start"], s["text"]) for s in segs] == [(0.0, "one two three"), (27.0, "four five six")]


def test_two_halves_of_a_sentence_cut_by_the_overlap_become_one_segment() -> None:
    """Timed windows: the first window's last segment lost its end to the overlap and the
    second's first segment lost its start: they are one sentence, with the first's start."""
    a = wt.WindowSegments([_seg(0.0, 20.0, "Please call me"), _seg(25.0, 30.0, "when you get")], (0.0, 27.0), 0.0, True)
    b = wt.WindowSegments([_seg(24.0, 29.0, "me when you get home."), _seg(30.0, 32.0, "Bye.")], (27.0, 40.0), 6.0, True)
    segs = wt.gather_segments([a, b])
    assert [(s["start"], s["end"], s["text"]) for s in segs] == [
        (0.0, 20.0, "Please call me"), (25.0, 29.0, "when you get home."), (30.0, 32.0, "Bye.")]


def test_text_after_the_last_timestamp_runs_30_seconds_when_the_window_has_no_end() -> None:
    ts = 100  # timestamp_begin: token 100 + k is k * 20 ms
    text_of = lambda ids: " ".join(f"w{t}" for t in ids)  # noqa: E731
    segs = wt.segments_of([ts + 50, 1, 2], text_of, eot=99, ts_begin=ts, window={"start": 60.0}, timed=True)
    assert [(s["start"], s["end"], s["text"]) for s in segs] == [(61.0, 91.0, "w1 w2")]
