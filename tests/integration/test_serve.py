"""``mmpipe serve`` end to end: a real server process on an ephemeral port, the real ``openai``
client, answers compared with ``mmpipe run`` on the same files and settings.

One server per recipe and module (greedy Whisper tiny.en, tiny offline SD, synthetic); each
test talks to it like a user would. Real weights, as the other Whisper tests.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.cli import MMPIPE, mmpipe

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

pytestmark = pytest.mark.slow  # real weights

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "recipes" / "examples" / "hello.wav"
CLIPS = [ROOT / "tests" / "assets" / "speech" / f"clip{i}.wav" for i in range(1, 7)]
GREEDY = ["beam_size=1", "temperature=0", "max_new_tokens=48"]  # streams token by token; fast
SD = ["num_inference_steps=3", "height=32", "width=32"]


class Server:
    """``mmpipe serve`` in a subprocess; ``url`` once /health says ready."""

    def __init__(self, recipe: str, overrides: list[str], *options: str) -> None:
        # a session of its own: a test can signal its process group, as a terminal's Ctrl-C does
        self.proc = subprocess.Popen([*MMPIPE, "serve", recipe, *overrides, "--port", "0", *options], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.log: list[str] = []
        found = threading.Event()
        self.port = 0

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        assert found.wait(60), f"no 'serving on' line: {''.join(self.log)}"
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while self.get("/health")[0] != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.2)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def stt() -> Iterator[Server]:
    s = Server("whisper_stt", GREEDY)
    yield s
    assert s.stop() == 0, "".join(s.log)


def mmpipe_run(tmp: Path, recipe: str, *overrides: str) -> tuple[dict[str, dict[str, Any]], Path]:
    """``mmpipe run`` -> (results by id, output dir)."""
    out = tmp / "run"
    p = mmpipe("run", recipe, *overrides, f"output_dir={out}", "-q", timeout=None)  # as long as the offline reference takes
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in rows}, out


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict[str, Any]], Path]:
    """``mmpipe run whisper_stt`` on hello.wav and the six clips, with the server's settings."""
    d = tmp_path_factory.mktemp("stt")
    for f in [HELLO, *CLIPS]:
        (d / f.name).symlink_to(f)
    return mmpipe_run(d, "whisper_stt", f"input={d}", *GREEDY, "output_format=all")


# ---------------------------------------------------------------------------------- audio
@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_transcription_in_every_format_equals_mmpipe_run(stt: Server, offline: Any, fmt: str) -> None:
    runs, out = offline
    want = runs["hello"]["outputs"]
    with HELLO.open("rb") as f:
        got = stt.client().audio.transcriptions.create(file=f, model="whisper-1", response_format=fmt)  # type: ignore[call-overload]
    if fmt == "json":
        assert got.text == want["text"]
    elif fmt == "text":
        assert got.strip() == want["text"]
    elif fmt in ("srt", "vtt"):
        assert got == (out / f"hello.{fmt}").read_text()
    else:
        assert got.text == want["text"] and got.language == "english" and 4.0 < got.duration < 5.0
        assert [s.text for s in got.segments] == [s["text"] for s in want["segments"]]
        for s, w in zip(got.segments, want["segments"]):
            assert (s.id, s.start, s.end, s.tokens, s.avg_logprob, s.no_speech_prob) == (
                w["id"], w["start"], w["end"], w["tokens"], w["avg_logprob"], w["no_speech_prob"])


def test_streamed_deltas_concatenate_to_the_text(stt: Server, offline: Any) -> None:
    with HELLO.open("rb") as f:
        events = list(stt.client().audio.transcriptions.create(file=f, model="whisper-1", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e.text for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 3, deltas  # the greedy decode reports its text token by token
    assert "".join(deltas) == done[0] == offline[0]["hello"]["outputs"]["text"]


def test_bad_audio_requests_get_openai_400s(stt: Server) -> None:
    import numpy as np
    import soundfile as sf

    c = stt.client()
    nan_wav = io.BytesIO()  # decodes, but its samples are not numbers: the pipeline's audio check says so
    sf.write(nan_wav, np.array([0.0, float("nan"), 0.1] * 8000, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    cases = [({"file": ("notes.txt", b"this is not audio")}, "file", "not audio"),
             ({"file": ("nan.wav", nan_wav.getvalue())}, "file", "NaN or infinite samples"),
             ({"file": HELLO.open("rb"), "temperature": "hot"}, "temperature", ""),  # type: ignore[dict-item]
             ({"file": HELLO.open("rb"), "response_format": "mp3"}, "response_format", ""),  # type: ignore[dict-item]
             ({"file": HELLO.open("rb"), "language": "de"}, None, "")]  # type: ignore[dict-item]  # English-only model
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.transcriptions.create(model="whisper-1", **kwargs)
        err = e.value.body
        assert e.value.status_code == 400 and set(err) >= {"message", "type", "param"}, err
        assert err["type"] == "invalid_request_error" and (param is None or err["param"] == param), err
        assert "Traceback" not in err["message"] and words in err["message"], err
    assert stt.get("/health")[0] == 200  # still serving


def test_a_stream_whose_client_leaves_gives_its_place_back(stt: Server) -> None:
    import httpx

    with httpx.Client(base_url=stt.url, timeout=60) as c:
        with c.stream("POST", "/v1/audio/transcriptions", files={"file": ("hello.wav", HELLO.read_bytes(), "audio/wav")},
                      data={"model": "whisper-1", "stream": "true"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            next(r.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 10
    while (_gauge(stt, "mmpipe_queue_depth"), _gauge(stt, "mmpipe_pipeline_in_flight")) != (0, 0):
        assert time.monotonic() < deadline, "the stream's admission place or pipeline slot was not given back"
        time.sleep(0.05)


def test_64_concurrent_transcriptions_share_micro_batches(stt: Server, offline: Any) -> None:
    runs = offline[0]
    c = stt.client()

    def one(i: int) -> tuple[str, str]:
        clip = CLIPS[i % len(CLIPS)]
        with clip.open("rb") as f:
            return clip.stem, c.audio.transcriptions.create(file=f, model="whisper-1").text

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    assert [text for _, text in got] == [runs[stem]["outputs"]["text"] for stem, _ in got]
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(stt.get("/metrics")[1])}
    sizes = {s.name: s.value for s in fams["mmpipe_microbatch_size"].samples}
    assert sizes["mmpipe_microbatch_size_sum"] / sizes["mmpipe_microbatch_size_count"] > 1.0, sizes
    one_item = next(s.value for s in fams["mmpipe_microbatch_size"].samples if s.labels.get("le") == "1.0")
    assert one_item < sizes["mmpipe_microbatch_size_count"]  # some micro-batch held several requests
    loop = [s for s in fams["mmpipe_loop_step_items"].samples if s.name.endswith("_sum")]
    assert loop and loop[0].labels["loop"] == "decoder" and loop[0].value > 0


def test_metrics_models_and_health(stt: Server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = stt.get("/metrics")
    assert code == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("mmpipe_http_requests", "mmpipe_http_request_seconds", "mmpipe_queue_depth", "mmpipe_stage_busy_ratio",
                 "mmpipe_microbatch_size", "mmpipe_loop_step_items", "mmpipe_ready"):
        assert name in fams, sorted(fams)
    statuses = {(s.labels["route"], s.labels["status"]) for s in fams["mmpipe_http_requests"].samples if s.name.endswith("_total")}
    assert ("/health", "200") in statuses
    busy = [s for s in fams["mmpipe_stage_busy_ratio"].samples]
    assert busy and all(0.0 <= s.value <= 1.0 for s in busy)
    models = stt.client().models.list().data
    assert [m.id for m in models] == ["whisper_stt/tiny_en"]


# ---------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def sd() -> Iterator[Server]:
    pytest.importorskip("diffusers")
    s = Server("sd_txt2img", SD)
    yield s
    assert s.stop() == 0, "".join(s.log)


def _pixels(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_images_equal_mmpipe_run_with_the_same_seed(sd: Server, tmp_path: Path) -> None:
    import numpy as np

    got = sd.client().images.generate(prompt="a lighthouse", n=2, size="32x32",  # type: ignore[arg-type]
                                      extra_body={"seed": 7, "negative_prompt": "fog"})
    runs, out = mmpipe_run(tmp_path, "sd_txt2img", *SD, "prompt=a lighthouse", "negative_prompt=fog", "seed=7", "num_images_per_prompt=2")
    for img, rid in zip(got.data, sorted(runs)):
        assert img.b64_json is not None
        assert np.array_equal(_pixels(base64.b64decode(img.b64_json)), _pixels((out / f"{rid}.png").read_bytes()))
    # per-request steps and guidance change the picture (and are not silently ignored)
    other = sd.client().images.generate(prompt="a lighthouse", extra_body={"seed": 7, "negative_prompt": "fog", "guidance_scale": 2.0})
    assert other.data[0].b64_json is not None and got.data[0].b64_json is not None
    assert not np.array_equal(_pixels(base64.b64decode(other.data[0].b64_json)), _pixels(base64.b64decode(got.data[0].b64_json)))


def test_bad_image_requests_get_openai_400s(sd: Server) -> None:
    c = sd.client()
    for kwargs, param in [({"prompt": ""}, "prompt"), ({"prompt": "x", "size": "30x30"}, "size"), ({"prompt": "x", "size": "64x64"}, "size"),
                          ({"prompt": "x", "n": "two"}, "n"), ({"prompt": 5}, "prompt"),
                          ({"prompt": "x", "extra_body": {"num_inference_steps": 2.5}}, "num_inference_steps")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.images.generate(**kwargs)  # type: ignore[arg-type]
        assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body  # type: ignore[index]


# ---------------------------------------------------------------------------------- any recipe, overload, shutdown
def test_pipelines_run_overload_timeout_failures_and_sigterm() -> None:
    s = Server("synthetic", ["stages=2", "work=sleep", "stage_ms=400", "width=4", "+nodes.chain.fail_ids=[boom]"],
               "--max-queue", "2", "--request-timeout", "20")
    try:
        code, body, _ = s.post("/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}})
        assert code == 200 and body["outputs"]["y"] == [2.21875, 3.625, 5.03125, 6.4375], body  # as `mmpipe run synthetic`
        code, body, _ = s.post("/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}, "id": "boom"})
        assert code == 500 and "stage 0" in body["error"]["message"] and "node chain" in body["error"]["message"], body
        assert s.post("/v1/pipelines/run", {"inputs": {"x": "abc"}})[0] == 400
        with ThreadPoolExecutor(3) as pool:  # the admission queue holds 2: one of 3 at once is turned away
            answers = list(pool.map(lambda _: s.post("/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}}), range(3)))
        codes = sorted(a[0] for a in answers)
        assert codes == [200, 200, 503], codes
        assert next(a[2] for a in answers if a[0] == 503).get("retry-after") == "1"
        # SIGTERM while a request is in flight: it still gets its answer, then the server exits 0
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(s.post, "/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}})
            time.sleep(0.3)
            s.proc.send_signal(signal.SIGTERM)
            assert late.result()[0] == 200
        assert s.proc.wait(30) == 0, "".join(s.log)
    finally:
        s.stop()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_distributed_serving_answers_like_threads_and_stops_gracefully(how: str) -> None:
    """runtime=distributed: rank 0 serves, stage 1 runs on rank 1; SIGTERM to the server, or
    Ctrl-C in its terminal (SIGINT to its process group), reaches rank 0 once, which finishes
    the request in flight before every rank exits (0, or 130 after Ctrl-C)."""
    s = Server("synthetic", ["stages=2", "work=sleep", "stage_ms=600", "width=4", "runtime=distributed", "runtime.nproc=2"])
    try:
        ranks = _children(s.proc.pid)
        assert len(ranks) == 2, ranks
        code, body, _ = s.post("/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}})
        assert code == 200 and body["outputs"]["y"] == [2.21875, 3.625, 5.03125, 6.4375], body  # as the threads backend
        assert set(body["timings"]["stages_s"]) == {"stage0", "stage1"}  # one stage per rank
        from prometheus_client.parser import text_string_to_metric_families

        busy = {smp.labels["stage"]: smp.value for f in text_string_to_metric_families(s.get("/metrics")[1])
                if f.name == "mmpipe_stage_busy_ratio" for smp in f.samples}
        assert set(busy) == {"0", "1"} and busy["1"] > 0, busy  # rank 1's stage copy too
        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(s.post, "/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}})
            time.sleep(0.3)  # in stage 0 on rank 0; it still needs rank 1 after the signal
            if how == "SIGTERM":
                s.proc.send_signal(signal.SIGTERM)
            else:  # the ranks run in sessions of their own: only the launcher hears the terminal
                os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)
            assert late.result()[0] == 200
        assert s.proc.wait(60) == (0 if how == "SIGTERM" else 130), "".join(s.log)
        assert not [p for p in ranks if _alive(p)], "a rank outlived the server"
    finally:
        s.stop()


def _gauge(s: Server, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return next(f.samples[0].value for f in text_string_to_metric_families(s.get("/metrics")[1]) if f.name == name)


def test_request_timeout_answers_504_and_a_client_that_leaves_is_cancelled() -> None:
    s = Server("synthetic", ["stages=1", "work=sleep", "stage_ms=2500", "width=4"], "--request-timeout", "0.5")
    try:
        code, body, _ = s.post("/v1/pipelines/run", {"inputs": {"x": [1, 2, 3, 4]}})
        assert code == 504 and body["error"]["type"] == "timeout", body
        assert _gauge(s, "mmpipe_pipeline_in_flight") == 0  # the timed-out request left the pipeline
        import socket

        data = json.dumps({"inputs": {"x": [1, 2, 3, 4]}}).encode()
        with socket.create_connection(("127.0.0.1", s.port)) as conn:  # send a request, then hang up
            conn.sendall(b"POST /v1/pipelines/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            deadline = time.monotonic() + 2
            while _gauge(s, "mmpipe_pipeline_in_flight") == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _gauge(s, "mmpipe_pipeline_in_flight") == 1
            t_closed = time.monotonic()
        while _gauge(s, "mmpipe_pipeline_in_flight") == 1:
            time.sleep(0.02)
        assert time.monotonic() - t_closed < 1.5  # cancelled, not finished (its stage sleeps 2.5 s)
        assert _gauge(s, "mmpipe_queue_depth") == 0
    finally:
        assert s.stop() == 0


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client's translations
def test_translation_with_the_base_model(tmp_path: Path) -> None:
    s = Server("whisper_stt", ["model=base", *GREEDY])
    try:
        with HELLO.open("rb") as f:
            got = s.client().audio.translations.create(file=f, model="whisper-1")
        runs, _ = mmpipe_run(tmp_path, "whisper_stt", "model=base", "task=translate", f"input={HELLO}", *GREEDY)
        assert got.text == runs["hello"]["outputs"]["text"] and got.text
    finally:
        assert s.stop() == 0
