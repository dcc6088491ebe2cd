"""Word timestamps from cross-attention, as openai-whisper's ``find_alignment`` and
``transformers``' token timestamps compute them.

One decoder forward over the window's decoded sequence (``<|sot|>[<|lang|><|task|>]``, the
generated tokens with their timestamp tokens, ``<|eot|>``); the cross-attention of the
model's *alignment heads* (from its generation config, else the published table in
``whisper_hfconfig``), cut to the window's audio, standardised over tokens, median-filtered
(width 7) and averaged over heads, is aligned to 20 ms frames by dynamic time warping. A
generated token ends where DTW enters its row and starts where the previous token ends; a
word (punctuation attached) spans its tokens. The attention is taken over all 1500 frames
before the cut, as ``transformers`` takes it from ``generate`` (openai-whisper re-softmaxes
after the cut); timestamp tokens keep their rows, so trailing silence lands on them rather
than on the last word. Imported lazily.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmpipe.graphs.base import UserError
from mmpipe.graphs.whisper_layers import DecoderLayer
from mmpipe.graphs.whisper_model import Loader, WhisperFiles

TOKENS_PER_SECOND = 50  # encoder frames per second
MEDIAN_WIDTH = 7
PREPEND = "\"'“¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window of the last dimension (reflect-padded)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    x = F.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect").reshape(*shape[:-1], shape[-1] + 2 * pad)
    return x.unfold(-1, width, 1).sort()[0][..., pad]


def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic time warping of cost matrix ``x`` [N, M]: the (row, column) path.

    openai-whisper's recurrence and tie-breaking (diagonal, then up, else left), computed one
    anti-diagonal at a time: every cell of a diagonal depends only on the two before it.
    """
    N, M = x.shape
    cost = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    trace = -np.ones((N + 1, M + 1), dtype=np.int8)
    cost[0, 0] = 0
    x = x.astype(np.float32)
    for d in range(2, N + M + 1):
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        cost[i, j] = x[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = N, M
    rows, cols = [], []
    while i > 0 or j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    return np.array(rows[::-1]), np.array(cols[::-1])


def split_words(tokenizer: Any, tokens: list[int], eot: int, language: str | None) -> tuple[list[str], list[list[int]]]:
    """Group tokens into words: at spaces and punctuation, or at unicode boundaries for
    languages written without spaces (openai-whisper's ``split_to_word_tokens``)."""
    def dec(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    full = dec(tokens)
    subwords, subtokens, cur, offset = [], [], [], 0
    for t in tokens:  # unicode split: a piece ends where its bytes decode to whole characters
        cur.append(t)
        text = dec(cur)
        if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
            subwords.append(text)
            subtokens.append(cur)
            cur = []
            offset += len(text)
    if language in NO_SPACE_LANGUAGES:
        return subwords, subtokens
    words: list[str] = []
    wtoks: list[list[int]] = []
    for sw, st in zip(subwords, subtokens):
        if st[0] >= eot or sw.startswith(" ") or sw.strip() in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" or not words:
            words.append(sw)
            wtoks.append(list(st))
        else:
            words[-1] += sw
            wtoks[-1] += st
    return words, wtoks


def merge_punctuation(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach leading punctuation to the following word and trailing punctuation to the
    previous one (tokens and their positions ``idx`` move along), then drop emptied entries."""
    def move(src: dict[str, Any], dst: dict[str, Any], before: bool) -> None:
        for key in ("word", "tokens", "idx"):
            if key in src:
                dst[key] = src[key] + dst[key] if before else dst[key] + src[key]
                src[key] = "" if key == "word" else []

    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        if words[i]["word"].startswith(" ") and words[i]["word"].strip() in PREPEND:
            move(words[i], words[j], before=True)
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        if not words[i]["word"].endswith(" ") and words[j]["word"] in APPEND:
            move(words[j], words[i], before=False)
        else:
            i = j
        j += 1
    return [w for w in words if w["word"]]


class Aligner:
    """The whole decoder (weights shared with the decode pieces on the same device) and the
    alignment heads, for one extra forward per window."""

    def __init__(self, files: WhisperFiles, device: torch.device, dtype: torch.dtype) -> None:
        from mmpipe.graphs.whisper_hfconfig import published_alignment_heads

        ld = Loader(files, device, dtype)
        c = files.config
        heads = files.gen.get("alignment_heads") or published_alignment_heads(c)
        if not heads:
            raise UserError("word_timestamps", f"{files.root} names no alignment heads and its size is not in the published table",
                            "add alignment_heads to its generation_config.json, or set word_timestamps=false")
        self.heads = [(int(layer), int(h)) for layer, h in heads]
        self.n_heads, self.d = int(c["decoder_attention_heads"]), int(c["d_model"])
        self.layers = [DecoderLayer.load(ld, i) for i in range(int(c["decoder_layers"]))]  # all: logits give word probabilities
        self.embed = ld.t("model.decoder.embed_tokens.weight")
        self.positions = ld.t("model.decoder.embed_positions.weight")
        self.norm = ld.norm("model.decoder.layer_norm")
        self.proj = ld.projection("model.decoder.embed_tokens.weight" if files.tied else "proj_out.weight")
        self.tokenizer = files.tokenizer()
        self.dtype, self.device = dtype, device

    def forward(self, hidden: torch.Tensor, seqs: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, L, V] and, per alignment head, pre-softmax cross-attention [B, L, T]."""
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.tensor([s + [s[-1]] * (L - len(s)) for s in seqs], device=self.device)  # padding after: causal
        h = self.embed[ids] + self.positions[:L]
        H, D = self.n_heads, self.d
        dh = D // H
        scale = dh**-0.5
        qks: dict[tuple[int, int], torch.Tensor] = {}
        for j, layer in enumerate(self.layers):
            sa, x = layer.self_attn, layer.cross
            q, k, v = sa.qkv(sa.ln1(h)).split(D, dim=-1)
            split = lambda t, n: t.view(B, n, H, dh).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(q * scale, L), split(k, L), split(v, L), is_causal=True, scale=1.0)
            h = h + sa.out(a.transpose(1, 2).reshape(B, L, D))
            xq = split(x.xq(x.ln2(h)) * scale, L)
            xk, xv = x.xkv(hidden).split(D, dim=-1)
            T = hidden.shape[1]
            xk, xv = split(xk, T), split(xv, T)
            for (lj, hh) in self.heads:
                if lj == j:
                    qks[(lj, hh)] = (xq[:, hh] @ xk[:, hh].transpose(-1, -2)).float()
            a = F.scaled_dot_product_attention(xq, xk, xv, scale=1.0)
            h = h + x.xout(a.transpose(1, 2).reshape(B, L, D))
            h = layer.mlp(h)
        logits = self.proj(self.norm(h)).float()
        return logits, [qks[k] for k in self.heads]

    def words(self, hidden: torch.Tensor, tokens: list[list[int]], windows: list[dict[str, Any]], eot: int, no_timestamps: int,
              languages: list[str | None]) -> list[list[dict[str, Any]]]:
        """Per window: ``{word, start, end, probability, tokens}`` with absolute times."""
        out: list[list[dict[str, Any]]] = [[] for _ in tokens]
        work = []
        for b, ids in enumerate(tokens):
            head = 0
            while head < len(ids) and eot < ids[head] <= no_timestamps:  # <|sot|> [<|lang|> <|task|>] [<|notimestamps|>]
                head += 1
            body = [t for t in ids[head:] if t != eot]
            if any(t < eot for t in body):
                work.append((b, ids[:head], body))
        if not work:
            return out
        seqs = [prompt + body + [eot] for _, prompt, body in work]
        with torch.inference_mode():
            logits, qks = self.forward(hidden[[b for b, _, _ in work]].to(self.dtype), seqs)
        for w, (b, prompt, body) in enumerate(work):
            win = windows[b]
            frames = int(round((float(win.get("end") or 30.0) - float(win.get("start", 0.0))) * 100))
            n, p = len(seqs[w]), len(prompt)
            weights = torch.stack([qk[w, :n].softmax(dim=-1)[:, : max(1, frames // 2)] for qk in qks])
            std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
            weights = median_filter((weights - mean) / std, MEDIAN_WIDTH)
            matrix = weights.mean(0)[p:-1]  # one row per generated token, fed after the prompt
            rows, cols = dtw(-matrix.double().cpu().numpy())
            jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
            ends = (cols[jumps] / TOKENS_PER_SECOND).tolist()
            starts = [0.0] + ends[:-1]
            where = [k for k, t in enumerate(body) if t < eot]
            text = [body[k] for k in where]
            probs = logits[w, [p + k - 1 for k in where]][:, :eot].softmax(-1)
            tp = probs[torch.arange(len(text)), torch.tensor(text)].tolist()
            words, wtoks = split_words(self.tokenizer, text + [eot], eot, languages[b])
            entries, i = [], 0
            for word, toks in zip(words[:-1], wtoks[:-1]):
                entries.append({"word": word, "tokens": toks, "idx": list(range(i, i + len(toks)))})
                i += len(toks)
            t0 = float(win.get("start", 0.0))
            for e in merge_punctuation(entries):
                idx = e.pop("idx")
                e.update(start=round(t0 + starts[where[idx[0]]], 3), end=round(t0 + ends[where[idx[-1]]], 3),
                         probability=round(float(np.mean([tp[k] for k in idx])), 4))
                out[b].append(e)
        return out
