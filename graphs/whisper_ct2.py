"""Convert Whisper models from CTranslate2 format into Hugging Face transformers directories.

The CTranslate2 ``model.bin`` is read by ``ct2_reader``; this module maps every variable onto
``WhisperForConditionalGeneration`` and writes a directory that ``from_pretrained`` loads:
``config.json``, ``generation_config.json`` (built by ``whisper_hfconfig``),
``model.safetensors``, tokenizer files and ``preprocessor_config.json``, atomically, into the
model store's cache (``model_store``).

The mapping is strict: every CTranslate2 tensor must be consumed and every transformers
parameter filled, otherwise :class:`CT2ConversionError` lists the leftovers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from mmpipe.graphs.ct2_reader import (CT2FormatError, is_ct2_dir, read_ct2_config, read_ct2_model,
                                      read_ct2_model_with_header)
from mmpipe.graphs.model_store import (PACKAGED_MODELS, ModelNotFoundError, build_dir, default_cache_dir,
                                       packaged_model_dir, quiet_hf)
from mmpipe.graphs.whisper_hfconfig import (CT2ConversionError, load_ct2_tokenizer, num_layers,
                                            whisper_config_from_ct2, whisper_generation_config)

__all__ = [
    "CT2ConversionError",
    "CT2FormatError",
    "ModelNotFoundError",
    "PACKAGED_MODELS",
    "convert_ctranslate2",
    "convert_main",
    "ct2_to_hf_state_dict",
    "ensure_converted",
    "is_ct2_dir",
    "packaged_model_dir",
    "read_ct2_model",
    "sha256_file",
]

#: Bumped whenever the output of :func:`convert_ctranslate2` changes, so caches are rebuilt.
#: 2: alignment heads from the published table when the CTranslate2 files lack them.
CONVERTER_VERSION = 2

SUPPORTED_SPEC = "WhisperSpec"
_SAMPLING_RATE = 16000
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


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
        for i in range(num_layers(left, side)):
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
    variables, _aliases, header = read_ct2_model_with_header(src / "model.bin")
    if header["spec"] != SUPPORTED_SPEC:
        raise CT2ConversionError(
            f"{src}: spec is {header['spec']!r}, only {SUPPORTED_SPEC!r} is supported"
        )
    ct2_config = read_ct2_config(src)
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

    features = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=_SAMPLING_RATE, hop_length=160,
        chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False,
    )

    def fill(tmp: Path) -> None:
        with quiet_hf():
            model.save_pretrained(tmp)
        features.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mmpipe_source.json").write_text(
            json.dumps({"converter": "mmpipe.graphs.whisper_ct2", "converter_version": CONVERTER_VERSION,
                        "source": str(src.resolve()), "ct2_binary_version": header["version"],
                        "ct2_spec_revision": header["revision"]}, indent=2) + "\n"
        )

    if not build_dir(dst, fill, overwrite=overwrite, what=f"Whisper model {src} (CTranslate2 -> transformers)"):
        raise FileExistsError(f"{dst} was created by someone else during the conversion")
    return dst


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
