"""Word timestamps from cross-attention: openai-whisper's ``find_alignment``.

One decoder forward over ``<|sot|>[<|lang|><|task|>] <|notimestamps|> text <|eot|>``; the
pre-softmax cross-attention scores of the model's *alignment heads* (from its generation
config, else the published table in ``whisper_hfconfig``) are cut to the window's audio,
softmaxed, standardised over tokens, median-filtered (width 7) and averaged over heads;
dynamic time warping of the negated matrix maps tokens to 20 ms frames. A word starts where
its first token's row is entered and ends where the next word's is. Imported lazily.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmpipe.graphs.base import UserError
from mmpipe.graphs.whisper_model import DecoderLayer, Loader, WhisperFiles

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
    previous one (each keeps its own times), then drop the emptied entries."""
    i, j = len(words) - 2, len(words) - 1
    while i >= 0:
        prev, foll = words[i], words[j]
        if prev["word"].startswith(" ") and prev["word"].strip() in PREPEND:
            foll["word"], foll["tokens"] = prev["word"] + foll["word"], prev["tokens"] + foll["tokens"]
            prev["word"], prev["tokens"] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(words):
        prev, foll = words[i], words[j]
        if not prev["word"].endswith(" ") and foll["word"] in APPEND:
            prev["word"], prev["tokens"] = prev["word"] + foll["word"], prev["tokens"] + foll["tokens"]
            foll["word"], foll["tokens"] = "", []
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
        self.proj = ld.t("model.decoder.embed_tokens.weight" if files.tied else "proj_out.weight")
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
            q, k, v = layer.qkv(layer.ln1(h)).split(D, dim=-1)
            split = lambda t, n: t.view(B, n, H, dh).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(q * scale, L), split(k, L), split(v, L), is_causal=True, scale=1.0)
            h = h + layer.out(a.transpose(1, 2).reshape(B, L, D))
            xq = split(layer.xq(layer.ln2(h)) * scale, L)
            xk, xv = layer.xkv(hidden).split(D, dim=-1)
            T = hidden.shape[1]
            xk, xv = split(xk, T), split(xv, T)
            for (lj, hh) in self.heads:
                if lj == j:
                    qks[(lj, hh)] = (xq[:, hh] @ xk[:, hh].transpose(-1, -2)).float()
            a = F.scaled_dot_product_attention(xq, xk, xv, scale=1.0)
            h = h + layer.xout(a.transpose(1, 2).reshape(B, L, D))
            h = h + layer.fc2(F.gelu(layer.fc1(layer.ln3(h))))
        logits = F.linear(self.norm(h), self.proj).float()
        return logits, [qks[k] for k in self.heads]

    def words(self, hidden: torch.Tensor, tokens: list[list[int]], windows: list[dict[str, Any]], eot: int, no_timestamps: int,
              languages: list[str | None]) -> list[list[dict[str, Any]]]:
        """Per window: ``{word, start, end, probability, tokens}`` with absolute times."""
        out: list[list[dict[str, Any]]] = [[] for _ in tokens]
        work = []
        for b, ids in enumerate(tokens):
            text = [t for t in ids if t < eot]
            if text:
                sot_seq = []
                for t in ids:  # the leading specials, <|notimestamps|> aside
                    if t < eot or t > no_timestamps:
                        break
                    if t != no_timestamps:
                        sot_seq.append(t)
                work.append((b, sot_seq, text))
        if not work:
            return out
        seqs = [sot + [no_timestamps] + text + [eot] for _, sot, text in work]
        with torch.inference_mode():
            logits, qks = self.forward(hidden[[b for b, _, _ in work]].to(self.dtype), seqs)
        for w, (b, sot, text) in enumerate(work):
            win = windows[b]
            frames = int(round((float(win.get("end") or 30.0) - float(win.get("start", 0.0))) * 100))
            n = len(seqs[w])
            weights = torch.stack([qk[w, :n, : max(1, frames // 2)] for qk in qks])
            weights = weights.softmax(dim=-1)
            std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
            weights = median_filter((weights - mean) / std, MEDIAN_WIDTH)
            matrix = weights.mean(0)[len(sot):-1]
            rows, cols = dtw(-matrix.double().cpu().numpy())
            words, wtoks = split_words(self.tokenizer, text + [eot], eot, languages[b])
            if len(wtoks) <= 1:
                continue
            bounds = np.pad(np.cumsum([len(t) for t in wtoks[:-1]]), (1, 0))
            jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
            times = cols[jumps] / TOKENS_PER_SECOND
            probs = logits[w, len(sot):len(sot) + len(text), :eot].softmax(-1)
            tp = probs[torch.arange(len(text)), torch.tensor(text)].tolist()
            t0 = float(win.get("start", 0.0))
            timed = [{"word": word, "tokens": toks, "start": round(t0 + float(times[a]), 3), "end": round(t0 + float(times[z]), 3),
                      "probability": round(float(np.mean(tp[a:z])), 4)}
                     for word, toks, a, z in zip(words[:-1], wtoks[:-1], bounds[:-1], bounds[1:])]
            out[b] = merge_punctuation(timed)
        return out
