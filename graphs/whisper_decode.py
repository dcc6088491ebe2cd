"""Greedy Whisper decoding for one piece of the ``whisper.decode`` loop body.

Rows of a step are *ragged*: with continuous batching one step holds items at
different positions (one that just entered feeds its whole prompt, the others
one new token), so the carry packs every item's new tokens into one
``[N, D]`` tensor (``new[i]`` rows for item i, no padding). Linear layers and
norms run on all rows at once. KV caches live per *group* of items that entered
together (``Group``; each item's lane points at its row): cross-attention K/V
computed once on ``enter``, self-attention K/V preallocated and grown per step.
Attention runs once per group present in the step (``Part``), with a mask only
when its rows are at different positions, so a step costs a few kernel calls per
layer however many items it holds.

Token selection (``Rules``) reproduces ``transformers``' Whisper ``generate``
with ``num_beams=1``: suppress_tokens, begin_suppress_tokens at the first
generated position, the timestamp rules of ``WhisperTimeStampLogitsProcessor``
when timestamps are on, language detection as ``detect_language`` does.
Imported lazily (torch at module level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.graphs.base import UserError
from mmpipe.graphs.whisper_model import DecoderLayer, Loader, Norm, WhisperFiles

NEG_INF = float("-inf")
# Carry keys that hold one entry per item (lists); "h" is the packed hidden state.
ROW_KEYS = ("tokens", "new", "begin", "limit", "detect", "stamps")


@dataclass
class Rules:
    """Special token ids and logits processing, read from the generation config."""

    eot: int
    sot: int
    no_timestamps: int
    timestamp_begin: int
    suppress: torch.Tensor  # token ids (long)
    begin_suppress: torch.Tensor  # token ids (long)
    lang_ids: torch.Tensor | None  # the language tokens' ids, ascending (long)
    lang_to_id: dict[str, int]
    task_to_id: dict[str, int]
    multilingual: bool
    max_initial_timestamp: int | None

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
        return cls(eot=eot, sot=int(g.get("decoder_start_token_id", c.get("decoder_start_token_id", 50257))), no_timestamps=nots,
                   timestamp_begin=nots + 1, suppress=id_list(list(g.get("suppress_tokens") or c.get("suppress_tokens") or [])),
                   begin_suppress=id_list(list(g.get("begin_suppress_tokens") or c.get("begin_suppress_tokens") or [])),
                   lang_ids=id_list(list(langs.values())) if langs else None, lang_to_id=langs,
                   task_to_id={str(k): int(v) for k, v in (g.get("task_to_id") or {}).items()},
                   multilingual=bool(g.get("is_multilingual", bool(langs))), max_initial_timestamp=g.get("max_initial_timestamp_index"))

    def language_id(self, language: str) -> int:
        """``en``, ``english`` or ``<|en|>`` -> the language token id (as transformers accepts them)."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        lang = language.lower()
        tok = lang if lang in self.lang_to_id else f"<|{TO_LANGUAGE_CODE.get(lang, lang)}|>"
        if tok not in self.lang_to_id:
            raise UserError("language", f"language '{language}' is not supported by this model", "use a code like en, de, fr (or leave language unset to detect it)")
        return self.lang_to_id[tok]

    def prompt_tail(self, task: str, timestamps: bool) -> list[int]:
        """Tokens after <|sot|><|lang|>: the task (multilingual) and <|notimestamps|> unless timestamps."""
        out = [self.task_to_id[task]] if self.multilingual and self.task_to_id else []
        return out if timestamps else out + [self.no_timestamps]

    def advance(self, carry: dict[str, Any], logits: torch.Tensor, task: str, max_new: int) -> tuple[dict[str, Any], list[bool]]:
        """The next carry (no ``h``) after one step, and which items are done.

        Items still detecting their language get <|lang|> [<|task|>] [<|notimestamps|>]
        (three new tokens to feed); the others get their greedy next token and are done
        at <|endoftext|> or after ``max_new`` generated tokens.
        """
        nxt = {k: [list(v) if isinstance(v, list) else v for v in carry[k]] for k in ROW_KEYS if k != "new"}
        B = logits.shape[0]
        new, done = [1] * B, [False] * B
        det = [i for i, d in enumerate(nxt["detect"]) if d]
        if det:  # as ``detect_language``: the most likely language token, nothing else suppressed
            assert self.lang_ids is not None
            # ids ascending: ties resolve to the lowest id, as argmax over the masked vocabulary
            langs = self.lang_ids[logits[det][:, self.lang_ids].argmax(-1)].tolist()
            for i, lang in zip(det, langs):
                tail = [lang] + self.prompt_tail(task, nxt["stamps"][i])
                nxt["tokens"][i] += tail
                new[i] = len(tail)
                nxt["begin"][i] = len(nxt["tokens"][i])
                nxt["limit"][i] = nxt["begin"][i] + max_new
                nxt["detect"][i] = False
        if len(det) < B:
            picks = self.pick(logits, carry)
            for i, tok in enumerate(picks):
                if i not in det:
                    nxt["tokens"][i].append(tok)
                    done[i] = tok == self.eot or len(nxt["tokens"][i]) >= nxt["limit"][i]
        nxt["new"] = new
        return nxt, done

    def pick(self, logits: torch.Tensor, carry: dict[str, Any]) -> list[int]:
        """Greedy next token per row (float32 logits [B, V]), processors applied in place."""
        # index_fill_ touches only the listed columns (a full-vocabulary mask costs a pass over [B, V])
        logits.index_fill_(1, self.suppress, NEG_INF)
        at_begin = [i for i, (t, b) in enumerate(zip(carry["tokens"], carry["begin"])) if len(t) == b]
        for i in at_begin:
            logits[i].index_fill_(0, self.begin_suppress, NEG_INF)
        stamped = [i for i, s in enumerate(carry["stamps"]) if s]
        if stamped:
            rows = torch.tensor(stamped, device=logits.device)
            sub = logits[rows]
            self._timestamp_rules(sub, [carry["tokens"][i] for i in stamped], [carry["begin"][i] for i in stamped])
            logits[rows] = sub
        return logits.argmax(-1).tolist()

    def _timestamp_rules(self, scores: torch.Tensor, seqs: list[list[int]], begins: list[int]) -> None:
        """``WhisperTimeStampLogitsProcessor`` (per row: items may be at different lengths)."""
        tb = self.timestamp_begin
        scores[:, self.no_timestamps] = NEG_INF
        for k, (full, b) in enumerate(zip(seqs, begins)):
            seq = full[b:]
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
            if len(full) == b:
                scores[k, :tb] = NEG_INF
                if self.max_initial_timestamp is not None:
                    scores[k, tb + int(self.max_initial_timestamp) + 1:] = NEG_INF
        logprobs = F.log_softmax(scores.float(), dim=-1)
        ts_lp = logprobs[:, tb:].logsumexp(dim=-1)
        text_max = logprobs[:, :tb].max(dim=-1).values
        scores[:, :tb].masked_fill_((ts_lp > text_max).unsqueeze(-1), NEG_INF)


@dataclass
class Group:
    """KV caches of the items that entered the loop together (one ``enter`` call).

    Self-attention K/V [G, H, L, dh] per layer grow by each row's new tokens. Attention
    runs once per group on all its G rows (rows not in the step, e.g. finished items,
    are computed and dropped: cheaper than copying cross-attention state), so a step
    costs a few kernel calls per layer however many items it holds.

    Cross-attention starts *lazy*: no K/V are made; a step computes
    ``softmax((q W_k) hidden^T) hidden W_v^T + b_v`` from the encoder states [G, 1500, D]
    (k_proj has no bias; softmax rows sum to 1). That costs ``H`` times the
    attention of cached K/V per token but skips their ``2 * 1500 * D^2`` projection,
    a win for the first ~D/(H-1) tokens (77 for tiny, 73 for base); a group still
    decoding after that many steps gets its K/V then (``cross``), like a rent-or-buy choice.
    """

    hidden: torch.Tensor
    cross: list[tuple[torch.Tensor, torch.Tensor] | None]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    lens: list[int]
    steps: int = 0


class Part:
    """The rows of one step that belong to one group and have the same number of new tokens."""

    def __init__(self, grp: Group, items: list[int], rows: list[int], n: int, offs: list[int], whole: bool, device: torch.device) -> None:
        self.grp, self.rows, self.n = grp, rows, n
        G = len(grp.lens)
        # packed row indices of the members (None: the part is the whole step, in order)
        self.idx = None if whole else torch.tensor([x for i in items for x in range(offs[i], offs[i + 1])], device=device)
        self.full = rows == list(range(G))
        self.r = None if self.full else torch.tensor(rows, device=device)
        t0 = [grp.lens[r] for r in rows]
        self.t0 = t0[0] if len(set(t0)) == 1 else None
        self.tk = max(t0) + n
        cap = grp.kv[0][0].shape[2] if grp.kv else self.tk
        if self.tk > cap:
            raise ValueError(f"KV cache of {cap} positions is full")
        self.causal, self.mask = False, None
        if self.t0 == 0 and n > 1:
            self.causal = True  # a prompt: causal among its tokens, nothing before
        elif self.t0 is None or (n > 1 and self.t0 > 0):
            start = torch.zeros(G, dtype=torch.long)
            start[rows] = torch.tensor(t0)
            allowed = torch.arange(self.tk)[None, None, :] <= start[:, None, None] + torch.arange(n)[None, :, None]
            self.mask = allowed[:, None].to(device)  # [G, 1, n, tk]

    def take(self, x: torch.Tensor, H: int, dh: int) -> torch.Tensor:
        """This part's packed rows of ``x`` [N, D] as [m, H, n, dh]."""
        x = x if self.idx is None else x[self.idx]
        return x.view(len(self.rows), self.n, H, dh).transpose(1, 2)

    def write(self, cache: torch.Tensor, x: torch.Tensor) -> None:
        """Store the members' new keys/values [m, H, n, dh] at each row's position."""
        if self.t0 is not None:
            if self.full:
                cache[:, :, self.t0:self.t0 + self.n] = x
            else:
                cache[self.r, :, self.t0:self.t0 + self.n] = x
            return
        for i, r in enumerate(self.rows):
            t = self.grp.lens[r]
            cache[r, :, t:t + self.n] = x[i]

    def spread(self, q: torch.Tensor) -> torch.Tensor:
        """Queries for all G rows of the group (zeros where a row is not in this step)."""
        if self.full:
            return q
        out = q.new_zeros((len(self.grp.lens),) + tuple(q.shape[1:]))
        out[self.r] = q
        return out

    def gather(self, o: torch.Tensor) -> torch.Tensor:
        return o if self.full else o[self.r]


def plan_parts(new: list[int], lanes: list[dict], device: torch.device) -> list[Part]:
    """Split a step's items by group (and by new-token count within a group)."""
    offs = [0]
    for n in new:
        offs.append(offs[-1] + n)
    keys: dict[tuple[int, int], tuple[Group, list[int], list[int]]] = {}
    for i, (lane, n) in enumerate(zip(lanes, new)):
        grp = lane["group"]
        _, items, rows = keys.setdefault((id(grp), n), (grp, [], []))
        items.append(i)
        rows.append(lane["row"])
    whole = len(keys) == 1
    return [Part(g, items, rows, n, offs, whole and items == list(range(len(new))), device) for (_, n), (g, items, rows) in keys.items()]


class DecoderPiece:
    """Weights and per-step math of decoder layers ``parts`` (+ embeddings / logits at the ends)."""

    def __init__(self, files: WhisperFiles, parts: range, first: bool, last: bool, device: torch.device, dtype: torch.dtype) -> None:
        ld = Loader(files, device, dtype)
        c = files.config
        self.heads = int(c["decoder_attention_heads"])
        self.d = int(c["d_model"])
        self.max_pos = int(c.get("max_target_positions", 448))
        self.layers = [DecoderLayer.load(ld, i) for i in parts]
        self.dtype, self.device = dtype, device
        self.buy_after = self.d // max(1, self.heads - 1)  # steps after which cached K/V pay off (see Group)
        # The token embedding is needed to embed (first piece) and, when tied, to project to
        # logits (last piece); the weak tensor cache makes both one tensor on one device.
        self.embed = ld.t("model.decoder.embed_tokens.weight") if first else None
        self.positions = ld.t("model.decoder.embed_positions.weight") if first else None
        self.norm: Norm | None = ld.norm("model.decoder.layer_norm") if last else None
        self.proj = (ld.t("model.decoder.embed_tokens.weight" if files.tied else "proj_out.weight")) if last else None

    # ---- lanes ---------------------------------------------------------------
    def enter(self, hidden: torch.Tensor, lanes: list[dict], cache_len: int) -> None:
        """KV caches of items entering together: one ``Group``, each lane points at its row."""
        B, T, D = hidden.shape
        H, dh = self.heads, D // self.heads
        # zeros, not empty: rows attended but discarded must not hold NaN bit patterns
        kv = [(torch.zeros(B, H, cache_len, dh, dtype=self.dtype, device=self.device),
               torch.zeros(B, H, cache_len, dh, dtype=self.dtype, device=self.device)) for _ in self.layers]
        grp = Group(hidden.to(self.dtype).contiguous(), [None] * len(self.layers), kv, [0] * B)
        for r, lane in enumerate(lanes):
            lane["group"], lane["row"] = grp, r

    # ---- one step --------------------------------------------------------------
    def embed_new(self, carry: dict[str, Any]) -> torch.Tensor:
        """Token + position embeddings of every item's new tokens, packed [N, D]."""
        assert self.embed is not None and self.positions is not None
        ids: list[int] = []
        pos: list[int] = []
        for toks, n in zip(carry["tokens"], carry["new"]):
            start = len(toks) - n
            ids += toks[start:]
            pos += range(start, len(toks))
        if pos and max(pos) >= self.positions.shape[0]:
            raise ValueError(f"decoder position {max(pos)} exceeds the model's {self.positions.shape[0]} positions")
        dev = self.embed.device
        return self.embed[torch.tensor(ids, device=dev)] + self.positions[torch.tensor(pos, device=dev)]

    def layers_step(self, h: torch.Tensor, new: list[int], lanes: list[dict]) -> torch.Tensor:
        """Run this piece's layers on the packed rows ``h`` [N, D]; grows the groups' caches."""
        D, H = self.d, self.heads
        dh = D // H
        scale = dh**-0.5
        h = h.to(self.dtype)
        parts = plan_parts(new, lanes, h.device)
        N = h.shape[0]

        def attend(q: torch.Tensor, j: int, cross: bool, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
            out = None if len(parts) == 1 and parts[0].idx is None else torch.empty(N, D, dtype=q.dtype, device=q.device)
            for p in parts:
                qg = p.take(q, H, dh)
                if cross:
                    kv = p.grp.cross[j]
                    if kv is None and p.grp.steps >= self.buy_after:
                        kv = p.grp.cross[j] = self.cross_kv(p.grp.hidden, self.layers[j])
                    if kv is None:
                        o = self.lazy_cross(p.spread(qg), p.grp.hidden, self.layers[j])
                        o = p.gather(o).transpose(1, 2).reshape(-1, D)
                        if out is None:
                            return o
                        out[p.idx] = o
                        continue
                    K, V = kv
                    mask, causal = None, False
                else:
                    K, V = p.grp.kv[j]
                    p.write(K, p.take(k, H, dh))
                    p.write(V, p.take(v, H, dh))
                    K, V = K[:, :, : p.tk], V[:, :, : p.tk]
                    mask, causal = p.mask, p.causal
                o = F.scaled_dot_product_attention(p.spread(qg), K, V, attn_mask=mask, is_causal=causal, scale=1.0)
                o = p.gather(o).transpose(1, 2).reshape(-1, D)
                if out is None:
                    return o
                out[p.idx] = o
            assert out is not None
            return out

        for j, L in enumerate(self.layers):
            q, k, v = L.qkv(L.ln1(h)).split(D, dim=-1)
            h = h + L.out(attend(q * scale, j, False, k, v))
            h = h + L.xout(attend(L.xq(L.ln2(h)) * scale, j, True))
            h = h + L.fc2(F.gelu(L.fc1(L.ln3(h))))
        for p in parts:
            for r in p.rows:
                p.grp.lens[r] += p.n
        for g in {id(p.grp): p.grp for p in parts}.values():
            g.steps += 1
        return h

    def cross_kv(self, hidden: torch.Tensor, L: DecoderLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K, V [G, H, T, dh] of one layer (the cached form)."""
        G, T, D = hidden.shape
        k, v = L.xkv(hidden).split(D, dim=-1)
        return k.view(G, T, self.heads, -1).transpose(1, 2), v.view(G, T, self.heads, -1).transpose(1, 2)

    def lazy_cross(self, q: torch.Tensor, hidden: torch.Tensor, L: DecoderLayer) -> torch.Tensor:
        """Cross-attention [G, H, n, dh] straight from the encoder states (no K/V made)."""
        G, H, n, dh = q.shape
        D = H * dh
        wk = L.xkv.w[:D].view(H, dh, D)
        wv = L.xkv.w[D:].view(H, dh, D)
        assert L.xkv.b is not None
        qk = torch.matmul(q, wk).reshape(G, H * n, D)  # q W_k per head
        p = torch.matmul(qk, hidden.transpose(1, 2)).softmax(dim=-1)  # [G, H n, T]
        ctx = torch.matmul(p, hidden).view(G, H, n, D)
        return torch.matmul(ctx, wv.transpose(1, 2)) + L.xkv.b[D:].view(H, 1, dh)

    def logits(self, h: torch.Tensor, new: list[int]) -> torch.Tensor:
        """float32 logits [B, V] at each item's last new row."""
        assert self.norm is not None and self.proj is not None
        last = torch.tensor([sum(new[: i + 1]) - 1 for i in range(len(new))], device=h.device)
        return F.linear(self.norm(h[last]), self.proj).float()


def select_carry(carry: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """Rows of a carry; the packed ``h`` is cut by each item's ``new`` count."""
    out = {k: [carry[k][i] for i in rows] for k in ROW_KEYS if k in carry}
    if "h" in carry:
        offs = [0]
        for n in carry["new"]:
            offs.append(offs[-1] + n)
        idx = [r for i in rows for r in range(offs[i], offs[i + 1])]
        out["h"] = carry["h"][torch.tensor(idx, dtype=torch.long, device=carry["h"].device)]
    return out


def concat_carries(carries: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of several carries in one (lists joined, packed rows concatenated)."""
    if len(carries) == 1:
        return carries[0]
    out = {k: [x for c in carries for x in c[k]] for k in ROW_KEYS if k in carries[0]}
    if "h" in carries[0]:
        out["h"] = torch.cat([c["h"] for c in carries])
    return out
