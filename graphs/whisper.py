"""Whisper node kinds: encoder (split by attention head group and feed-forward block), the
decode loop (``whisper_loop``: beam search, sampling, temperature fallback; split by decoder
layer, continuous batching), word alignment (``whisper.align``: one extra decoder forward
after the loop) and detokenize (text, segments with their decoding statistics and words,
stitching of long audio).

The math lives in ``whisper_model`` (weights), ``whisper_layers`` (layer blocks),
``whisper_decode`` / ``whisper_search`` (the decoding step, token search), ``whisper_align``
(DTW alignment) and ``whisper_text`` (segments, stitching); they import torch, so they are
imported inside ``setup``/``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port
from mmpipe.graphs.whisper_common import ENCODER_BLOCKS, LANGUAGES, VOCAB, Weights, WhisperModel, model_checks  # noqa: F401  (re-exported)
from mmpipe.graphs.whisper_loop import Decode, DecodeConfig  # noqa: F401  (registers whisper.decode)

@dataclass(kw_only=True)
class EncoderConfig:
    model: WhisperModel = field(default_factory=WhisperModel)  # the model group (model=...)


@register
class Encoder(Weights, NodeKind[EncoderConfig]):
    """The Whisper audio encoder; splittable within layers (each layer is three parts: the
    self-attention over the first half of the heads with the q/k/v projection, over the second
    half with the output projection, and the feed-forward block; the conv stem goes with the
    first piece). tiny.en's 4 layers are 12 parts. A piece that ends between a layer's head
    groups hands on ``h``, ``qkv`` and ``a`` (the first group's attention) instead of ``h``."""

    kind = "whisper.encoder"
    description = "Log-mel features -> encoder hidden states."
    Config = EncoderConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: EncoderConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("features", "float32", ("B", m.n_mels, 3000)),),
            (Port("hidden", "float32", ("B", 1500, m.d_model)),),
        )

    @classmethod
    def num_parts(cls, cfg: EncoderConfig) -> int:
        return ENCODER_BLOCKS * int(cfg.model.encoder_layers)

    @classmethod
    def part_costs(cls, cfg: EncoderConfig) -> list[float]:
        # Per output frame: the first head group ~ 3 d^2 + 1500 d (q/k/v projection, half the
        # scores and values over 1500 frames), the second ~ 1500 d + d^2 (the other half, the
        # output projection), feed-forward ~ 8 d^2; the conv stem ~ 3 d^2 + 6 n_mels d.
        d, m = cfg.model.d_model, cfg.model.n_mels
        mlp = 8 * d * d
        per = [round((3 * d * d + 1500 * d) / mlp, 2), round((1500 * d + d * d) / mlp, 2), 1.0]
        costs = [per[k % ENCODER_BLOCKS] for k in range(cls.num_parts(cfg))]
        costs[0] = round(costs[0] + (3 * d * d + 6 * m * d) / mlp, 2)
        return costs

    @classmethod
    def check(cls, cfg: EncoderConfig) -> list[tuple[str, str, str]]:
        return model_checks(cfg.model)

    def setup(self, device: Any, dtype: Any = None) -> None:
        from mmpipe.graphs.whisper_layers import encoder_part
        from mmpipe.graphs.whisper_model import Loader

        super().setup(device, dtype)
        files = self._files()
        ld = Loader(files, device, self._dtype())
        self.heads = int(files.config["encoder_attention_heads"])
        self.layers = [encoder_part(ld, k) for k in self.parts]
        self.stem = (ld.linear("model.encoder.conv1"), ld.linear("model.encoder.conv2"), ld.t("model.encoder.embed_positions.weight")) if self.is_first else None
        self.norm = ld.norm("model.encoder.layer_norm") if self.is_last else None

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        from mmpipe.graphs.whisper_layers import EncoderState, HeadGroups, encoder_stem

        with torch.inference_mode():
            s: EncoderState
            if self.stem is not None:
                s = encoder_stem(x["features"].to(self._dtype()), *self.stem)
            else:
                s = HeadGroups.from_batch(x)
            for layer in self.layers:
                s = layer(s, self.heads)
            if self.norm is not None:
                assert isinstance(s, torch.Tensor)  # the last part is a feed-forward block
                return {"hidden": self.norm(s)}
            return HeadGroups.to_batch(s)


@dataclass(kw_only=True)
class AlignConfig:
    model: WhisperModel = field(default_factory=WhisperModel)  # the model group (model=...)
    word_timestamps: bool = False  # align words to time (off: the node passes nothing on)


@register
class Align(Weights, NodeKind[AlignConfig]):
    """Word timestamps: cross-attention alignment heads and DTW over the decoded tokens
    (openai-whisper's ``find_alignment``), one decoder forward per window. Windows without
    ``word_timestamps`` pass through untouched, so the node costs nothing when it is off."""

    kind = "whisper.align"
    description = "Decoded tokens + encoder states -> word timings (alignment heads, DTW)."
    Config = AlignConfig
    request_params = ("word_timestamps",)

    @classmethod
    def ports(cls, cfg: AlignConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        return (
            (Port("tokens", "int64", ("B", "N"), collate="list"),
             Port("hidden", "float32", ("B", 1500, cfg.model.d_model)),
             Port("window", "any", None, collate="list", optional=True, doc="audio.log_mel's window (times)")),
            (Port("words", "any", None, collate="list", doc="per window: [{word, start, end, probability, tokens}]"),),
        )

    @classmethod
    def check(cls, cfg: AlignConfig) -> list[tuple[str, str, str]]:
        return model_checks(cfg.model)

    @classmethod
    def is_light(cls, cfg: AlignConfig) -> bool:
        # off (the default), windows pass through: no worker or balancer stage of its own
        # (a request that asks for words still gets them, in the stage it shares)
        return not cfg.word_timestamps

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self._files()  # resolve (and convert) now: a bad model.path fails before any request
        self.aligner: Any = None  # the weights load when a window first asks for words

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        want = []
        for m in meta:
            v = self.param(m, "word_timestamps")
            if not isinstance(v, bool):
                from mmpipe.graphs.base import UserError

                raise UserError("params.word_timestamps", f"request parameter word_timestamps={v!r} is not a bool", "send true or false")
            want.append(v)
        words: list[Any] = [None] * len(meta)
        rows = [i for i, w in enumerate(want) if w]
        if rows:
            if self.aligner is None:
                from mmpipe.graphs.whisper_align import Aligner

                files = self._files()
                self.aligner = Aligner(files, self.device, self._dtype())
                g = files.gen
                self.eot, self.nots = int(g.get("eos_token_id", 50256)), int(g["no_timestamps_token_id"])
                self.id_to_lang = {int(v): str(k).strip("<|>") for k, v in (g.get("lang_to_id") or {}).items()}
            windows = x.get("window") or [{} for _ in meta]
            toks = [[int(t) for t in x["tokens"][i]] for i in rows]
            langs = [next((self.id_to_lang[t] for t in ids if t in self.id_to_lang), None) for ids in toks]
            got = self.aligner.words(x["hidden"][rows], toks, [windows[i] or {} for i in rows], self.eot, self.nots, langs)
            for i, w in zip(rows, got):
                words[i] = w
        return {"words": words}


@dataclass(kw_only=True)
class DetokenizeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)  # the model group (model=...)


@register
class Detokenize(Weights, NodeKind[DetokenizeConfig]):
    """Token ids -> text, and segments (timed by timestamp tokens or words when decoding
    made them) carrying their window's decoding statistics."""

    kind = "whisper.detokenize"
    description = "Token ids -> text and segments."
    Config = DetokenizeConfig
    inputs = (Port("tokens", "int64", ("B", "N"), collate="list"),
              Port("window", "any", None, collate="list", optional=True, doc="audio.log_mel's window (times)"),
              Port("info", "any", None, collate="list", optional=True, doc="whisper.decode's per-window statistics"),
              Port("words", "any", None, collate="list", optional=True, doc="whisper.align's word timings"))
    outputs = (Port("text", "str", None, collate="list"), Port("segments", "any", None, collate="list"),
               Port("language", "str", None, collate="list"))
    light = True

    @classmethod
    def gather(cls, port: str, values: list[Any]) -> Any:
        """Stitch the windows of one recording, in order."""
        from mmpipe.graphs import whisper_text as wt

        if port == "text":
            return wt.gather_text(values)
        if port == "segments":
            return wt.gather_segments(values)
        if port == "language":
            return next((v for v in values if v), None)
        return values

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        files = self._files()
        self.tokenizer = files.tokenizer()
        g = files.gen
        self.eot = int(g.get("eos_token_id", 50256))
        self.ts_begin = int(g["no_timestamps_token_id"]) + 1
        self.id_to_lang = {int(v): str(k).strip("<|>") for k, v in (g.get("lang_to_id") or {}).items()}

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        from mmpipe.graphs import whisper_text as wt

        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        n = len(x["tokens"])
        texts, segs, langs = [], [], []
        windows = x.get("window") or [None] * n
        infos = x.get("info") or [None] * n
        words = x.get("words") or [None] * n
        for ids, win, info, ws in zip(x["tokens"], windows, infos, words):
            ids = [int(t) for t in ids]
            win = win or {"start": 0.0, "end": None}
            timed = any(t >= self.ts_begin for t in ids)
            overlap = float(win.get("overlap", 0.0))
            texts.append(wt.WindowText(decode([t for t in ids if t < self.eot]).strip(), overlap))
            keep = tuple(win.get("keep", (win.get("start", 0.0), win.get("end") or 30.0)))
            seg = wt.segments_of(ids, decode, self.eot, self.ts_begin, win, timed)
            stats = {k: round(float(v), 4) for k, v in (info or {}).items() if k in ("temperature", "avg_logprob", "compression_ratio", "no_speech_prob")}
            # ids count within the window here; gather renumbers the windows of a recording
            seg = [{"id": i, "seek": int(round(float(win.get("start", 0.0)) * 100)), **s, **stats} for i, s in enumerate(seg)]
            if ws is not None:
                wt.attach_words(seg, ws, self.eot)
            segs.append(wt.WindowSegments(seg, keep, overlap, timed))
            langs.append(next((self.id_to_lang[t] for t in ids if t in self.id_to_lang), "en" if not self.id_to_lang else None))
        return {"text": texts, "segments": segs, "language": langs}
