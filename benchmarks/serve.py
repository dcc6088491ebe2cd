"""Serving throughput: ``mmpipe serve`` under 1, 4, 16, 64 concurrent clients, against
(a) ``mmpipe run`` offline on the same files and (b) a minimal hand-written FastAPI server
that calls transformers' ``generate`` once per request (what a user would write by hand).
The same for sd_txt2img with 8 clients (hand-written: diffusers' StableDiffusionPipeline).
Per load level it also runs (a') the same closed loop of clients without HTTP (threads
calling ``Pipeline.submit``): offline has every request in flight at once, a closed loop
of C clients at most C, so (a') tells the cost of the concurrency from that of HTTP.

    python benchmarks/serve.py                      # whisper (1, 4, 16, 64 clients) and sd (8 clients)
    python benchmarks/serve.py --quick              # fewer requests, clients 1 and 16, sd with 8 (32 requests)
    python benchmarks/serve.py --only whisper --clients 1,4 --requests 16
    python benchmarks/serve.py --quick --device cuda --set placement=cuda   # on a GPU (benchmarks/gpu.sh)

Every party is a process of its own: the server, the clients (one process per load level,
a thread per client, each sending its next request when the last one answered), and each
baseline. Servers are warmed up first; model loading is not timed. Whisper runs greedy
(``beam_size=1 temperature=0``) everywhere, on the shipped speech clips cycled to the
request count; SD runs the tiny offline model at 32x32 with 4 steps. Before each load level
is timed, the same clients send two requests each untimed, so the level is measured in its
steady state (closed-loop clients fall into waves that batch well only after a few
rounds), for mmpipe and the hand-written servers alike. Mean micro-batch size
comes from the server's /metrics (micro-batches entering its first stage during the level).
The clients report their own CPU per request ("client CPU ms/req"): on a small machine
the load generator takes cores the server would use; the offline run has no such cost.
The script prints a table and decides nothing; numbers on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CLIPS = sorted((ROOT / "tests" / "assets" / "speech").glob("clip*.wav")) + [ROOT / "recipes" / "examples" / "hello.wav"]
GREEDY = ["beam_size=1", "temperature=0"]
SD = ["num_inference_steps=4", "height=32", "width=32"]
PROMPTS = ["a photo of a cat", "a lighthouse at dusk", "an astronaut riding a horse", "a bowl of fruit"]


# ------------------------------------------------------------------ servers
def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """A server process printing 'on http://127.0.0.1:PORT'; (process, base url) once /health is 200."""
    import urllib.request

    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    port: list[int] = []
    log: list[str] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            log.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 300
    while True:
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {''.join(log)[-3000:]}")
        if port:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/health", timeout=5) as r:
                    if r.status == 200:
                        return p, f"http://127.0.0.1:{port[0]}"
            except OSError:
                pass
        time.sleep(0.3)


def stop(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def mb_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the server's micro-batch size histogram (0, 0 without one)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return 0.0, 0.0
    vals = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if f.name == "mmpipe_microbatch_size"}
    return vals.get("mmpipe_microbatch_size_sum", 0.0), vals.get("mmpipe_microbatch_size_count", 0.0)


def load(url: str, kind: str, clients: int, requests: int) -> dict[str, Any]:
    """One load level, from a client process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        r = subprocess.run([sys.executable, __file__, "--client", url, "--kind", kind, "--concurrency", str(clients),
                            "--requests", str(requests), "--out", str(out)], capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        return dict(json.loads(out.read_text()))


def _post(conn: Any, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    """One POST on a kept-alive ``http.client`` connection: (status, body)."""
    conn.request("POST", path, body=body, headers={"Content-Type": ctype, "Content-Length": str(len(body))})
    r = conn.getresponse()
    return r.status, r.read()


def _multipart(fields: dict[str, str], name: str, filename: str, data: bytes, ctype: str) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and one file part; (body, content type)."""
    b = "mmpipe-bench-boundary"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                 f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def client_main(a: argparse.Namespace) -> None:
    """Closed-loop clients: ``concurrency`` threads share ``requests`` requests. The standard
    library's ``http.client`` on kept-alive connections: the load generator shares the cores
    with the server, so it should cost little (httpx cost 4-20 ms of CPU per request here)."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(a.client)
    lat: list[float] = []
    errors: list[str] = []
    todo = list(range(a.requests))
    lock = threading.Lock()
    audio = {c: c.read_bytes() for c in CLIPS} if a.kind == "audio" else {}

    def worker() -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                if a.kind == "audio":
                    clip = CLIPS[i % len(CLIPS)]
                    body, ctype = _multipart({"model": "whisper-1"}, "file", clip.name, audio[clip], "audio/wav")
                    path = "/v1/audio/transcriptions"
                else:
                    body, ctype = json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": "32x32"}).encode(), "application/json"
                    path = "/v1/images/generations"
                for _ in range(2):  # a second time on a new connection: the server may close an idle one
                    t0 = time.perf_counter()
                    try:
                        status, text = _post(conn, path, body, ctype)
                        break
                    except (http.client.HTTPException, OSError) as exc:
                        conn.close()
                        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
                        status, text = 0, repr(exc).encode()
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        lat.append(dt)
                    else:
                        errors.append(f"{status}: {text[:200]!r}")
        finally:
            conn.close()

    t0, cpu0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # the load generator's own CPU: it shares the cores with the server
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    Path(a.out).write_text(json.dumps({"wall_s": wall, "ok": len(lat), "errors": errors[:3], "n_errors": len(errors),
                                       "p50_s": pick(0.5), "p95_s": pick(0.95),
                                       "client_cpu_ms": 1000 * cpu / max(1, len(lat) + len(errors))}))


# ------------------------------------------------------------------ the hand-written baselines
HANDWRITTEN_WHISPER = '''
import io, soundfile as sf, torch, uvicorn
from fastapi import FastAPI, UploadFile, File, Form
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast
from mmpipe.graphs.whisper_model import resolve_model_dir
root = resolve_model_dir(MODEL)
model = WhisperForConditionalGeneration.from_pretrained(root).eval().to(DEVICE)
fe, tok = WhisperFeatureExtractor.from_pretrained(root), WhisperTokenizerFast.from_pretrained(root)
app = FastAPI()
@app.get("/health")
def health(): return {"status": "ok"}
@app.post("/v1/audio/transcriptions")
def transcribe(file: UploadFile = File(...), model_name: str = Form("whisper-1", alias="model")):
    wave, sr = sf.read(io.BytesIO(file.file.read()), dtype="float32")
    f = fe(wave, sampling_rate=sr, return_tensors="pt").input_features.to(DEVICE)
    with torch.inference_mode():
        ids = model.generate(f, num_beams=1)
    return {"text": tok.batch_decode(ids, skip_special_tokens=True)[0].strip()}
print("on http://127.0.0.1:%d" % PORT, flush=True)
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
'''

HANDWRITTEN_SD = '''
import base64, io, torch, uvicorn
from fastapi import FastAPI, Request
from diffusers import StableDiffusionPipeline
from mmpipe.graphs.diffusion_models import ensure_model
pipe = StableDiffusionPipeline.from_pretrained(str(ensure_model("tiny_random")), safety_checker=None).to(DEVICE)
pipe.set_progress_bar_config(disable=True)
app = FastAPI()
@app.get("/health")
def health(): return {"status": "ok"}
@app.post("/v1/images/generations")
def generate(body: dict):
    g = torch.Generator("cpu").manual_seed(int(body.get("seed", 0)))
    img = pipe(body["prompt"], height=32, width=32, num_inference_steps=4, generator=g).images[0]
    buf = io.BytesIO(); img.save(buf, format="PNG")
    return {"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}
print("on http://127.0.0.1:%d" % PORT, flush=True)
uvicorn.run(app, host="127.0.0.1", port=PORT, log_level="warning")
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def handwritten(source: str, device: str, model: str) -> tuple[subprocess.Popen[str], str]:
    code = f"PORT, DEVICE, MODEL = {free_port()}, {device!r}, {model!r}\n" + source
    return start([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})


def _inputs(d: Path, n: int, kind: str) -> list[str]:
    """The overrides that give a recipe the same n inputs as the clients send."""
    if kind == "audio":
        (d / "in").mkdir()
        for i in range(n):
            (d / "in" / f"r{i:04d}.wav").symlink_to(CLIPS[i % len(CLIPS)])
        return [f"input={d / 'in'}"]
    (d / "prompts.txt").write_text("".join(PROMPTS[i % len(PROMPTS)] + "\n" for i in range(n)))
    return [f"prompts={d / 'prompts.txt'}"]


def offline(recipe: str, overrides: list[str], n: int, kind: str) -> float:
    """``mmpipe run`` on the same n inputs in a process of its own: requests per second (run
    time from its summary, model loading excluded, as for the servers)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        r = subprocess.run([sys.executable, "-m", "mmpipe", "run", recipe, *overrides, *_inputs(d, n, kind), f"output_dir={d / 'out'}", "-q"],
                           cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        s = json.loads((d / "out" / "summary.json").read_text())
        return n / float(s["wall_s"])


CLOSED_LOOP = '''
import dataclasses, json, sys, tempfile, threading, time
from mmpipe.api import compile, open_pipeline, requests_of
reqs = requests_of(plan := compile(RECIPE, OVERRIDES))
with tempfile.TemporaryDirectory() as out, open_pipeline(plan, output_dir=out) as pipe:  # images are written, as the server does
    errors = []
    def level(n, tag):
        todo, lock = list(range(n)), threading.Lock()
        def client():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                r = reqs[i % len(reqs)]  # an id of its own: the same input may be in flight twice
                if not pipe.submit(dataclasses.replace(r, id=f"{r.id}-{tag}{i}")).result().ok:
                    errors.append(i)
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        t0 = time.perf_counter()
        for t in threads: t.start()
        for t in threads: t.join()
        return n / (time.perf_counter() - t0)
    level(2 * CLIENTS, "w")  # untimed, as for the servers
    errors.clear()
    rps = level(len(reqs), "t")
    print(json.dumps({"rps": rps, "errors": len(errors)}))
'''


def closed_loop(recipe: str, overrides: list[str], n: int, kind: str, clients: int) -> dict[str, Any]:
    """The same closed loop of ``clients`` without HTTP: threads calling ``Pipeline.submit``
    through the Python API, in a process of its own; {"rps", "errors"}. It separates what
    the concurrency costs (fewer requests to batch than offline) from what HTTP costs."""
    with tempfile.TemporaryDirectory() as tmp:
        code = f"RECIPE, OVERRIDES, CLIENTS = {recipe!r}, {overrides + _inputs(Path(tmp), n, kind)!r}, {clients}\n" + CLOSED_LOOP
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=3600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        return dict(json.loads(r.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ the driver
def bench(name: str, recipe: str, overrides: list[str], kind: str, levels: list[int], requests: int, hand_src: str,
          device: str = "cpu", model: str = "package:tiny_en") -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("method", "clients", "requests", "req/s", "p50 s", "p95 s", "mean micro-batch", "client CPU ms/req", "errors")]
    print(f"[{name}] offline mmpipe run ...", file=sys.stderr)
    rps = offline(recipe, overrides, requests, kind)
    rows.append((f"(a) mmpipe run {recipe} (offline)", "-", str(requests), f"{rps:.2f}", "-", "-", "-", "-", "0"))
    for c in levels:
        print(f"[{name}] Python API, {c} closed-loop clients ...", file=sys.stderr)
        cl = closed_loop(recipe, overrides, max(requests, c), kind, c)
        rows.append(("(a') the same closed loop, no HTTP", str(c), str(max(requests, c) - cl["errors"]),
                     f"{cl['rps']:.2f}", "-", "-", "-", "-", str(cl["errors"])))
    server, url = start([sys.executable, "-m", "mmpipe", "serve", recipe, *overrides, "--port", "0"])
    try:
        load(url, kind, 4, 8)  # warm-up
        for c in levels:
            print(f"[{name}] mmpipe serve, {c} clients ...", file=sys.stderr)
            load(url, kind, c, 2 * c)  # untimed: reach this level's steady state
            s0, n0 = mb_totals(url)
            r = load(url, kind, c, max(requests, c))
            s1, n1 = mb_totals(url)
            mb = f"{(s1 - s0) / (n1 - n0):.2f}" if n1 > n0 else "-"
            rows.append((f"mmpipe serve {recipe}", str(c), str(r["ok"]), f"{r['ok'] / r['wall_s']:.2f}", f"{r['p50_s']:.3f}",
                         f"{r['p95_s']:.3f}", mb, f"{r['client_cpu_ms']:.1f}", str(r["n_errors"])))
    finally:
        stop(server)
    server, url = handwritten(hand_src, device, model)
    try:
        load(url, kind, 2, 4)
        for c in levels:
            print(f"[{name}] hand-written server, {c} clients ...", file=sys.stderr)
            load(url, kind, c, 2 * c)
            r = load(url, kind, c, max(requests, c))
            rows.append(("(b) hand-written FastAPI + generate" if kind == "audio" else "(b) hand-written FastAPI + diffusers", str(c),
                         str(r["ok"]), f"{r['ok'] / r['wall_s']:.2f}", f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}", "1 (per request)",
                         f"{r['client_cpu_ms']:.1f}", str(r["n_errors"])))
    finally:
        stop(server)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="audio", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=64, help="requests per load level (at least one per client)")
    ap.add_argument("--clients", default="1,4,16,64", help="whisper's load levels")
    ap.add_argument("--sd-clients", default="8")
    ap.add_argument("--only", choices=["whisper", "sd"])
    ap.add_argument("--quick", action="store_true", help="32 requests, clients 1 and 16; sd: 32 requests")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for mmpipe (offline and served), e.g. placement=cuda; repeatable")
    ap.add_argument("--device", default="cpu", help="where the hand-written servers run their model")
    ap.add_argument("--whisper-model", default="package:tiny_en", help="the hand-written Whisper server's model (as model.path)")
    a = ap.parse_args()
    if a.client:
        return client_main(a)
    from common import table

    levels = [1, 16] if a.quick else [int(x) for x in a.clients.split(",")]
    n = 32 if a.quick else a.requests
    if a.only in (None, "whisper"):
        print(table(bench("whisper", "whisper_stt", GREEDY + a.set, "audio", levels, n, HANDWRITTEN_WHISPER, a.device, a.whisper_model)))
    if a.only in (None, "sd"):
        sd_levels = [int(x) for x in a.sd_clients.split(",")]
        print(table(bench("sd", "sd_txt2img", SD + a.set, "image", sd_levels, 32 if a.quick else max(64, n), HANDWRITTEN_SD, a.device)))
    print(f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: other processes share them)")


if __name__ == "__main__":
    main()
