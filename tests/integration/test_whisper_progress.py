"""``whisper.decode`` reports each unfinished window's agreed text as loop progress (what
``mmpipe serve`` streams): every report extends the previous one and is a prefix of the
final text, with greedy decoding and with beam search (where the beams must agree first)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmpipe.api import compile, open_pipeline, requests_of

pytestmark = pytest.mark.slow  # real weights

HELLO = Path(__file__).resolve().parents[2] / "recipes" / "examples" / "hello.wav"


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("decoding", [["beam_size=1", "temperature=0"], ["beam_size=5"]], ids=["greedy", "beam"])
def test_progress_is_a_growing_prefix_of_the_final_text(tmp_path: Path, decoding: list[str]) -> None:
    plan = compile("whisper_stt", [f"input={HELLO}", f"output_dir={tmp_path}", *decoding])
    seen: list[dict[str, Any]] = []
    with open_pipeline(plan, str(tmp_path)) as pipe:
        res = pipe.submit(requests_of(plan)[0], on_progress=lambda m, p: seen.append(p)).result()
    assert res.ok
    final = res.outputs["text"]
    assert seen and all(p["window"] == 0 and p["attempt"] == 0 for p in seen)
    texts = [_words(p["text"]) for p in seen]
    counts = [p["tokens"] for p in seen]
    assert counts == sorted(counts) and all(final.startswith(t) for t in texts), texts
    if decoding[0] == "beam_size=1":  # one hypothesis: every step adds a token
        assert counts == list(range(1, len(counts) + 1)) and texts[-1] == final
