"""OpenAI request fields in, response shapes out (no server: plain functions)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from mmpipe.serve.openai_shapes import ApiError, audio_form, image_form, normalize, transcript_response


class Form(dict):  # type: ignore[type-arg]
    """A multipart form as starlette gives it: ``get`` and ``getlist``."""

    def getlist(self, key: str) -> list[Any]:
        v = self.get(key)
        return [] if v is None else v if isinstance(v, list) else [v]


def _err(fn: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    assert e.value.status == 400 and set(e.value.body()["error"]) >= {"message", "type", "param"}
    return e.value


def test_audio_fields_become_per_request_parameters() -> None:
    f = audio_form(Form(language="de", prompt="Glossary: mmpipe.", temperature="0.2", response_format="verbose_json",
                        **{"timestamp_granularities[]": ["word", "segment"]}), "translate")
    assert f.params == {"task": "translate", "language": "de", "initial_prompt": "Glossary: mmpipe.", "temperature": 0.2,
                        "word_timestamps": True}
    assert f.words and f.response_format == "verbose_json" and not f.stream
    assert audio_form(Form(), "transcribe").params == {}


@pytest.mark.parametrize("form,param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": "3"}, "temperature"), ({"response_format": "mp3"}, "response_format"),
    ({"stream": "maybe"}, "stream"), ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),  # needs verbose_json
])
def test_bad_audio_fields_are_400s_naming_the_field(form: dict[str, Any], param: str) -> None:
    assert _err(audio_form, Form(form), "transcribe").param == param


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"), ({"prompt": "  "}, "prompt"), ({"prompt": 3}, "prompt"), ({}, "prompt"),
    ({"prompt": "x", "size": "60x64"}, "size"), ({"prompt": "x", "size": "big"}, "size"), ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "n": 0}, "n"), ({"prompt": "x", "n": True}, "n"), ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"), ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
])
def test_bad_image_fields_are_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert _err(image_form, body).param == param


def test_image_fields() -> None:
    f = image_form({"prompt": "a cat", "n": 2, "size": "64x32", "seed": 7, "negative_prompt": "fog", "guidance_scale": 3,
                    "num_inference_steps": 5})
    assert (f.prompt, f.n, f.size, f.seed, f.negative_prompt) == ("a cat", 2, (64, 32), 7, "fog")
    assert f.params == {"guidance_scale": 3.0, "num_inference_steps": 5}


def test_transcript_formats() -> None:
    seg = {"id": 0, "seek": 0, "start": 0.0, "end": 1.5, "text": "Hello there.", "tokens": [1, 2], "temperature": 0.0,
           "avg_logprob": -0.2, "compression_ratio": 1.0, "no_speech_prob": 0.01}
    out = {"text": "Hello there.", "segments": [seg], "language": "en"}
    f = audio_form(Form(response_format="verbose_json"), "transcribe")
    body = json.loads(transcript_response(out, f, "transcribe", 1.5)[0])
    assert body["language"] == "english" and body["segments"] == [seg] and body["duration"] == 1.5
    assert transcript_response(out, audio_form(Form(), "transcribe"), "transcribe", 1.5)[0] == '{"text": "Hello there."}'
    assert transcript_response(out, audio_form(Form(response_format="srt"), "transcribe"), "transcribe", 1.5)[0] == \
        "1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
    assert transcript_response(out, audio_form(Form(response_format="vtt"), "transcribe"), "transcribe", 1.5)[0].startswith("WEBVTT\n\n00:00.000 --> 00:01.500")


def test_normalize_joins_words_as_the_detokenizer() -> None:
    assert normalize(" Hello  from\nthe pipe\ufffd") == "Hello from the pipe"
