"""``BareTokenizer`` decodes and encodes exactly as transformers' ``WhisperTokenizerFast``
(the reference the Whisper recipes are compared with), for tiny.en and the multilingual
base vocabulary, and hands over to transformers when a directory asks for what it does
not do."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
from mmpipe.graphs.whisper_model import BareTokenizer, model_files, resolve_model_dir  # noqa: E402


def _reference(root: Path) -> Any:
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast.from_pretrained(str(root))


def _sequences(n_vocab: int, sop: int, sot: int) -> list[list[int]]:
    """Random ids over the whole vocabulary (text, language, control and timestamp tokens),
    some with a previous-text prompt in front, some with the start token inside."""
    rng = random.Random(0)
    out = []
    for k in range(1500):
        ids = [rng.randrange(n_vocab) if rng.random() < 0.3 else rng.randrange(50257) for _ in range(rng.randint(0, 40))]
        if k % 5 == 0:
            ids = [sop] + ids
        if k % 7 == 0:
            ids = ids + [sot] + ids
        out.append(ids)
    return out + [[], [sop], [sop, 50257, sot], [sot, 50257]]


@pytest.mark.parametrize("model", ["package:tiny_en", "package:base"])
def test_decode_and_encode_equal_transformers(model: str) -> None:
    root = resolve_model_dir(model)
    bare, ref = BareTokenizer.load(root), _reference(root)
    assert bare is not None
    sop, sot = ref.convert_tokens_to_ids("<|startofprev|>"), ref.convert_tokens_to_ids("<|startoftranscript|>")
    for ids in _sequences(len(ref), sop, sot):
        for skip in (True, False):
            assert bare.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    rng = random.Random(1)
    texts = [" the quick brown fox", "Überraschung! 你好", "  two  spaces ", "<|en|> hi <|0.00|>", ""]
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(30)) for _ in range(200)]
    for text in texts:
        for special in (True, False):
            assert bare.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text


def test_the_model_files_use_it() -> None:
    assert isinstance(model_files("package:tiny_en").tokenizer(), BareTokenizer)


def test_directories_that_ask_for_more_get_transformers(tmp_path: Path) -> None:
    src = resolve_model_dir("package:tiny_en")
    d = tmp_path / "m"
    d.mkdir()
    assert BareTokenizer.load(d) is None  # no tokenizer.json
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "clean_up_tokenization_spaces": True}))
    assert BareTokenizer.load(d) is None  # transformers 4 would clean up spaces
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "clean_up_tokenization_spaces": False}))
    assert BareTokenizer.load(d) is not None
