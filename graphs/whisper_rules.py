"""Whisper's token rules: special ids, prompts, and the logits processors of ``generate``.

``Rules`` is read from a model's generation config. ``process`` applies, row by row of a
``[R, V]`` score matrix, what ``transformers``' Whisper ``generate`` applies: suppress_tokens,
begin_suppress_tokens at the first generated position, and the timestamp rules of
``WhisperTimeStampLogitsProcessor`` when timestamps are on. The rows may belong to different
items at different lengths (continuous batching) and to different beams of one item.

Prompts follow openai-whisper: ``[<|startofprev|> previous-text...] <|startoftranscript|>
[<|lang|> <|task|>] [<|notimestamps|>]``, the previous text cut to its last
``max_target_positions // 2 - 1`` tokens. Imported lazily (torch at module level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.graphs.base import UserError
from mmpipe.graphs.whisper_model import WhisperFiles

NEG_INF = float("-inf")


@dataclass
class Prompt:
    """A window's decoder prompt: its tokens, where <|startoftranscript|> is in them, and
    whether the language is still to be detected (then ``tokens`` is just ``[sot]``)."""

    tokens: list[int]
    sot: int
    detect: bool = False


@dataclass
class Rules:
    """Special token ids and logits processing, read from the generation config."""

    eot: int
    sot: int
    sot_prev: int | None
    no_timestamps: int
    timestamp_begin: int
    suppress: torch.Tensor  # token ids (long)
    begin_suppress: torch.Tensor  # token ids (long)
    lang_ids: torch.Tensor | None  # the language tokens' ids, ascending (long)
    lang_to_id: dict[str, int]
    task_to_id: dict[str, int]
    multilingual: bool
    max_initial_timestamp: int | None
    max_positions: int = 448

    @classmethod
    def load(cls, files: WhisperFiles, vocab: int, device: torch.device) -> "Rules":
        g, c = files.gen, files.config

        def id_list(ids: list[int]) -> torch.Tensor:
            return torch.tensor(sorted({int(i) for i in ids if 0 <= int(i) < vocab}), dtype=torch.long, device=device)

        eot = int(g.get("eos_token_id", c.get("eos_token_id", 50256)))
        nots = int(g.get("no_timestamps_token_id", 0)) or None
        if nots is None:
            raise UserError("model.path", f"{files.root}: generation_config.json has no no_timestamps_token_id", "use a Whisper checkpoint with its generation config")
        langs = {str(k): int(v) for k, v in (g.get("lang_to_id") or {}).items()}
        prev = g.get("prev_sot_token_id")
        return cls(eot=eot, sot=int(g.get("decoder_start_token_id", c.get("decoder_start_token_id", 50257))),
                   sot_prev=int(prev) if prev is not None else None, no_timestamps=nots,
                   timestamp_begin=nots + 1, suppress=id_list(list(g.get("suppress_tokens") or c.get("suppress_tokens") or [])),
                   begin_suppress=id_list(list(g.get("begin_suppress_tokens") or c.get("begin_suppress_tokens") or [])),
                   lang_ids=id_list(list(langs.values())) if langs else None, lang_to_id=langs,
                   task_to_id={str(k): int(v) for k, v in (g.get("task_to_id") or {}).items()},
                   multilingual=bool(g.get("is_multilingual", bool(langs))), max_initial_timestamp=g.get("max_initial_timestamp_index"),
                   max_positions=int(c.get("max_target_positions", 448)))

    @property
    def no_speech(self) -> int:
        """<|nocaptions|> (<|nospeech|>), whose probability at <|startoftranscript|> says "no speech"."""
        return self.no_timestamps - 1

    def language_id(self, language: str, key: str = "language") -> int:
        """``en``, ``english`` or ``<|en|>`` -> the language token id (as transformers accepts them)."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        lang = language.lower()
        tok = lang if lang in self.lang_to_id else f"<|{TO_LANGUAGE_CODE.get(lang, lang)}|>"
        if tok not in self.lang_to_id:
            raise UserError(key, f"language '{language}' is not supported by this model", "use a code like en, de, fr (or leave language unset to detect it)")
        return self.lang_to_id[tok]

    def tail(self, task: str, timestamps: bool) -> list[int]:
        """Tokens after <|sot|><|lang|>: the task (multilingual) and <|notimestamps|> unless timestamps."""
        out = [self.task_to_id[task]] if self.multilingual and self.task_to_id else []
        return out if timestamps else out + [self.no_timestamps]

    def prompt(self, lang: int | None, task: str, timestamps: bool, prefix: list[int]) -> Prompt:
        """The prompt of a window; ``lang`` None on a multilingual model: detect it first.

        ``prefix``: previous text (or the initial prompt), kept to its last
        ``max_positions // 2 - 1`` tokens behind <|startofprev|>.
        """
        head: list[int] = []
        if prefix and self.sot_prev is not None:
            head = [self.sot_prev] + prefix[-(self.max_positions // 2 - 1):]
        if self.multilingual and lang is None:
            return Prompt([self.sot], 0, detect=True)
        sot_seq = [self.sot] + ([int(lang)] if self.multilingual and lang is not None else [])
        return Prompt(head + sot_seq + self.tail(task, timestamps), len(head))

    def detect(self, logits: torch.Tensor) -> int:
        """As ``detect_language``: the most likely language token (ids ascending, so ties resolve
        to the lowest id, as argmax over the masked vocabulary does)."""
        assert self.lang_ids is not None
        return int(self.lang_ids[logits[self.lang_ids].argmax()])

    # ---- logits processors ---------------------------------------------------
    def process(self, scores: torch.Tensor, seqs: list[list[int]], stamps: list[bool]) -> None:
        """Apply the processors in place to ``scores`` [R, V] (logits or log-probabilities):
        ``seqs[r]`` are row r's generated tokens so far, ``stamps[r]`` its timestamp mode."""
        # index_fill_ touches only the listed columns (a full-vocabulary mask costs a pass over [R, V])
        scores.index_fill_(1, self.suppress, NEG_INF)
        for r, seq in enumerate(seqs):
            if not seq:
                scores[r].index_fill_(0, self.begin_suppress, NEG_INF)
        stamped = [r for r, s in enumerate(stamps) if s]
        if stamped:
            rows = torch.tensor(stamped, device=scores.device)
            sub = scores[rows]
            self.timestamp_rules(sub, [seqs[r] for r in stamped])
            scores[rows] = sub

    def timestamp_rules(self, scores: torch.Tensor, seqs: list[list[int]]) -> None:
        """``WhisperTimeStampLogitsProcessor`` per row (``seqs``: generated tokens per row)."""
        tb = self.timestamp_begin
        scores[:, self.no_timestamps] = NEG_INF
        for k, seq in enumerate(seqs):
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penult_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penult_ts:
                    scores[k, tb:] = NEG_INF
                else:
                    scores[k, : self.eot] = NEG_INF
            stamps = [t for t in seq if t >= tb]
            floor = tb
            if stamps:
                floor = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
            scores[k, tb:floor] = NEG_INF
            if not seq:
                scores[k, :tb] = NEG_INF
                if self.max_initial_timestamp is not None:
                    scores[k, tb + int(self.max_initial_timestamp) + 1:] = NEG_INF
        logprobs = F.log_softmax(scores.float(), dim=-1)
        ts_lp = logprobs[:, tb:].logsumexp(dim=-1)
        text_max = logprobs[:, :tb].max(dim=-1).values
        scores[:, :tb].masked_fill_((ts_lp > text_max).unsqueeze(-1), NEG_INF)


def text_tokens(ids: list[int], eot: int) -> list[int]:
    """The text tokens of a token list (no specials, no timestamps)."""
    return [t for t in ids if t < eot]


def compression_ratio(text: str) -> float:
    """openai-whisper's repetition measure: UTF-8 bytes of the text over their zlib size
    (0 for empty text). Loops ("the the the ...") score far above 2.4."""
    import zlib

    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def item_seed(seed: int, sub: int) -> int:
    """The sampling seed of window ``sub`` of a request seeded ``seed`` (distinct per window,
    the same from run to run and whatever the batching)."""
    return (int(seed) * 1_000_003 + int(sub)) % (2**63)


def decode_text(tokenizer: Any, ids: list[int], eot: int) -> str:
    """The text of ``ids`` (specials and timestamps dropped), as the detokenizer makes it."""
    return tokenizer.decode(text_tokens(ids, eot), skip_special_tokens=True)
