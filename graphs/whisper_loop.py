"""``whisper.decode``: the autoregressive decode loop, split by decoder layer over stages.

Each window is a loop item. The first piece embeds, every piece runs its layers on the
packed rows of the step (``whisper_decode``), the last piece turns logits into the next
tokens (``whisper_search``: greedy, beam search, sampling, temperature fallback,
no-speech). Per-window state lives where it is used: KV caches in every piece's lanes, the
search in the last piece's lane; the carry between pieces is plain data (token ids,
positions, row lists and the packed hidden states).

``condition_on_previous_text``: window k of a request is prompted with the text of its
earlier windows, so it waits (fed nothing) until window k-1 has finished; the last piece
keeps each request's finished windows for that (all windows of a request go to the same
replica). Other requests' windows keep decoding meanwhile. No torch import at module level.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, LoopKind, Port, UserError
from mmpipe.graphs.whisper_common import DECODER_BLOCKS, VOCAB, Weights, WhisperModel, language_problem, model_checks

TEMPERATURES = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # openai-whisper's fallback schedule


@dataclass(kw_only=True)
class DecodeConfig:
    model: WhisperModel = field(default_factory=WhisperModel)  # the model group (model=...)
    max_new_tokens: int = 128  # most tokens per 30 s window
    timestamps: bool = False  # decode timestamp tokens (timed segments)
    # word alignment (whisper.align) needs the timestamp tokens: on, they are decoded too
    word_timestamps: bool = False
    language: str | None = None  # None: detected per window (multilingual models)
    task: str = "transcribe"  # transcribe, or translate (to English; multilingual models)
    beam_size: int = 5  # 1: greedy
    best_of: int = 5  # samples per window at temperature > 0 (the best is kept)
    temperature: float | list[float] = field(default_factory=lambda: list(TEMPERATURES))  # one value, or a fallback schedule tried in order
    top_k: int = 0  # sample among the k most likely tokens (0: all, as openai-whisper)
    compression_ratio_threshold: float | None = 2.4  # retry at the next temperature above this gzip ratio (None: never)
    logprob_threshold: float | None = -1.0  # retry at the next temperature below this mean logprob (None: never)
    no_speech_threshold: float | None = 0.6  # a window this likely silent (and below logprob_threshold) gives no text
    length_penalty: float = 1.0  # score = sum logprob / length ** length_penalty
    initial_prompt: str | None = None  # text that prompts the first window (spelling, names)
    # Prompt each window with its request's earlier text (openai-whisper's default; off here:
    # our windows overlap at cuts inside speech, and tiny models then tend to repeat the prompt).
    condition_on_previous_text: bool = False
    seed: int = 0  # sampling seed of the request (window k draws from seed mixed with k)


REQUEST_PARAMS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.name != "model")


def decode_checks(cfg: DecodeConfig) -> list[tuple[str, str, str]]:
    """Every problem of a decode config (also used for per-request values)."""
    out = []
    if not 0 < cfg.max_new_tokens <= 440:
        out.append(("max_new_tokens", f"must be 1..440 (Whisper has 448 positions, the prompt takes up to 4), got {cfg.max_new_tokens}", "e.g. max_new_tokens=128"))
    if cfg.task not in ("transcribe", "translate"):
        out.append(("task", f"unknown task {cfg.task!r}", "use transcribe or translate"))
    elif cfg.task != "transcribe" and not cfg.model.multilingual:
        out.append(("task", "language/task need a multilingual model", "use model=base"))
    bad_lang = language_problem(cfg.language, cfg.model.multilingual)
    if bad_lang:
        out.append(bad_lang)
    for key in ("beam_size", "best_of"):
        if not 1 <= getattr(cfg, key) <= 32:
            out.append((key, f"must be 1..32, got {getattr(cfg, key)}", f"e.g. {key}=5"))
    temps = cfg.temperature if isinstance(cfg.temperature, list) else [cfg.temperature]
    if not temps or any(not (isinstance(t, (int, float)) and 0.0 <= t <= 10.0) for t in temps):
        out.append(("temperature", f"needs one or more temperatures in 0..10, got {cfg.temperature!r}", "e.g. temperature=[0.0,0.2,0.4,0.6,0.8,1.0] or temperature=0"))
    if cfg.top_k < 0:
        out.append(("top_k", f"must be >= 0, got {cfg.top_k}", "use 0 to sample from all tokens"))
    if cfg.compression_ratio_threshold is not None and cfg.compression_ratio_threshold <= 0:
        out.append(("compression_ratio_threshold", f"must be positive or null, got {cfg.compression_ratio_threshold}", "e.g. 2.4"))
    if cfg.no_speech_threshold is not None and not 0.0 <= cfg.no_speech_threshold <= 1.0:
        out.append(("no_speech_threshold", f"is a probability (0..1) or null, got {cfg.no_speech_threshold}", "e.g. 0.6"))
    for key in ("logprob_threshold", "length_penalty"):
        v = getattr(cfg, key)
        if v is not None and not math.isfinite(v):
            out.append((key, f"must be a finite number, got {v}", "e.g. -1.0" if key == "logprob_threshold" else "e.g. 1.0"))
    if cfg.seed < 0:
        out.append(("seed", f"must be >= 0, got {cfg.seed}", "e.g. seed=0"))
    return out


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` as the config field type ``tp`` (a request's JSON value), else UserError."""
    args = typing.get_args(tp) or (tp,)
    if value is None and type(None) in args:
        return None
    for a in args:
        if a is bool and isinstance(value, bool):
            return value
        if a is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if a is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if a is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if a is str and isinstance(value, str):
            return value
        if typing.get_origin(a) is list and isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
    want = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    raise UserError(f"params.{name}", f"request parameter {name}={value!r} is not a {want}", f"send {name} as a {want}")


def request_config(cfg: DecodeConfig, params: dict[str, Any]) -> DecodeConfig:
    """The recipe's config with a request's overrides, checked like the recipe's values."""
    mine = {k: v for k, v in params.items() if k in REQUEST_PARAMS}
    if not mine:
        return cfg
    hints = typing.get_type_hints(DecodeConfig)
    new = dataclasses.replace(cfg, **{k: _coerce(k, v, hints[k]) for k, v in mine.items()})
    for key, msg, fix in decode_checks(new):
        if key in mine:
            raise UserError(f"params.{key}", msg, fix)
    return new


def options_of(cfg: DecodeConfig) -> Any:
    from mmpipe.graphs.whisper_search import Options

    temps = cfg.temperature if isinstance(cfg.temperature, list) else [cfg.temperature]
    return Options(beam_size=cfg.beam_size, best_of=cfg.best_of, temperatures=tuple(float(t) for t in temps),
                   length_penalty=cfg.length_penalty, top_k=cfg.top_k, compression_ratio_threshold=cfg.compression_ratio_threshold,
                   logprob_threshold=cfg.logprob_threshold, no_speech_threshold=cfg.no_speech_threshold,
                   max_new_tokens=cfg.max_new_tokens, timestamps=cfg.timestamps or cfg.word_timestamps, seed=cfg.seed)


@register
class Decode(Weights, LoopKind[DecodeConfig]):
    """Autoregressive decoding with beam search, sampling and temperature fallback; the
    decoder layers split over stages, one KV-cache block per window, continuous batching."""

    kind = "whisper.decode"
    description = "Encoder hidden states -> token ids (beam search / sampling, fallback, KV cache per lane)."
    Config = DecodeConfig
    splittable = True
    request_params = REQUEST_PARAMS

    @classmethod
    def ports(cls, cfg: DecodeConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        return (
            (Port("hidden", "float32", ("B", 1500, m.d_model)),
             Port("window", "any", None, collate="list", optional=True, doc="audio.log_mel's window (silent windows are not decoded)")),
            (Port("tokens", "int64", ("B", "N"), collate="list"),
             Port("info", "any", None, collate="list", doc="per window: temperature, avg_logprob, compression_ratio, no_speech_prob, skipped")),
        )

    @classmethod
    def num_parts(cls, cfg: DecodeConfig) -> int:
        return DECODER_BLOCKS * int(cfg.model.decoder_layers)

    @classmethod
    def part_costs(cls, cfg: DecodeConfig) -> list[float]:
        # A decode step is memory-bound: the cost hint of a part is what it reads per step.
        # Self-attention: its weights (4 d^2) and short KV caches, plus fixed per-call work
        # (cache writes, masks) worth ~2 windows' encoder states S = 1500 d. Cross-attention:
        # its weights (2 d^2) and ~10 S (the windows' states or their K/V). Feed-forward: its
        # weights (8 d^2). The last part also reads the vocabulary projection (V d). For
        # tiny.en that is 0.19 : 0.67 : 0.13 of a layer and 2.2 layers for the projection;
        # measured (2 windows a step): 0.20 : 0.66 : 0.14 and 1.8. A profile measures them.
        d = cfg.model.d_model
        states = 1500 * d
        per = [4 * d * d + 2 * states, 2 * d * d + 10 * states, 8 * d * d]
        layer = sum(per)
        costs = [round(per[k % DECODER_BLOCKS] / layer, 3) for k in range(cls.num_parts(cfg))]
        costs[-1] += round(VOCAB * d / layer, 2)
        return costs

    @classmethod
    def check(cls, cfg: DecodeConfig) -> list[tuple[str, str, str]]:
        return model_checks(cfg.model) + decode_checks(cfg)

    def setup(self, device: Any, dtype: Any = None) -> None:
        from mmpipe.graphs.whisper_decode import DecoderPiece
        from mmpipe.graphs.whisper_rules import Rules

        super().setup(device, dtype)
        files = self._files()
        self.files = files
        self.piece = DecoderPiece(files, self.parts, self.is_first, self.is_last, device, self._dtype())
        self.rules = Rules.load(files, int(files.config.get("vocab_size", VOCAB)), device)
        if self.rules.multilingual != self.cfg.model.multilingual or self.cfg.model.multilingual and not self.rules.lang_to_id:
            raise UserError("model.multilingual", f"model.multilingual={self.cfg.model.multilingual} but {files.root} is {'multilingual' if self.rules.multilingual else 'English-only'}",
                            "use the matching model group (model=tiny_en or model=base)")
        self.rules.language_id(self.cfg.language) if self.cfg.language else None  # a bad name fails before any request
        self._configs: dict[str, tuple[DecodeConfig, Any]] = {}
        self._prompts: dict[str, list[int]] = {}
        self.history: OrderedDict[str, dict[int, tuple[list[int], float, bool]]] = OrderedDict()
        if self.is_last:
            from mmpipe.graphs.whisper_rules import decode_text

            tok = files.tokenizer()
            self.text_of = lambda ids: decode_text(tok, ids, self.rules.eot)

    # ---- per-window settings ---------------------------------------------------
    def config(self, meta: ItemMeta) -> tuple[DecodeConfig, Any]:
        """The window's config (request overrides applied, checked) and its search options."""
        key = json.dumps({k: meta.params[k] for k in sorted(meta.params) if k in REQUEST_PARAMS}, default=str)
        if key not in self._configs:
            cfg = request_config(self.cfg, meta.params)
            if cfg.language:
                self.rules.language_id(cfg.language, "params.language" if "language" in meta.params else "language")
            self._configs[key] = (cfg, options_of(cfg))
        return self._configs[key]

    def initial_prompt(self, text: str | None) -> list[int]:
        if not text:
            return []
        if text not in self._prompts:
            tok = self.files.tokenizer()
            self._prompts[text] = list(tok.encode(" " + text.strip(), add_special_tokens=False))
        return self._prompts[text]

    def _waits(self, cfg: DecodeConfig, meta: ItemMeta, window: Any) -> str | None:
        """Why the window is not decoded from its prompt at once: "silent" or "wait", else None."""
        if isinstance(window, dict) and window.get("silent"):
            return "silent"
        if cfg.condition_on_previous_text and meta.sub > 0:
            return "wait"
        return None

    def _lang(self, cfg: DecodeConfig) -> int | None:
        return self.rules.language_id(cfg.language) if cfg.language and self.rules.multilingual else None

    # ---- loop protocol ---------------------------------------------------------
    def begin(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        """First piece: the prompt of each entering window (nothing for waiting or silent ones)."""
        from mmpipe.graphs.whisper_decode import ROW_KEYS
        from mmpipe.graphs.whisper_search import Feed, opening

        carry: dict[str, list] = {k: [] for k in ROW_KEYS}
        windows = x.get("window") or [None] * len(meta)
        for m, win in zip(meta, windows):
            cfg, opts = self.config(m)
            if self._waits(cfg, m, win):
                feed = Feed([], 0, 0, [])
            else:
                prefix = self.initial_prompt(cfg.initial_prompt) if m.sub == 0 else []
                _, feed = opening(self.rules, self._lang(cfg), cfg.task, opts.timestamps, prefix)
            for k in ROW_KEYS:
                carry[k].append(getattr(feed, k))
        return carry

    def enter(self, x: Batch, meta: list[ItemMeta], lanes: list[dict]) -> None:
        import torch

        from mmpipe.graphs.whisper_rules import item_seed
        from mmpipe.graphs.whisper_search import Search

        cfgs = [self.config(m) for m in meta]
        windows = x.get("window") or [None] * len(meta)
        # room for a prompt (<|startofprev|> + half the context when conditioned) plus the new tokens
        prefixed = any(c.initial_prompt or (c.condition_on_previous_text and m.sub > 0) for (c, _), m in zip(cfgs, meta))
        head = 4 + (self.piece.max_pos // 2 if prefixed else 0)
        cache_len = min(self.piece.max_pos, head + max(c.max_new_tokens for c, _ in cfgs))
        with torch.inference_mode():
            self.piece.enter(x["hidden"], lanes, [o.rows for _, o in cfgs], cache_len)
        if not self.is_last:
            return
        for lane, m, win, (cfg, opts) in zip(lanes, meta, windows, cfgs):
            s = Search(opts, self.rules, self.text_of, task=cfg.task, lang=self._lang(cfg), seed=item_seed(cfg.seed, m.sub))
            why = self._waits(cfg, m, win)
            if why == "silent":
                s.finish_silent()
            elif why is None:
                s.start(self.initial_prompt(cfg.initial_prompt) if m.sub == 0 else [])
            lane["search"] = s

    def step(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> Batch:
        import torch

        with torch.inference_mode():
            h = self.piece.embed_new(carry) if self.is_first else carry["h"]
            return {**carry, "h": self.piece.layers_step(h, carry, lanes)}

    def end(self, carry: Batch, meta: list[ItemMeta], lanes: list[dict]) -> tuple[Batch, list[bool], Batch]:
        from mmpipe.graphs.whisper_advance import advance

        return advance(self, carry, meta, lanes)

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
