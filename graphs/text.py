"""Text node kinds for diffusion: CLIP ``text.tokenize`` and ``text.encode``,
and the ``text.prompts`` request source.

Both follow ``StableDiffusionPipeline.encode_prompt``: prompts padded to the
tokenizer's 77 tokens and truncated with a warning; the negative prompt ("" by
default) gives the unconditional embeddings for classifier-free guidance.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs import register
from mmpipe.graphs.base import Batch, ItemMeta, NodeKind, Port, Request, SourceKind, UserError
from mmpipe.graphs.diffusion_load import SDModel, check_equal, component, torch_dtype

__all__ = ["SDModel", "Tokenize", "Encode", "Prompts"]

log = logging.getLogger("mmpipe.text")

# The truncation warning quotes at most this many dropped tokens.
EXCERPT_TOKENS = 8


@dataclass(kw_only=True)
class TokenizeConfig:
    model: SDModel = field(default_factory=SDModel)  # the model group (model=...): its CLIP tokenizer


@register
class Tokenize(NodeKind[TokenizeConfig]):
    """CLIP tokenizer: prompt and negative prompt -> padded ids (77, truncated with a warning)."""

    kind = "text.tokenize"
    description = "Prompts -> CLIP token ids."
    Config = TokenizeConfig
    inputs = (Port("prompt", "str", None, collate="list"), Port("negative_prompt", "str", None, collate="list", optional=True))
    light = True

    @classmethod
    def ports(cls, cfg: TokenizeConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        n = cfg.model.max_length
        return cls.inputs, (Port("ids", "int64", ("B", n)), Port("uncond_ids", "int64", ("B", n)))

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self.tok = component(self.cfg.model, "tokenizer", None)
        check_equal("model.max_length", self.cfg.model.max_length, self.tok.model_max_length, "tokenizer")

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        prompts = [str(p) for p in x["prompt"]]
        negs = [str(n) if n is not None else "" for n in (x.get("negative_prompt") or [""] * len(prompts))]
        n = self.tok.model_max_length
        ids = self.tok(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        for m, p in zip(meta, prompts):
            self._warn_truncated(m, p, n)
        uncond = self.tok(negs, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        return {"ids": ids, "uncond_ids": uncond}

    def _warn_truncated(self, m: ItemMeta, prompt: str, n: int) -> None:
        # A CLIP token spans at least one character, so this prefix decides truncation
        # without tokenizing a megabyte prompt in full.
        head = prompt[: EXCERPT_TOKENS * n]
        full = self.tok(head, truncation=False, verbose=False).input_ids
        if len(full) > n:
            # As diffusers, say what was cut (CLIP sees at most n tokens, BOS/EOS included),
            # but quote only its start: the log must stay readable for any prompt.
            dropped = full[n - 1 : -1]
            text = self.tok.decode(dropped[:EXCERPT_TOKENS])
            more = "+" if len(head) < len(prompt) else ""
            log.warning("request %s: prompt truncated to %d CLIP tokens; dropped %d%s tokens starting %r%s", m.request_id, n,
                        len(dropped), more, text, "..." if len(dropped) > EXCERPT_TOKENS or more else "")


@dataclass(kw_only=True)
class EncodeConfig:
    model: SDModel = field(default_factory=SDModel)  # the model group (model=...): its CLIP text encoder
    # As diffusers' clip_skip (conditional prompt only, as there).
    clip_skip: int | None = None


@register
class Encode(NodeKind[EncodeConfig]):
    """CLIP text encoder (conditional and unconditional embeddings in one batched call)."""

    kind = "text.encode"
    description = "CLIP token ids -> text embeddings."
    Config = EncodeConfig

    @classmethod
    def ports(cls, cfg: EncodeConfig) -> tuple[tuple[Port, ...], tuple[Port, ...]]:
        m = cfg.model
        n, d = m.max_length, m.text_hidden
        return (
            (Port("ids", "int64", ("B", n)), Port("uncond_ids", "int64", ("B", n))),
            (Port("embeds", "float32", ("B", n, d)), Port("uncond_embeds", "float32", ("B", n, d))),
        )

    def setup(self, device: Any, dtype: Any = None) -> None:
        super().setup(device, dtype)
        self.dtype = torch_dtype(self.cfg.model, dtype)
        self.enc = component(self.cfg.model, "text_encoder", self.dtype).to(device)
        check_equal("model.text_hidden", self.cfg.model.text_hidden, self.enc.config.hidden_size, "text encoder")

    def forward(self, x: Batch, meta: list[ItemMeta]) -> Batch:
        import torch

        ids, uncond = x["ids"].to(self.device), x["uncond_ids"].to(self.device)
        b = ids.shape[0]
        with torch.inference_mode():
            if self.cfg.clip_skip is None:
                out = self.enc(torch.cat([ids, uncond]))[0]
                return {"embeds": out[:b], "uncond_embeds": out[b:]}
            hs = self.enc(ids, output_hidden_states=True)[-1][-(self.cfg.clip_skip + 1)]
            cond = self.enc.text_model.final_layer_norm(hs)
            return {"embeds": cond, "uncond_embeds": self.enc(uncond)[0]}


@dataclass(kw_only=True)
class PromptsConfig:
    prompt: str | None = None  # one prompt (prompt=...)
    file: str | None = None  # a text file, one prompt per line (prompts=...)
    negative_prompt: str = ""  # what the image should not show
    num_images_per_prompt: int = 1  # images per prompt (each its own seed)
    seed: int = 0  # request n gets seed + n


@register
class Prompts(SourceKind[PromptsConfig]):
    """``prompt="..."`` or ``prompts=file.txt`` (one per line), each repeated
    ``num_images_per_prompt`` times; request n gets seed ``seed + n``, so any
    image can be made again on its own."""

    kind = "text.prompts"
    description = "Text prompts from the command line or a file."
    Config = PromptsConfig
    fields = ("prompt", "negative_prompt")

    @classmethod
    def _prompts(cls, cfg: PromptsConfig) -> list[str]:
        if cfg.file:
            from pathlib import Path

            data = Path(cfg.file).read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise UserError("file", f"prompts file '{cfg.file}' is not UTF-8 text (byte {exc.start}, line {line})",
                                "give a text file with one prompt per line, saved as UTF-8 "
                                "(e.g. iconv -f latin1 -t utf-8 in.txt > out.txt)") from None
            if "\0" in text:
                raise UserError("file", f"prompts file '{cfg.file}' holds NUL bytes: a binary file, not text",
                                "give a text file with one prompt per line")
            return [ln.strip() for ln in text.splitlines() if ln.strip()]
        return [cfg.prompt] if cfg.prompt else []

    @classmethod
    def check(cls, cfg: PromptsConfig) -> list[tuple[str, str, str]]:
        from pathlib import Path

        out = []
        if cfg.file and not Path(cfg.file).is_file():
            out.append(("file", f"prompts file '{cfg.file}' does not exist", "give a text file with one prompt per line"))
        elif cfg.file:
            try:
                if not cls._prompts(cfg):
                    out.append(("file", f"prompts file '{cfg.file}' has no prompt", "write one prompt per line"))
            except UserError as e:
                out.append((e.key, e.message, e.fix))
        elif not cfg.file and not cfg.prompt:
            out.append(("prompt", "no prompt given", 'pass prompt="..." or prompts=file.txt'))
        if cfg.num_images_per_prompt <= 0:
            out.append(("num_images_per_prompt", f"must be positive, got {cfg.num_images_per_prompt}", "e.g. num_images_per_prompt=2"))
        return out

    @classmethod
    def requests(cls, cfg: PromptsConfig) -> list[Request]:
        out = []
        for i, prompt in enumerate(cls._prompts(cfg)):
            for k in range(cfg.num_images_per_prompt):
                n = len(out)
                seed = cfg.seed + n
                out.append(Request(id=f"{n:04d}", values={"prompt": prompt, "negative_prompt": cfg.negative_prompt},
                                   input={"prompt": prompt, "negative_prompt": cfg.negative_prompt, "index": i, "image": k, "seed": seed},
                                   params={"seed": seed}))
        return out
