"""OpenAI's request and response shapes: form and JSON fields in, transcripts, images and
errors out. Plain functions, no FastAPI: the routes in ``app.py`` call them."""
from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from mmpipe.graphs.whisper_writers import to_srt, to_vtt

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
AUDIO_FIELDS = ("file", "model", "language", "prompt", "temperature", "response_format", "stream", "timestamp_granularities[]")
SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob")


class ApiError(Exception):
    """An HTTP error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,  # noqa: A002
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


# ---------------------------------------------------------------- field readers
def text_field(form: Any, name: str, default: str | None = None) -> str | None:
    v = form.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"'{name}' must be a text field, not a file")
    return v


def float_field(form: Any, name: str, lo: float, hi: float) -> float | None:
    v = form.get(name) if hasattr(form, "get") else None
    if v is None or v == "":
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise bad(name, f"'{name}' must be a number, got {type(v).__name__}")
    try:
        x = float(v)
    except ValueError:
        raise bad(name, f"'{name}' must be a number, got {v!r}") from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {v}")
    return x


def int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def form_value(v: Any) -> Any:
    """A form field as JSON when it parses (``1`` -> 1, ``null`` -> None), else the text."""
    if not isinstance(v, str):
        raise bad(None, "only 'file' may be a file")
    try:
        return json.loads(v)
    except ValueError:
        return v


def bool_field(form: Any, name: str) -> bool:
    v = form.get(name)
    if v is None or v in ("false", "False", "0", ""):
        return False
    if v in ("true", "True", "1"):
        return True
    raise bad(name, f"'{name}' must be true or false, got {v!r}")


# ---------------------------------------------------------------- audio
@dataclass
class AudioForm:
    """A transcription/translation request, checked."""

    response_format: str = "json"
    stream: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # per-request decode parameters
    words: bool = False


def audio_form(form: Any, task: str) -> AudioForm:
    """The form fields of /v1/audio/transcriptions (``task``: transcribe) or /translations."""
    fmt = text_field(form, "response_format", "json") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise bad("response_format", f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}")
    out = AudioForm(response_format=fmt, stream=bool_field(form, "stream"))
    if out.stream and fmt not in ("json", "text"):
        raise bad("stream", "stream=true sends text deltas; use response_format json or text with it")
    params: dict[str, Any] = {"task": task} if task != "transcribe" else {}
    lang = text_field(form, "language")
    if lang:  # translations take it too: the spoken language (else detected)
        params["language"] = lang
    prompt = text_field(form, "prompt")
    if prompt:
        params["initial_prompt"] = prompt
    t = float_field(form, "temperature", 0.0, 1.0)
    if t is not None:
        params["temperature"] = t  # one temperature, as OpenAI's field: no fallback schedule
    grains = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
    for g in grains:
        if g not in ("word", "segment"):
            raise bad("timestamp_granularities[]", f"timestamp_granularities[] takes word and/or segment, got {g!r}")
    if grains and fmt != "verbose_json":
        raise bad("timestamp_granularities[]", "timestamp_granularities[] needs response_format=verbose_json")
    if "word" in grains:
        params["word_timestamps"] = True
        out.words = True
    out.params = params
    return out


def transcript_response(outputs: dict[str, Any], form: AudioForm, task: str, duration: float) -> tuple[str, str]:
    """(body, media type) of a finished transcription in ``form.response_format``."""
    text = str(outputs.get("text") or "")
    segments = [dict(s) for s in (outputs.get("segments") or [])]
    fmt = form.response_format
    if fmt == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt({"segments": segments}), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return to_vtt({"segments": segments}), "text/vtt; charset=utf-8"
    if fmt == "json":
        return json.dumps({"text": text}), "application/json"
    body: dict[str, Any] = {"task": "translate" if task == "translate" else "transcribe", "language": _language(outputs.get("language")),
                            "duration": round(duration, 3), "text": text,
                            "segments": [{k: s[k] for k in SEGMENT_KEYS if k in s} for s in segments],
                            "usage": {"type": "duration", "seconds": math.ceil(duration)}}
    if form.words:
        body["words"] = [{"word": w.get("word", "").strip(), "start": w.get("start"), "end": w.get("end")}
                         for s in segments for w in (s.get("words") or [])]
    return json.dumps(body), "application/json"


LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian", "nl": "dutch",
                  "pt": "portuguese", "ru": "russian", "zh": "chinese", "ja": "japanese", "ko": "korean"}


def _language(code: Any) -> str:
    """OpenAI's verbose_json names the language in words ("english")."""
    c = str(code or "")
    return LANGUAGE_NAMES.get(c, c)


def normalize(text: str) -> str:
    """Text as the detokenizer joins it (single spaces, trimmed): streamed text is compared so."""
    return " ".join(text.replace("\ufffd", "").split())


def sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


# ---------------------------------------------------------------- images
SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class ImageForm:
    prompt: str
    negative_prompt: str
    n: int
    seed: int | None
    params: dict[str, Any]
    size: tuple[int, int] | None
    response_format: str


def image_form(body: Any) -> ImageForm:
    """The JSON body of /v1/images/generations, checked (the recipe's limits come later)."""
    if not isinstance(body, dict):
        raise bad(None, "the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt", f"'prompt' must be a string, got {json.dumps(prompt)}")
    if not prompt.strip():
        raise bad("prompt", "'prompt' is empty")
    neg = body.get("negative_prompt", "")
    if not isinstance(neg, str):
        raise bad("negative_prompt", "'negative_prompt' must be a string")
    n = int_field(body, "n", 1, 16) or 1
    size = None
    s = body.get("size")
    if s is not None and s != "auto":
        m = SIZE.match(s) if isinstance(s, str) else None
        if m is None:
            raise bad("size", f"'size' must be \"WIDTHxHEIGHT\", e.g. \"512x512\", got {json.dumps(s)}")
        w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            raise bad("size", f"width and height must be positive multiples of 8, got {w}x{h}")
        size = (w, h)
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise bad("response_format", f"this server returns images inline: response_format must be b64_json, got {json.dumps(fmt)}")
    params: dict[str, Any] = {}
    steps = int_field(body, "num_inference_steps", 1, 1000)
    if steps is not None:
        params["num_inference_steps"] = steps
    g = body.get("guidance_scale")
    if g is not None:
        params["guidance_scale"] = float_field(body, "guidance_scale", 0.0, 100.0)
    sched = body.get("scheduler")
    if sched is not None:
        if not isinstance(sched, str):
            raise bad("scheduler", "'scheduler' must be a string")
        params["scheduler"] = sched
    return ImageForm(prompt, neg, n, int_field(body, "seed", 0, 2**63 - 1), params, size, fmt)


def b64_file(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()
