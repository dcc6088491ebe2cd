"""Token search for one window: greedy, beam search, sampling with best_of, temperature
fallback and no-speech detection. Lives in the lane of the last ``whisper.decode`` piece.

What each mode reproduces:

* greedy (``beam_size`` 1 at temperature 0) and beam search: ``transformers``'
  ``generate`` (``num_beams``: 2 * beams candidates per step, finished hypotheses scored
  ``sum logprob / length ** length_penalty``, the ``early_stopping=False`` stop heuristic).
* sampling (temperature > 0): ``generate(do_sample=True)`` -- logits / temperature, the
  ``top_k`` most likely tokens (0: all, as openai-whisper), one ``torch.multinomial`` draw
  per row from a generator seeded per window; with ``best_of`` rows the best by the same
  length-normalised score is kept, as openai-whisper does.
* fallback (openai-whisper's rule, which ``transformers`` shares): a result whose text
  compresses by more than ``compression_ratio_threshold`` or whose average log-probability
  is below ``logprob_threshold`` is decoded again at the next temperature; a window whose
  no-speech probability (of <|nocaptions|> at <|startoftranscript|>) is above
  ``no_speech_threshold`` while its log-probability is below the threshold becomes empty.

The average log-probability is taken, as ``transformers`` does, over the generated tokens and
<|endoftext|> of the renormalised processed distribution (suppressed tokens excluded).
A ``Search`` only sees score rows and returns what to feed next (``Feed``); it never touches
weights, so the decoder pieces stay plain tensors. Imported lazily (torch at module level).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mmpipe.graphs.whisper_rules import Prompt, Rules, compression_ratio

NEG = -1.0e9  # transformers' "not a candidate" score


@dataclass(frozen=True)
class Options:
    """One window's decoding options (the recipe's values or its request's)."""

    beam_size: int = 5
    best_of: int = 5
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    length_penalty: float = 1.0
    top_k: int = 0
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    max_new_tokens: int = 128
    timestamps: bool = False
    seed: int = 0

    def rows_at(self, temperature: float) -> int:
        return self.best_of if temperature > 0 else self.beam_size

    @property
    def rows(self) -> int:
        """KV cache rows the window needs (the widest of its attempts)."""
        return max(self.rows_at(t) for t in self.temperatures)


@dataclass
class Feed:
    """What the decoder pieces run next for one window (plain data, the carry's row)."""

    feed: list[int]  # new token ids, row-major over ``rows``
    n: int  # new tokens per row
    pos: int  # position of the first new token
    rows: list[int]  # live cache rows of the window, in packed order
    src: list[int] | None = None  # per row: the cache row whose past it continues
    sot: int = -1  # index (within a row's new tokens) whose logits give the no-speech probability


def opening(rules: Rules, lang: int | None, task: str, timestamps: bool, prefix: list[int], want_no_speech: bool = True) -> tuple[Prompt, Feed]:
    """A window's prompt and its first feed (the whole prompt on row 0). The first decoder
    piece (``begin``) and the last one (the ``Search``) both call this, so they agree."""
    prompt = rules.prompt(lang, task, timestamps, prefix)
    # no-speech: the logits at <|startoftranscript|> given the prefix; a detection step
    # sees [sot] alone, which is that context only without a prefix
    sot = prompt.sot if want_no_speech and not (prompt.detect and prefix) else -1
    return prompt, Feed(list(prompt.tokens), len(prompt.tokens), 0, [0], None, sot)


@dataclass
class Result:
    """A window's outcome."""

    tokens: list[int]  # generated tokens, <|endoftext|> included when it was generated
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    skipped: bool = False


@dataclass
class _Hyp:
    tokens: list[int]
    lp: float  # sum of renormalised log-probabilities (for avg_logprob)
    score: float = 0.0  # beam: accumulated log-probability; finished: length-normalised score


@dataclass
class Search:
    """The decoding state of one window in the lane of the last decoder piece."""

    opts: Options
    rules: Rules
    text_of: Callable[[list[int]], str]
    task: str = "transcribe"
    lang: int | None = None  # the language token (None: detect it, multilingual models)
    prompt: Prompt | None = None  # None: waiting (for the previous window's text)
    prefix: list[int] = field(default_factory=list)  # previous text / initial prompt
    seed: int = 0
    attempt: int = 0
    no_speech: float | None = None
    result: Result | None = None
    live: list[_Hyp] = field(default_factory=list)  # running rows, in row order
    rows: list[int] = field(default_factory=list)  # cache row of each live hypothesis
    done_rows: list[_Hyp] = field(default_factory=list)  # sampling: finished rows; beam: finished slots
    unsatisfied: bool = True
    gen: torch.Generator | None = None

    # ---- lifecycle -------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self.opts.temperatures[self.attempt]

    @property
    def begin(self) -> int:
        assert self.prompt is not None
        return len(self.prompt.tokens)

    def start(self, prefix: list[int]) -> Feed:
        """Begin decoding after ``prefix`` (previous text): the whole prompt is fed, on row 0."""
        self.prefix = list(prefix)
        self.prompt, feed = opening(self.rules, self.lang, self.task, self.opts.timestamps, self.prefix, self.no_speech is None)
        self.live, self.rows = [_Hyp([], 0.0)], [0]
        return feed

    def detected(self, raw: torch.Tensor, sot_logits: torch.Tensor | None) -> Feed:
        """After the language-detection step: the language token from the raw logits ``raw``
        [V], then the prompt proper (fed after [sot], or from position 0 after a prefix)."""
        if sot_logits is not None and self.no_speech is None:
            self.no_speech = float(sot_logits.float().softmax(-1)[self.rules.no_speech])
        self.lang = self.rules.detect(raw)
        self.prompt = self.rules.prompt(self.lang, self.task, self.opts.timestamps, self.prefix)
        if self.prefix:
            return self.start(self.prefix)
        return Feed(self.prompt.tokens[1:], len(self.prompt.tokens) - 1, 1, [0])

    def stable_tokens(self) -> list[int]:
        """The generated tokens every hypothesis of this attempt agrees on (live beams and
        finished ones): whatever wins this attempt starts with them. A temperature fallback
        (a new attempt) can still replace them; ``attempt`` tells a listener when it did."""
        if self.result is not None:
            return list(self.result.tokens)
        hyps = [h.tokens for h in self.live] + [h.tokens for h in self.done_rows if h.score > NEG / 2]
        if self.prompt is None or self.prompt.detect or not hyps:
            return []
        n = min(len(t) for t in hyps)
        first = hyps[0]
        for i in range(n):
            if any(t[i] != first[i] for t in hyps[1:]):
                return list(first[:i])
        return list(first[:n])

    def finish_silent(self) -> None:
        """A window without signal: empty, no model call."""
        self.result = Result([], self.temperature, 0.0, 0.0, 1.0, skipped=True)

    # ---- one step --------------------------------------------------------------
    def step(self, scores: torch.Tensor, lse_raw: torch.Tensor, sot_logits: torch.Tensor | None) -> Feed | None:
        """Advance by one token given ``scores`` [rows, V]: the processed logits of the live
        rows (``lse_raw``: logsumexp of their raw logits, for beam scores). Returns the next
        feed, or None when the window is finished (``result`` set)."""
        assert self.prompt is not None and not self.prompt.detect
        if sot_logits is not None and self.no_speech is None:
            self.no_speech = float(sot_logits.float().softmax(-1)[self.rules.no_speech])
        t = self.temperature
        if t > 0:
            return self._sample(scores, t)
        if self.opts.beam_size == 1:
            return self._greedy(scores)
        return self._beam(scores, lse_raw)

    def _max_len(self) -> int:
        return min(self.begin + self.opts.max_new_tokens, self.rules.max_positions)

    def _pos(self) -> int:
        """Position of the token fed next (the last generated one)."""
        return self.begin + len(self.live[0].tokens) - 1

    def _greedy(self, scores: torch.Tensor) -> Feed | None:
        h = self.live[0]
        tok = int(scores[0].argmax())
        h.lp += float(scores[0, tok] - scores[0].logsumexp(-1))
        h.tokens.append(tok)
        if tok == self.rules.eot or self.begin + len(h.tokens) >= self._max_len():
            return self._attempt_done(h)
        return Feed([tok], 1, self._pos(), [0])

    def _sample(self, scores: torch.Tensor, t: float) -> Feed | None:
        if self.gen is None:
            self.gen = torch.Generator(device=scores.device).manual_seed(self.seed)
        width = self.opts.best_of
        if len(self.live) == 1 and not self.live[0].tokens and width > 1:  # first token: best_of rows from one
            self.live = [_Hyp([], 0.0) for _ in range(width)]
            scores = scores.expand(width, -1)
            src: list[int] | None = [0] * width
            self.rows = list(range(width))
        else:
            src = None
        warped = scores / t
        k = self.opts.top_k
        if 0 < k < warped.shape[-1]:
            kth = torch.topk(warped, k, dim=-1).values[:, -1:]
            warped = warped.masked_fill(warped < kth, float("-inf"))
        probs = warped.softmax(-1)
        # one draw per row, in row order: the same numbers as transformers' batched draw
        picks = [int(torch.multinomial(probs[r:r + 1], 1, generator=self.gen)) for r in range(len(self.live))]
        # transformers' avg_logprob: the warped scores with the temperature undone, renormalised
        lp = torch.log_softmax(warped * t, dim=-1)
        keep_h, keep_r, keep_src, feed = [], [], [], []
        for r, (h, tok) in enumerate(zip(self.live, picks)):
            h.lp += float(lp[r, tok])
            h.tokens.append(tok)
            if tok == self.rules.eot or self.begin + len(h.tokens) >= self._max_len():
                self.done_rows.append(h)
            else:
                keep_h.append(h)
                keep_r.append(self.rows[r])
                keep_src.append(src[r] if src is not None else self.rows[r])
                feed.append(tok)
        if not keep_h:
            best = max(self.done_rows, key=lambda x: x.lp / (len(x.tokens) ** self.opts.length_penalty))
            return self._attempt_done(best)
        pos = self.begin + len(keep_h[0].tokens) - 1
        self.live, self.rows = keep_h, keep_r
        return Feed(feed, 1, pos, keep_r, keep_src if src is not None else None)

    def _beam(self, scores: torch.Tensor, lse_raw: torch.Tensor) -> Feed | None:
        K, V = self.opts.beam_size, scores.shape[-1]
        cur_len = self.begin + len(self.live[0].tokens)
        beam_lp = scores - lse_raw[:, None]  # log_softmax(raw logits), processors' -inf kept
        renorm = scores - scores.logsumexp(-1, keepdim=True)  # what avg_logprob uses
        run = torch.tensor([h.score for h in self.live], dtype=torch.float32, device=scores.device)
        acc = (beam_lp + run[:, None]).reshape(-1)
        vals, idx = torch.topk(acc, 2 * K)
        beams, toks = (idx // V).tolist(), (idx % V).tolist()
        max_len = self._max_len()
        hits = torch.tensor([tok == self.rules.eot or cur_len + 1 >= max_len for tok in toks])
        cand_lp = renorm[idx // V, idx % V].tolist()
        # e. the best K unfinished candidates run on (finished ones only if nothing else is left)
        shifted = vals + hits.to(torch.float32) * NEG
        order = torch.topk(shifted, K).indices.tolist()
        # f. finished candidates among the top K enter the K finished slots if they score higher
        did = hits & (torch.arange(2 * K) < K)
        fin = vals / ((cur_len + 1 - self.begin) ** self.opts.length_penalty)
        fin = fin + (0.0 if self.unsatisfied else NEG) + (~did).to(torch.float32) * NEG
        if not self.done_rows:
            self.done_rows = [_Hyp([], 0.0, NEG) for _ in range(K)]
        merged = self.done_rows + [_Hyp(self.live[b].tokens + [tok], self.live[b].lp + lp, float(s))
                                   for b, tok, lp, s in zip(beams, toks, cand_lp, fin.tolist())]
        mscores = torch.tensor([h.score for h in merged], dtype=torch.float32)
        self.done_rows = [merged[i] for i in torch.topk(mscores, K).indices.tolist()]
        new = [_Hyp(self.live[beams[i]].tokens + [toks[i]], self.live[beams[i]].lp + cand_lp[i], float(shifted[i])) for i in order]
        parents = [self.rows[beams[i]] for i in order]
        # g. stop when no running beam can beat the worst finished one (early_stopping=False)
        cur_len += 1
        finished = [h.score > NEG / 2 for h in self.done_rows]
        best_possible = float(torch.tensor(new[0].score, dtype=torch.float32) / ((cur_len - self.begin) ** self.opts.length_penalty))
        worst = min(h.score for h in self.done_rows)
        self.unsatisfied = self.unsatisfied and any(best_possible > (worst if f else NEG) for f in finished)
        if not self.unsatisfied or bool(hits.all()):
            return self._attempt_done(self.done_rows[0])
        self.live, self.rows = new, list(range(K))
        return Feed([h.tokens[-1] for h in new], 1, cur_len - 1, self.rows, parents)

    # ---- fallback ----------------------------------------------------------------
    def _attempt_done(self, best: _Hyp) -> Feed | None:
        """Judge the attempt's best result: done, empty (no speech) or decode again hotter."""
        o, t = self.opts, self.temperature
        avg = best.lp / max(1, len(best.tokens))
        ratio = compression_ratio(self.text_of(best.tokens))
        again = (o.compression_ratio_threshold is not None and ratio > o.compression_ratio_threshold) or \
                (o.logprob_threshold is not None and avg < o.logprob_threshold)
        silent = o.no_speech_threshold is not None and self.no_speech is not None and self.no_speech > o.no_speech_threshold \
            and (o.logprob_threshold is None or avg < o.logprob_threshold)
        if silent:
            again = False
        if again and self.attempt + 1 < len(o.temperatures):
            self.attempt += 1
            self.done_rows, self.unsatisfied = [], True
            self.live, self.rows = [_Hyp([], 0.0)], [0]
            assert self.prompt is not None
            # the prompt's keys/values are in every row already: feed its last token again
            return Feed([self.prompt.tokens[-1]], 1, self.begin - 1, [0])
        self.result = Result([] if silent else list(best.tokens), t, avg, ratio, float(self.no_speech or 0.0), skipped=silent)
        return None
