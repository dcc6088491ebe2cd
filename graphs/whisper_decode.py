"""The math of one ``whisper.decode`` piece: decoder layers over a ragged, packed step.

A step holds *units*: the live rows (beams, samples) of the windows in the step. With
continuous batching the units sit at different positions (a window that just entered feeds
its whole prompt, the others one new token), so the carry packs every unit's new tokens
into one ``[N, D]`` tensor (no padding). Linear layers and norms run on all rows at once.

KV caches live per *group* of windows that entered together (``Group``): every window owns
a block of ``rows`` cache rows (its beams or samples; each window's lane points at its
block). Self-attention K/V are preallocated; before a step a window's rows may be reordered
(beam search: row r continues the past of row ``src[r]``), a copy of the positions written
so far. Cross-attention reads the window's encoder states once for all its rows: the rows'
queries are stacked along the query axis, so five beams cost one pass over 1500 frames.
Attention runs once per group and new-token count (``Part``), with a mask only when its rows
are at different positions. Imported lazily (torch at module level).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.graphs.whisper_layers import DecoderBlock, DecoderCross, DecoderSelf, decoder_block
from mmpipe.graphs.whisper_model import Linear, Loader, Norm, WhisperFiles

# Carry keys that hold one entry per window (see whisper_search.Feed); "h" is the packed state.
ROW_KEYS = ("feed", "n", "pos", "rows", "src", "sot")


@dataclass
class Group:
    """KV caches of the windows that entered the loop together (one ``enter`` call).

    Self-attention K/V [R, H, L, dh] per self-attention part of the piece, R = the windows'
    rows together, L = ``cache_len``. Attention runs over all R rows (rows not in the step,
    e.g. finished windows', are computed and dropped: cheaper than copying), so a step costs
    a few kernel calls per layer however many it holds.

    Cross-attention starts *lazy*: no K/V are made; a step computes
    ``softmax((q W_k) hidden^T) hidden W_v^T + b_v`` from the encoder states [G, 1500, D]
    (k_proj has no bias; softmax rows sum to 1). That costs ``H`` times the attention of
    cached K/V per query but skips their ``2 * 1500 * D^2`` projection, a win for the first
    ~D/(H-1) steps (77 for tiny, 73 for base); a group still decoding after that many steps
    gets its K/V then (``cross``), like a rent-or-buy choice.
    """

    hidden: torch.Tensor
    cross: list[tuple[torch.Tensor, torch.Tensor] | None]  # per cross-attention part
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per self-attention part
    row0: list[int]  # first cache row of each window
    num_rows: int  # R
    cache_len: int
    steps: int = 0


class Part:
    """The units of one step that belong to one group and feed the same number of tokens."""

    def __init__(self, grp: Group, packed: list[int], crows: list[int], gs: list[int], slots: list[int], pos: list[int],
                 n: int, whole: bool, device: torch.device) -> None:
        self.grp, self.n, self.crows = grp, n, crows
        R, G = grp.num_rows, grp.hidden.shape[0]
        # packed row indices of the units' tokens (None: the part is the whole step, in order)
        self.idx = None if whole else torch.tensor([x for p in packed for x in range(p, p + n)], device=device)
        self.full = crows == list(range(R))
        self.r = None if self.full else torch.tensor(crows, device=device)
        self.pos = pos
        self.t0 = pos[0] if len(set(pos)) == 1 else None
        self.tk = max(pos) + n
        if self.tk > grp.cache_len:
            raise ValueError(f"KV cache of {grp.cache_len} positions is full")
        self.causal, self.mask = False, None
        if self.t0 == 0 and n > 1:
            self.causal = True  # a prompt: causal among its tokens, nothing before
        elif self.t0 is None or (n > 1 and self.t0 > 0):
            start = torch.zeros(R, dtype=torch.long)
            start[crows] = torch.tensor(pos)
            allowed = torch.arange(self.tk)[None, None, :] <= start[:, None, None] + torch.arange(n)[None, :, None]
            self.mask = allowed[:, None].to(device)  # [R, 1, n, tk]
        # cross-attention: units stacked per window (slot s of window g), over the windows present
        self.U = max(slots) + 1
        present = sorted(set(gs))
        # few windows of a big group left: gather theirs (a copy as big as the attention
        # itself, so only when it halves the work); else attend over all G and drop the rest
        self.sub = present if len(present) * 2 <= G and len(present) < G else None
        where = {g: i for i, g in enumerate(self.sub)} if self.sub is not None else None
        self.gi = [where[g] for g in gs] if where is not None else gs
        self.Gx = len(present) if self.sub is not None else G
        self.slots = slots
        self.dense = self.Gx * self.U == len(gs) and self.gi == [g for g in range(self.Gx) for _ in range(self.U)] \
            and slots == list(range(self.U)) * self.Gx
        if not self.dense:
            self.gt = torch.tensor(self.gi, device=device)
            self.st = torch.tensor(slots, device=device)
        self.subt = torch.tensor(self.sub, device=device) if self.sub is not None else None

    def take(self, x: torch.Tensor, H: int, dh: int) -> torch.Tensor:
        """This part's packed rows of ``x`` [N, D] as [m, H, n, dh] (one per unit)."""
        x = x if self.idx is None else x[self.idx]
        return x.view(len(self.crows), self.n, H, dh).transpose(1, 2)

    def write(self, cache: torch.Tensor, x: torch.Tensor) -> None:
        """Store the units' new keys/values [m, H, n, dh] at each unit's position."""
        if self.t0 is not None:
            if self.full:
                cache[:, :, self.t0:self.t0 + self.n] = x
            else:
                cache[self.r, :, self.t0:self.t0 + self.n] = x
            return
        for i, (r, t) in enumerate(zip(self.crows, self.pos)):
            cache[r, :, t:t + self.n] = x[i]

    def spread(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [m, H, n, dh] for all R cache rows (zeros where a row is not in this step)."""
        if self.full:
            return q
        out = q.new_zeros((self.grp.num_rows,) + tuple(q.shape[1:]))
        out[self.r] = q
        return out

    def gather(self, o: torch.Tensor) -> torch.Tensor:
        return o if self.full else o[self.r]

    def stack(self, q: torch.Tensor) -> torch.Tensor:
        """Units' queries [m, H, n, dh] -> per window [Gx, H, U*n, dh] (rows stacked)."""
        m, H, n, dh = q.shape
        if self.dense:
            return q.view(self.Gx, self.U, H, n, dh).transpose(1, 2).reshape(self.Gx, H, self.U * n, dh)
        out = q.new_zeros((self.Gx, self.U, H, n, dh))
        out[self.gt, self.st] = q
        return out.transpose(1, 2).reshape(self.Gx, H, self.U * n, dh)

    def unstack(self, o: torch.Tensor) -> torch.Tensor:
        """Inverse of ``stack`` for the attention output: [Gx, H, U*n, dh] -> [m, H, n, dh]."""
        Gx, H, _, dh = o.shape
        o = o.view(Gx, H, self.U, self.n, dh).transpose(1, 2)
        if self.dense:
            return o.reshape(Gx * self.U, H, self.n, dh)
        return o[self.gt, self.st]


def plan_parts(carry: dict[str, Any], lanes: list[dict], device: torch.device) -> list[Part]:
    """Split a step's units by group and new-token count."""
    keys: dict[tuple[int, int], tuple[Group, list[list[int]]]] = {}
    off = 0
    order: list[tuple[int, int]] = []
    for lane, n, pos, rows in zip(lanes, carry["n"], carry["pos"], carry["rows"]):
        if not rows:  # a window waiting or silent: nothing to run
            continue
        grp: Group = lane["group"]
        key = (id(grp), n)
        if key not in keys:
            keys[key] = (grp, [[], [], [], [], []])
            order.append(key)
        cols = keys[key][1]
        for slot, r in enumerate(rows):
            cols[0].append(off)
            cols[1].append(grp.row0[lane["g"]] + r)
            cols[2].append(lane["g"])
            cols[3].append(slot)
            cols[4].append(pos)
            off += n
    whole = len(keys) == 1
    parts = []
    for key in order:
        grp, (packed, crows, gs, slots, pos) = keys[key]
        in_order = whole and packed == [i * key[1] for i in range(len(packed))]
        parts.append(Part(grp, packed, crows, gs, slots, pos, key[1], in_order, device))
    return parts


class DecoderPiece:
    """Weights and per-step math of decoder parts ``parts`` (+ embeddings / logits at the ends).

    Each layer is three parts, its self-attention, cross-attention and feed-forward blocks
    (``decoder_block``), so a pipeline can cut a layer; a piece holds the KV caches of its
    own attention blocks only."""

    def __init__(self, files: WhisperFiles, parts: range, first: bool, last: bool, device: torch.device, dtype: torch.dtype) -> None:
        ld = Loader(files, device, dtype)
        c = files.config
        self.heads = int(c["decoder_attention_heads"])
        self.d = int(c["d_model"])
        self.max_pos = int(c.get("max_target_positions", 448))
        self.blocks: list[DecoderBlock] = [decoder_block(ld, k) for k in parts]
        self.num_self = sum(isinstance(b, DecoderSelf) for b in self.blocks)
        self.cross_blocks = [b for b in self.blocks if isinstance(b, DecoderCross)]
        self.dtype, self.device = dtype, device
        self.buy_after = self.d // max(1, self.heads - 1)  # steps after which cached K/V pay off (see Group)
        # The token embedding is needed to embed (first piece) and, when tied, to project to
        # logits (last piece); the weak tensor cache makes both one tensor on one device.
        self.embed = ld.t("model.decoder.embed_tokens.weight") if first else None
        self.positions = ld.t("model.decoder.embed_positions.weight") if first else None
        self.norm: Norm | None = ld.norm("model.decoder.layer_norm") if last else None
        self.proj: Linear | None = ld.projection("model.decoder.embed_tokens.weight" if files.tied else "proj_out.weight") if last else None

    # ---- lanes ---------------------------------------------------------------
    def enter(self, hidden: torch.Tensor, lanes: list[dict], rows: list[int], cache_len: int) -> None:
        """KV caches of windows entering together: one ``Group``, ``rows[i]`` cache rows for window i."""
        B, T, D = hidden.shape
        H, dh = self.heads, D // self.heads
        row0 = [sum(rows[:i]) for i in range(B)]
        R = sum(rows)
        # zeros, not empty: rows attended but discarded must not hold NaN bit patterns
        kv = [(torch.zeros(R, H, cache_len, dh, dtype=self.dtype, device=self.device),
               torch.zeros(R, H, cache_len, dh, dtype=self.dtype, device=self.device)) for _ in range(self.num_self)]
        grp = Group(hidden.to(self.dtype).contiguous(), [None] * len(self.cross_blocks), kv, row0, R, cache_len)
        for g, lane in enumerate(lanes):
            lane["group"], lane["g"] = grp, g

    # ---- one step --------------------------------------------------------------
    def embed_new(self, carry: dict[str, Any]) -> torch.Tensor:
        """Token + position embeddings of every unit's new tokens, packed [N, D]."""
        assert self.embed is not None and self.positions is not None
        ids: list[int] = []
        pos: list[int] = []
        for feed, n, p, rows in zip(carry["feed"], carry["n"], carry["pos"], carry["rows"]):
            ids += feed
            pos += list(range(p, p + n)) * len(rows)
        if pos and max(pos) >= self.positions.shape[0]:
            raise ValueError(f"decoder position {max(pos)} exceeds the model's {self.positions.shape[0]} positions")
        dev = self.embed.device
        return self.embed[torch.tensor(ids, dtype=torch.long, device=dev)] + self.positions[torch.tensor(pos, dtype=torch.long, device=dev)]

    def reorder(self, carry: dict[str, Any], lanes: list[dict]) -> None:
        """Rows that continue another row's past (beam search) copy its keys/values first."""
        moves: dict[int, tuple[Group, list[int], list[int], int]] = {}
        for lane, src, rows, pos in zip(lanes, carry["src"], carry["rows"], carry["pos"]):
            if src is None:
                continue
            grp: Group = lane["group"]
            base = grp.row0[lane["g"]]
            pairs = [(base + r, base + s) for r, s in zip(rows, src) if r != s]
            if not pairs:
                continue
            _, dst, srcs, top = moves.setdefault(id(grp), (grp, [], [], 0))
            dst += [d for d, _ in pairs]
            srcs += [s for _, s in pairs]
            moves[id(grp)] = (grp, dst, srcs, max(top, pos))
        for grp, dst, srcs, top in moves.values():
            di = torch.tensor(dst, device=self.device)
            si = torch.tensor(srcs, device=self.device)
            for K, V in grp.kv:
                K[di, :, :top] = K[si, :, :top]  # advanced indexing on the right copies first
                V[di, :, :top] = V[si, :, :top]

    def layers_step(self, h: torch.Tensor, carry: dict[str, Any], lanes: list[dict]) -> torch.Tensor:
        """Run this piece's blocks on the packed rows ``h`` [N, D]; writes the units' keys/values."""
        D, H = self.d, self.heads
        dh = D // H
        scale = dh**-0.5
        h = h.to(self.dtype)
        N = h.shape[0]
        if N == 0:  # only waiting windows in this step
            return h
        if not (self.num_self or self.cross_blocks):  # feed-forward blocks only: row by row
            for b in self.blocks:
                h = b(h)
            return h
        self.reorder(carry, lanes)
        parts = plan_parts(carry, lanes, h.device)

        def attend(q: torch.Tensor, j: int, cross: bool, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
            out = None if len(parts) == 1 and parts[0].idx is None else torch.empty(N, D, dtype=q.dtype, device=q.device)
            for p in parts:
                qg = p.take(q, H, dh)
                if cross:
                    o = p.unstack(self.cross(p, p.stack(qg), j))
                else:
                    K, V = p.grp.kv[j]
                    p.write(K, p.take(k, H, dh))
                    p.write(V, p.take(v, H, dh))
                    K, V = K[:, :, : p.tk], V[:, :, : p.tk]
                    o = F.scaled_dot_product_attention(p.spread(qg), K, V, attn_mask=p.mask, is_causal=p.causal, scale=1.0)
                    o = p.gather(o)
                o = o.transpose(1, 2).reshape(-1, D)
                if out is None:
                    return o
                out[p.idx] = o
            assert out is not None
            return out

        js = jx = 0  # this piece's self- / cross-attention block index (its caches)
        for b in self.blocks:
            if isinstance(b, DecoderSelf):
                q, k, v = b.qkv(b.ln1(h)).split(D, dim=-1)
                h = h + b.out(attend(q * scale, js, False, k, v))
                js += 1
            elif isinstance(b, DecoderCross):
                h = h + b.xout(attend(b.xq(b.ln2(h)) * scale, jx, True))
                jx += 1
            else:
                h = b(h)
        for g in {id(p.grp): p.grp for p in parts}.values():
            g.steps += 1
        return h

    def cross(self, p: Part, q: torch.Tensor, j: int) -> torch.Tensor:
        """Cross-attention of the stacked queries ``q`` [Gx, H, U*n, dh] of the piece's ``j``-th cross block."""
        grp, L = p.grp, self.cross_blocks[j]
        kv = grp.cross[j]
        if kv is None and grp.steps >= self.buy_after:
            kv = grp.cross[j] = self.cross_kv(grp.hidden, L)
        if kv is None:
            hidden = grp.hidden if p.subt is None else grp.hidden[p.subt]
            return self.lazy_cross(q, hidden, L)
        K, V = kv
        if p.subt is not None:
            K, V = K[p.subt], V[p.subt]
        return F.scaled_dot_product_attention(q, K, V, scale=1.0)

    def cross_kv(self, hidden: torch.Tensor, L: DecoderCross) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K, V [G, H, T, dh] of one layer (the cached form)."""
        G, T, D = hidden.shape
        k, v = L.xkv(hidden).split(D, dim=-1)
        return k.view(G, T, self.heads, -1).transpose(1, 2), v.view(G, T, self.heads, -1).transpose(1, 2)

    def lazy_cross(self, q: torch.Tensor, hidden: torch.Tensor, L: DecoderCross) -> torch.Tensor:
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

    def logits(self, h: torch.Tensor, carry: dict[str, Any]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """float32 logits [units, V] at each unit's last new token, and per window that asked
        for it (``sot`` >= 0) the logits at its <|startoftranscript|> token."""
        assert self.norm is not None and self.proj is not None
        last, sot_rows, sot_of = [], [], []
        off = 0
        for i, (n, rows, sot) in enumerate(zip(carry["n"], carry["rows"], carry["sot"])):
            if sot >= 0 and rows:
                sot_rows.append(off + sot)
                sot_of.append(i)
            for _ in rows:
                off += n
                last.append(off - 1)
        picks = torch.tensor(last + sot_rows, dtype=torch.long, device=h.device)
        out = self.proj(self.norm(h[picks])).float()
        k = len(last)
        return out[:k], {i: out[k + j] for j, i in enumerate(sot_of)}


def packed_sizes(carry: dict[str, Any]) -> list[int]:
    return [n * len(rows) for n, rows in zip(carry["n"], carry["rows"])]


def select_carry(carry: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """Windows ``rows`` of a carry; the packed ``h`` is cut by each window's share."""
    out = {k: [carry[k][i] for i in rows] for k in ROW_KEYS if k in carry}
    if "h" in carry:
        offs = [0]
        for s in packed_sizes(carry):
            offs.append(offs[-1] + s)
        idx = [r for i in rows for r in range(offs[i], offs[i + 1])]
        out["h"] = carry["h"][torch.tensor(idx, dtype=torch.long, device=carry["h"].device)]
    return out


def concat_carries(carries: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows of several carries in one (lists joined, packed rows concatenated)."""
    if len(carries) == 1:
        return carries[0]
    out = {k: [x for c in carries for x in c[k]] for k in ROW_KEYS if k in carries[0]}
    if "h" in carries[0]:
        out["h"] = torch.cat([c["h"] for c in carries])
    return out
