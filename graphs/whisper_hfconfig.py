"""transformers configuration for a CTranslate2 Whisper model: ``WhisperConfig`` from the tensor
shapes, the tokenizer from ``tokenizer.json``, the ``GenerationConfig`` Whisper's ``generate``
expects (special tokens, suppression lists, languages, alignment heads).

Also the published cross-attention alignment heads per Whisper size, for models whose files do
not carry them (used by the converter and by ``whisper.align``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import GenerationConfig, WhisperConfig, WhisperTokenizer

_NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> .. <|30.00|>
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)$")


class CT2ConversionError(ValueError):
    """The CTranslate2 variables do not map exactly onto a transformers Whisper model."""


def num_layers(variables: dict[str, torch.Tensor], side: str) -> int:
    """How many ``encoder``/``decoder`` layers the CTranslate2 variables hold (contiguous)."""
    idx = {int(m.group(2)) for n in variables if (m := _LAYER_RE.match(n)) and m.group(1) == side}
    if not idx:
        raise CT2ConversionError(f"no {side} layers found (expected '{side}/layer_0/...')")
    if idx != set(range(len(idx))):
        raise CT2ConversionError(f"{side} layer indices are not contiguous: {sorted(idx)}")
    return len(idx)


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
        encoder_layers=num_layers(variables, "encoder"),
        decoder_layers=num_layers(variables, "decoder"),
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
    heads = ct2_config.get("alignment_heads") or published_alignment_heads(config.to_dict())
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


# ----------------------------------------------------------------------------- alignment heads
# The cross-attention heads whose weights follow the audio (for word timestamps), per
# Whisper size: openai-whisper's ``_ALIGNMENT_HEADS`` (whisper/__init__.py, release
# 20250625), there stored as base85-encoded gzipped (layers, heads) boolean masks and
# decoded here to [layer, head] pairs. Keyed by (d_model, decoder layers, multilingual, mel bins).
# large-v1 and large-v2 have the same shape; their key gives large-v2's heads (the later
# release, and what the large-v2 checkpoints on the hub carry).
_PUBLISHED_HEADS: dict[tuple[int, int, bool, int], list[list[int]]] = {
    (384, 4, False, 80): [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]],  # tiny.en
    (384, 4, True, 80): [[2, 2], [3, 0], [3, 2], [3, 3], [3, 4], [3, 5]],  # tiny
    (512, 6, False, 80): [[3, 3], [4, 7], [5, 1], [5, 5], [5, 7]],  # base.en
    (512, 6, True, 80): [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]],  # base
    (768, 12, False, 80): [[6, 6], [7, 0], [7, 3], [7, 8], [8, 2], [8, 5], [8, 7], [9, 0], [9, 4], [9, 8], [9, 10],
                           [10, 0], [10, 1], [10, 2], [10, 3], [10, 6], [10, 11], [11, 2], [11, 4]],  # small.en
    (768, 12, True, 80): [[5, 3], [5, 9], [8, 0], [8, 4], [8, 7], [8, 8], [9, 0], [9, 7], [9, 9], [10, 5]],  # small
    (1024, 24, False, 80): [[11, 4], [14, 1], [14, 12], [14, 14], [15, 4], [16, 0], [16, 4], [16, 9], [17, 12],
                            [17, 14], [18, 7], [18, 10], [18, 15], [20, 0], [20, 3], [20, 9], [20, 14], [21, 12]],  # medium.en
    (1024, 24, True, 80): [[13, 15], [15, 4], [15, 15], [16, 1], [20, 0], [23, 4]],  # medium
    (1280, 32, True, 80): [[10, 12], [13, 17], [16, 11], [16, 12], [16, 13], [17, 15], [17, 16], [18, 4], [18, 11],
                           [18, 19], [19, 11], [21, 2], [21, 3], [22, 3], [22, 9], [22, 12], [23, 5], [23, 7],
                           [23, 13], [25, 5], [26, 1], [26, 12], [27, 15]],  # large-v2 (large-v1 has the same shape)
    (1280, 32, True, 128): [[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11], [21, 4], [24, 1], [25, 6]],  # large-v3
    (1280, 4, True, 128): [[2, 4], [2, 11], [3, 3], [3, 6], [3, 11], [3, 14]],  # large-v3-turbo
}


def published_alignment_heads(config: dict[str, Any]) -> list[list[int]] | None:
    """The published alignment heads for a transformers Whisper ``config`` (as a dict),
    or None for sizes the table does not know (fine-tunes of other shapes)."""
    key = (int(config.get("d_model", 0)), int(config.get("decoder_layers", 0)),
           int(config.get("vocab_size", 0)) >= 51865, int(config.get("num_mel_bins", 80)))
    heads = _PUBLISHED_HEADS.get(key)
    return [list(h) for h in heads] if heads else None
