"""The last ``whisper.decode`` piece's ``end``: logits -> each window's next tokens.

The logits processors run once over all decoding rows of the step (whatever window or
beam they belong to); each window's ``Search`` then picks its tokens. Windows waiting for
their request's previous window (``condition_on_previous_text``) start once it is in the
piece's history. Imported lazily (torch at module level).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from mmpipe.graphs.base import Batch, ItemMeta
from mmpipe.graphs.whisper_decode import ROW_KEYS
from mmpipe.graphs.whisper_search import Feed, Search

WAIT = Feed([], 0, 0, [])


def advance(dec: Any, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
    """``Decode.end``: (next carry, done flags, outputs) for the windows of ``carry``."""
    searches: list[Search] = [lane["search"] for lane in lanes]
    counts = [len(r) for r in carry["rows"]]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    logits, sots = None, {}
    if sum(counts):
        with torch.inference_mode():
            logits, sots = dec.piece.logits(carry["h"], carry)
    # processors over every row that is choosing a token (not detecting a language)
    picking = [i for i, s in enumerate(searches) if counts[i] and s.result is None and s.prompt is not None and not s.prompt.detect]
    scores = lse = None
    if picking:
        idx = [starts[i] + r for i in picking for r in range(counts[i])]
        assert logits is not None
        scores = logits[torch.tensor(idx, device=logits.device)]
        if any(searches[i].temperature == 0 and searches[i].opts.beam_size > 1 for i in picking):
            lse = scores.logsumexp(-1)  # raw log-normaliser: beam scores are log_softmax(raw logits)
        seqs = [h.tokens for i in picking for h in searches[i].live]
        stamps = [searches[i].opts.timestamps for i in picking for _ in range(counts[i])]
        dec.rules.process(scores, seqs, stamps)
    where = {}
    off = 0
    for i in picking:
        where[i] = (off, off + counts[i])
        off += counts[i]

    nxt: dict[str, list] = {k: [] for k in ROW_KEYS}
    done: list[bool] = []
    tokens: list[Any] = []
    infos: list[Any] = []
    started = False
    with torch.inference_mode():
        for i, (m, s) in enumerate(zip(meta, searches)):
            feed: Feed | None
            if s.result is not None:
                feed = None
            elif s.prompt is None:
                prefix = _prefix(dec, m)
                feed = WAIT if prefix is None else s.start(prefix)
                started = started or prefix is not None
            elif s.prompt.detect:
                assert logits is not None
                feed = s.detected(logits[starts[i]], sots.get(i))
            else:
                a, b = where[i]
                assert scores is not None
                feed = s.step(scores[a:b], lse[a:b] if lse is not None else scores.new_zeros(b - a), sots.get(i))
            done.append(feed is None)
            if feed is None:
                tokens.append(_tokens(dec, s))
                infos.append(_info(s))
                _remember(dec, m, s)
                feed = WAIT
            else:
                tokens.append(None)
                infos.append(None)
            for k in ROW_KEYS:
                nxt[k].append(getattr(feed, k))
    if not sum(counts) and not started and not any(done):
        time.sleep(0.001)  # every window here waits for another group: do not spin hot
    progress = [None if d else _progress(dec, m, s) for d, m, s in zip(done, meta, searches)]
    return nxt, done, {"tokens": tokens, "info": infos, "_progress": progress}


def _progress(dec: Any, m: ItemMeta, s: Search) -> dict[str, Any]:
    """What an unfinished window reports to its submitter (a server streaming text): the
    text of the tokens every hypothesis agrees on, and the fallback attempt it belongs to."""
    ids = s.stable_tokens()
    return {"window": m.sub, "attempt": s.attempt, "tokens": len(ids), "text": dec.text_of(ids) if ids else ""}


def _tokens(dec: Any, s: Search) -> list[int]:
    """The window's output: its <|startoftranscript|> sequence and the generated tokens."""
    p = s.prompt
    if p is None or p.detect:
        p = dec.rules.prompt(s.lang, s.task, s.opts.timestamps, [])
    assert s.result is not None
    return list(p.tokens[p.sot:]) + list(s.result.tokens)


def _info(s: Search) -> dict[str, Any]:
    r = s.result
    assert r is not None
    return {"temperature": r.temperature, "avg_logprob": r.avg_logprob, "compression_ratio": r.compression_ratio,
            "no_speech_prob": r.no_speech_prob, "skipped": r.skipped}


# ---------------------------------------------------------------- condition_on_previous_text
def _prefix(dec: Any, m: ItemMeta) -> list[int] | None:
    """Window ``m``'s previous text (openai-whisper's rule: every earlier window's tokens since
    the last one decoded above temperature 0.5, after the initial prompt until then; skipped
    windows add nothing), or None while an earlier window is still decoding."""
    cfg, _ = dec.config(m)
    hist = dec.history.get(m.request_id, {})
    if any(k not in hist for k in range(m.sub)):
        return None
    toks = list(dec.initial_prompt(cfg.initial_prompt))
    for k in range(m.sub):
        ids, temperature, skipped = hist[k]
        if skipped:
            continue
        toks += ids
        if temperature > 0.5:
            toks = []
    return toks


def _remember(dec: Any, m: ItemMeta, s: Search) -> None:
    cfg, _ = dec.config(m)
    if not cfg.condition_on_previous_text or m.of <= 1:
        return
    r = s.result
    assert r is not None
    hist = dec.history.setdefault(m.request_id, {})
    dec.history.move_to_end(m.request_id)
    hist[m.sub] = ([t for t in r.tokens if t != dec.rules.eot], r.temperature, r.skipped)
    if len(hist) == m.of:  # the request's last window: nobody waits for this any more
        dec.history.pop(m.request_id, None)
    while len(dec.history) > 4096:  # requests that failed half-way never complete theirs
        dec.history.popitem(last=False)
