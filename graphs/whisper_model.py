"""Whisper weights for pipeline pieces: path resolution, per-tensor loading, and the
linear and norm structs a ``Loader`` makes (the layer blocks are in ``whisper_layers``).

A piece loads only the tensors of its own layers, straight from the safetensors
file(s), so a 4-stage split never holds (or reads) the whole model 4 times.
Tensors are shared through a weak cache keyed by (directory, key, device,
dtype): two pieces on one device that both need the token embedding (the first
decoder piece embeds, the last one projects to logits) hold one copy, and a
tensor no piece uses any more is freed.

Imported lazily (it imports torch at module level).
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.graphs.base import UserError

LN_EPS = 1e-5
_LOCK = threading.RLock()
_RESOLVED: dict[str, Path] = {}
_FILES: dict[Path, "WhisperFiles"] = {}
_TENSORS: "weakref.WeakValueDictionary[tuple[str, str, str, str], torch.Tensor]" = weakref.WeakValueDictionary()


# ---------------------------------------------------------------- resolving model paths
def resolve_model_dir(path: str) -> Path:
    """A transformers directory for ``model.path`` (package:NAME, CT2 dir, HF dir or hub id).

    Raises ``UserError`` (CLI exit 2) with a fix when the model cannot be found.
    """
    with _LOCK:
        if path in _RESOLVED:
            return _RESOLVED[path]
        out = _resolve(path)
        _RESOLVED[path] = out
        return out


def _resolve(path: str) -> Path:
    from mmpipe.graphs import model_store as store
    from mmpipe.graphs import whisper_ct2 as ct2

    key = "model.path"
    if path.startswith("package:"):
        name = path.split(":", 1)[1]
        try:
            return _converted(store.packaged_model_dir(name))
        except store.ModelNotFoundError as e:
            raise UserError(key, str(e), f"install the package, or set model.path to a local Whisper directory (known packages: {', '.join(store.PACKAGED_MODELS)})") from None
    p = Path(path).expanduser()
    if p.exists():
        if ct2.is_ct2_dir(p):
            return _converted(p)
        if (p / "config.json").is_file():
            return p
        raise UserError(key, f"'{path}' is neither a transformers Whisper directory (config.json) nor a CTranslate2 one (model.bin + config.json)",
                        "point model.path at a directory written by save_pretrained or by faster-whisper/CTranslate2")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(key, f"model directory '{path}' does not exist", "check the path, or use model=tiny_en (shipped as a Python package)")
    return _from_hub(path)


def _converted(src: Path) -> Path:
    """``ensure_converted``, with a damaged or foreign model.bin as a user error naming it."""
    from mmpipe.graphs import model_store as store
    from mmpipe.graphs import whisper_ct2 as ct2
    from mmpipe.graphs.ct2_reader import CT2FormatError

    try:
        return ct2.ensure_converted(src)
    except (CT2FormatError, ct2.CT2ConversionError) as e:
        raise UserError("model.path", f"{src / 'model.bin'} is not a CTranslate2 Whisper model this converter reads: {e}",
                        store.damaged_fix(src / "model.bin", "the CTranslate2 model (e.g. ct2-transformers-converter)")) from None


def _damaged(path: Path, e: Exception) -> UserError:
    """A weights file that cannot be read, as a user error naming it with a fix."""
    from mmpipe.graphs import model_store as store

    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError("model.path", f"cannot read weights file {path}: {first}", store.damaged_fix(path, "the model"))


def _from_hub(repo: str) -> Path:
    """A hub id, from the local Hugging Face cache or the hub (safetensors only)."""
    try:
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.tiktoken"]))
    except Exception as e:  # offline, unknown repo, auth: all the user's to fix
        raise UserError("model.path", f"cannot get '{repo}' from the Hugging Face hub or its cache: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        "download it once (huggingface-cli download REPO) or use a local directory / model=tiny_en") from None
    if not (d / "config.json").is_file():
        raise UserError("model.path", f"hub repo '{repo}' has no config.json", "use a transformers Whisper checkpoint")
    return d


# ---------------------------------------------------------------- files and tensors
class WhisperFiles:
    """One resolved model directory: configs, special token ids and lazy tensor access."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config: dict[str, Any] = json.loads((root / "config.json").read_text())
        gen_file = root / "generation_config.json"
        self.gen: dict[str, Any] = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        self._where = self._index()
        self._handles: dict[Path, Any] = {}
        self._tokenizer: Any = None

    def _index(self) -> dict[str, Path]:
        """Tensor name -> safetensors file (single file or sharded index)."""
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            return {k: self.root / f for k, f in wm.items()}
        single = self.root / "model.safetensors"
        if not single.is_file():
            raise UserError("model.path", f"{self.root} has no model.safetensors", "save the model with save_pretrained(safe_serialization=True)")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), "pt") as f:
                return {k: single for k in f.keys()}
        except (SafetensorError, OSError) as e:  # truncated, or not a safetensors file at all
            raise _damaged(single, e) from None

    def has(self, key: str) -> bool:
        return self._norm(key) is not None

    def _norm(self, key: str) -> str | None:
        # Checkpoints differ in the "model." prefix (WhisperModel vs ...ForConditionalGeneration).
        for k in (key, key.removeprefix("model.")):
            if k in self._where:
                return k
        return None

    def tensor(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One weight on ``device`` in ``dtype``; shared with other pieces while any holds it."""
        k = self._norm(key)
        if k is None:
            raise KeyError(f"{self.root}: checkpoint has no tensor {key}")
        ck = (str(self.root), k, str(device), str(dtype))
        with _LOCK:
            t = _TENSORS.get(ck)
            if t is None:
                from safetensors import SafetensorError, safe_open

                f = self._where[k]
                try:
                    if f not in self._handles:
                        self._handles[f] = safe_open(str(f), "pt")
                    raw = self._handles[f].get_tensor(k)
                except (SafetensorError, OSError) as e:  # a shard damaged after indexing
                    raise _damaged(f, e) from None
                t = raw.to(device=device, dtype=dtype).contiguous()
                _TENSORS[ck] = t
            return t

    def derived(self, key: str, what: str, device: torch.device, dtype: torch.dtype, make: Any) -> torch.Tensor:
        """A tensor made from weight ``key`` (e.g. prepacked), shared while any piece holds it."""
        ck = (str(self.root), f"{key}#{what}", str(device), str(dtype))
        with _LOCK:
            t = _TENSORS.get(ck)
            if t is None:
                t = make()
                _TENSORS[ck] = t
            return t

    def tokenizer(self) -> Any:
        """What decodes and encodes text: ``decode(ids, skip_special_tokens)`` and
        ``encode(text, add_special_tokens)``, as transformers' ``WhisperTokenizerFast`` does."""
        with _LOCK:
            if self._tokenizer is None:
                self._tokenizer = BareTokenizer.load(self.root)
                if self._tokenizer is None:
                    from transformers import WhisperTokenizerFast

                    self._tokenizer = WhisperTokenizerFast.from_pretrained(str(self.root))
            return self._tokenizer

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True)) or not self.has("proj_out.weight")


class BareTokenizer:
    """``WhisperTokenizerFast``'s ``decode`` and ``encode`` on the ``tokenizers`` library
    alone, from the directory's ``tokenizer.json``: importing transformers and building its
    tokenizer cost 1.2 s of every Whisper run's start-up, for the two calls the recipes make.

    Decoding does what transformers does for a Whisper BPE vocabulary: with
    ``skip_special_tokens``, a leading ``<|startofprev|>`` prompt is cut up to
    ``<|startoftranscript|>``; the vocabulary decodes; timestamp tokens are removed from
    the text. ``load`` declines (and transformers is used) when the directory asks for
    more: no ``tokenizer.json``, another model than BPE, or tokenization-space clean-up
    (which transformers 4 applies; transformers 5 skips it for BPE).
    ``tests/unit/graphs/test_whisper_tokenizer.py`` compares both on thousands of inputs."""

    TIMESTAMP = re.compile(r"<\|(\d+\.\d+)\|>")

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.prev = tok.token_to_id("<|startofprev|>")
        self.start = tok.token_to_id("<|startoftranscript|>")

    @classmethod
    def load(cls, root: Path) -> "BareTokenizer | None":
        path, cfg_path = root / "tokenizer.json", root / "tokenizer_config.json"
        if not path.is_file():
            return None
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        # absent means no clean-up in every transformers this project allows (>= 4.46)
        if cfg.get("clean_up_tokenization_spaces", False) or cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        if type(tok.model).__name__ != "BPE":
            return None
        return cls(tok)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens and ids and ids[0] == self.prev:
            ids = ids[ids.index(self.start):] if self.start in ids else []
        return self.TIMESTAMP.sub("", self.tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)


def model_files(path: str) -> WhisperFiles:
    """The (process-wide, shared) ``WhisperFiles`` for ``model.path``."""
    root = resolve_model_dir(path)
    with _LOCK:
        if root not in _FILES:
            _FILES[root] = WhisperFiles(root)
        return _FILES[root]


def check_dims(files: WhisperFiles, m: Any) -> None:
    """The recipe's model sizes (used for planning) must match the checkpoint."""
    c = files.config
    pairs = {"d_model": c.get("d_model"), "encoder_layers": c.get("encoder_layers"), "decoder_layers": c.get("decoder_layers"), "n_mels": c.get("num_mel_bins")}
    bad = [f"model.{k}={getattr(m, k)} but the checkpoint has {v}" for k, v in pairs.items() if v is not None and getattr(m, k) != v]
    if bad:
        raise UserError("model", f"{files.root}: " + "; ".join(bad), "use the matching model group (model=tiny_en, model=base) or fix the values")


# ---------------------------------------------------------------- layer weights
def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights on ``device`` can be prepacked for oneDNN (float32 CPU with mkldnn)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack(w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] prepacked in oneDNN's blocked layout (what torch.compile's CPU backend
    does): a linear then runs 2-3x faster than with the plain sgemm, for any number of rows."""
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


@dataclass
class Linear:
    w: torch.Tensor
    b: torch.Tensor | None
    packed: torch.Tensor | None = None  # ``w`` prepacked (float32 CPU), used when present

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, "none")

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(linear(x)) (erf GELU, as ``F.gelu``), fused into the matmul when prepacked."""
        return self._run(x, "gelu") if self.packed is not None else F.gelu(F.linear(x, self.w, self.b))

    def _run(self, x: torch.Tensor, act: str) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.w, self.b)
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.packed, self.b, act, [], "none" if act == "gelu" else "")
        return y.view(*shape[:-1], y.shape[-1])


@dataclass
class Norm:
    w: torch.Tensor
    b: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, LN_EPS)


class Loader:
    """Reads the tensors of one prefix (e.g. ``model.decoder.layers.2``) as small structs."""

    def __init__(self, files: WhisperFiles, device: torch.device, dtype: torch.dtype) -> None:
        self.files, self.device, self.dtype = files, device, dtype

    def t(self, key: str) -> torch.Tensor:
        return self.files.tensor(key, self.device, self.dtype)

    def linear(self, p: str, bias: bool = True) -> Linear:
        w = self.t(f"{p}.weight")
        return Linear(w, self.t(f"{p}.bias") if bias else None, self.packed(f"{p}.weight", w))

    def projection(self, key: str) -> Linear:
        """A bias-free linear from weight ``key`` (the vocabulary projection)."""
        w = self.t(key)
        return Linear(w, None, self.packed(key, w))

    def packed(self, key: str, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` prepacked (shared like the weights themselves), or None where packing does not apply."""
        if w.ndim != 2 or not can_pack(self.device, self.dtype):  # convolutions stay as they are
            return None
        return self.files.derived(key, "packed", self.device, self.dtype, lambda: pack(w))

    def norm(self, p: str) -> Norm:
        return Norm(self.t(f"{p}.weight"), self.t(f"{p}.bias"))

    def fused(self, p: str, names: tuple[str, ...]) -> Linear:
        """Projections fused into one matmul; k_proj has no bias (a zero slice keeps it exact)."""
        ws, bs = [], []
        for n in names:
            w = self.t(f"{p}.{n}.weight")
            ws.append(w)
            bs.append(self.t(f"{p}.{n}.bias") if self.files.has(f"{p}.{n}.bias") else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
        w = torch.cat(ws).contiguous()
        return Linear(w, torch.cat(bs).contiguous(), pack(w) if can_pack(self.device, self.dtype) else None)
