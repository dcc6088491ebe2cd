"""The token search of one window (greedy, beams, sampling, fallback, no-speech) on a toy
vocabulary, and the alignment helpers (DTW, median filter, word grouping) against the
implementations they follow. The parity with transformers on real weights is in
tests/integration/test_whisper_quality.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpipe.graphs.whisper_rules import Rules, compression_ratio, item_seed
from mmpipe.graphs.whisper_search import Feed, Options, Search

V = 12
EOT, SOT, PREV, NOSPEECH, NOTS = 6, 7, 8, 9, 10  # text tokens 0..5, timestamps from 11
NONE = torch.zeros(0, dtype=torch.long)


def rules() -> Rules:
    return Rules(eot=EOT, sot=SOT, sot_prev=PREV, no_timestamps=NOTS, timestamp_begin=NOTS + 1, suppress=NONE, begin_suppress=NONE,
                 lang_ids=None, lang_to_id={}, task_to_id={}, multilingual=False, max_initial_timestamp=None, max_positions=64)


def text_of(ids: list[int]) -> str:
    return " ".join("w%d" % t for t in ids if t < EOT)


def peaked(tok: int, rows: int = 1, sure: float = 8.0) -> torch.Tensor:
    s = torch.zeros(rows, V)
    s[:, tok] = sure
    return s


def run(search: Search, plan: list[int], sot_speech: float = 0.0, sure: float = 8.0) -> list[Feed | None]:
    """Feed peaked scores for the tokens of ``plan`` (one step each); returns the feeds."""
    feeds: list[Feed | None] = []
    for k, tok in enumerate(plan):
        rows = len(search.rows)
        sot = None
        if k == 0 and search.no_speech is None:
            sot = torch.zeros(V)
            sot[NOSPEECH] = sot_speech
        scores = peaked(tok, rows, sure)
        feeds.append(search.step(scores, scores.logsumexp(-1), sot))
        if feeds[-1] is None:
            break
    return feeds


def test_greedy_result_and_average_logprob():
    s = Search(Options(beam_size=1, temperatures=(0.0,)), rules(), text_of)
    feed = s.start([])
    assert (feed.feed, feed.n, feed.pos, feed.rows, feed.sot) == ([SOT, NOTS], 2, 0, [0], 0)
    feeds = run(s, [3, 4, EOT])
    assert [f.feed for f in feeds[:2]] == [[3], [4]] and [f.pos for f in feeds[:2]] == [2, 3] and feeds[2] is None
    r = s.result
    lp = 8.0 - math.log(math.exp(8.0) + V - 1)  # each step's chosen token under the renormalised scores
    assert r.tokens == [3, 4, EOT] and r.avg_logprob == pytest.approx(lp, abs=1e-5) and not r.skipped
    assert r.temperature == 0.0 and r.compression_ratio == compression_ratio("w3 w4")
    assert 0.0 < r.no_speech_prob < 0.2  # from the <|startoftranscript|> logits given at the first step


def test_repetition_falls_back_to_the_next_temperature():
    s = Search(Options(beam_size=1, best_of=1, temperatures=(0.0, 0.5), max_new_tokens=30), rules(), text_of, seed=3)
    s.start([])
    feeds = run(s, [2] * 30)  # "w2 w2 w2 ..." compresses far beyond 2.4
    restart = feeds[-1]
    assert restart is not None and (restart.feed, restart.pos, restart.rows, restart.src) == ([NOTS], 1, [0], None)
    assert s.attempt == 1 and s.result is None and s.temperature == 0.5
    run(s, [1, EOT], sure=60.0)  # sampling from all but certain scores
    assert s.result.tokens == [1, EOT] and s.result.temperature == 0.5


def test_no_speech_makes_an_empty_window_and_stops_falling_back():
    s = Search(Options(beam_size=1, temperatures=(0.0, 0.2, 0.4)), rules(), text_of)
    s.start([])
    run(s, [1, EOT], sot_speech=12.0, sure=0.5)  # unsure tokens (avg logprob < -1), <|nocaptions|> likely
    assert s.result.skipped and s.result.tokens == [] and s.result.temperature == 0.0 and s.result.no_speech_prob > 0.6
    # the same tokens, confidently: speech after all, kept
    s = Search(Options(beam_size=1, temperatures=(0.0, 0.2, 0.4)), rules(), text_of)
    s.start([])
    run(s, [1, EOT], sot_speech=12.0)
    assert not s.result.skipped and s.result.tokens == [1, EOT]


def test_last_temperature_keeps_its_result():
    s = Search(Options(beam_size=1, best_of=1, temperatures=(0.0, 1.0), logprob_threshold=5.0, no_speech_threshold=None), rules(), text_of)
    s.start([])
    run(s, [1, EOT])
    run(s, [2, EOT], sure=60.0)
    assert s.result.tokens == [2, EOT] and s.result.temperature == 1.0 and not s.result.skipped


def test_beams_expand_from_one_row_and_reorder():
    s = Search(Options(beam_size=2, temperatures=(0.0,)), rules(), text_of)
    s.start([])
    first = torch.full((1, V), -5.0)
    first[0, 1], first[0, 2] = 2.0, 1.0
    f = s.step(first, first.logsumexp(-1), torch.zeros(V))
    assert f.rows == [0, 1] and f.src == [0, 0] and f.feed == [1, 2]  # both beams continue row 0's prompt
    nxt = torch.full((2, V), -5.0)
    nxt[0, EOT], nxt[1, 3], nxt[1, 4] = 3.0, 4.0, 3.5  # beam 0 ends; beam 1's two options run on
    f = s.step(nxt, nxt.logsumexp(-1), None)
    assert f is not None and f.src == [1, 1] and f.feed == [3, 4] and f.pos == 3
    assert s.done_rows[0].tokens == [1, EOT]  # a finished hypothesis, kept while the others run


def test_best_of_samples_are_reproducible_and_ranked():
    def sample(seed: int) -> tuple[list[int], list[list[int]]]:
        s = Search(Options(best_of=3, temperatures=(1.0,), compression_ratio_threshold=None, logprob_threshold=None,
                           no_speech_threshold=None, max_new_tokens=6), rules(), text_of, seed=seed)
        s.start([])
        feed = s.step(torch.zeros(1, V), torch.zeros(1), torch.zeros(V))
        assert feed is None or feed.src == [0] * len(feed.rows)
        while feed is not None:
            scores = torch.zeros(len(feed.rows), V)
            feed = s.step(scores, scores.logsumexp(-1), None)
        return s.result.tokens, [h.tokens for h in s.done_rows]

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    tokens, rows = a
    assert len(rows) == 3 and tokens in rows
    assert item_seed(0, 1) != item_seed(1, 0) and item_seed(5, 2) == item_seed(5, 2)


# ---------------------------------------------------------------- alignment helpers
def test_dtw_and_median_filter_match_transformers():
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping, _median_filter

    from mmpipe.graphs.whisper_align import dtw, median_filter

    rng = np.random.default_rng(0)
    for shape in ((1, 5), (7, 40), (12, 12), (30, 200)):
        x = rng.standard_normal(shape)
        x[0, 0] = x[0, 1]  # ties take the same branch
        got, want = dtw(x), _dynamic_time_warping(x)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), shape
    w = torch.randn(2, 3, 9, 50)
    assert torch.equal(median_filter(w, 7), _median_filter(w, 7))


@pytest.mark.slow
def test_words_and_punctuation_group_like_transformers():
    from transformers import WhisperTokenizerFast
    from transformers.models.whisper.tokenization_whisper import _combine_tokens_into_words

    from mmpipe.graphs.whisper_align import merge_punctuation, split_words
    from mmpipe.graphs.whisper_model import model_files

    files = model_files("package:tiny_en")
    tok = files.tokenizer()  # ours; transformers' own groups the words it is compared with
    ids = tok.encode(' "Hello," she said -- (quietly) to Mr. O\'Brien.', add_special_tokens=False)
    words, wtoks = split_words(tok, ids + [50256], 50256, "en")
    assert words[-1] == "<|endoftext|>" and sum(len(t) for t in wtoks) == len(ids) + 1
    merged = merge_punctuation([{"word": w, "tokens": t} for w, t in zip(words[:-1], wtoks[:-1])])
    want, want_tokens, _ = _combine_tokens_into_words(WhisperTokenizerFast.from_pretrained(str(files.root)), ids, "english")
    assert [w["word"] for w in merged] == want and [w["tokens"] for w in merged] == want_tokens
