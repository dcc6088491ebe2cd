"""The HTTP counting middleware of ``mmpipe serve``: every answer counted once, by route and
status (also errors and unknown paths), with a latency that covers a streamed body."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from mmpipe.serve.app import _Count  # noqa: E402
from mmpipe.serve.openai_shapes import ApiError  # noqa: E402


class Seen:
    """Stands in for ``Metrics``: what ``observe_http`` was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.calls.append((route, status, seconds))


def make_app(seen: Seen) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ApiError)
    async def api_error(_: Any, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/ok/{x}")
    async def ok(x: str) -> dict[str, str]:
        return {"x": x}

    @app.get("/bad")
    async def bad() -> None:
        raise ApiError(400, "no", "invalid_request_error", "field")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            await asyncio.sleep(0.2)
            yield b"b"

        return StreamingResponse(body(), media_type="text/plain")

    app.add_middleware(_Count, metrics=seen)
    return app


def test_every_answer_is_counted_by_route_template_and_status() -> None:
    seen = Seen()
    with TestClient(make_app(seen), raise_server_exceptions=False) as client:
        assert client.get("/ok/1").status_code == 200
        assert client.get("/bad").status_code == 400
        assert client.get("/boom").status_code == 500
        assert client.get("/nowhere").status_code == 404
        r = client.get("/stream")
        assert r.status_code == 200 and r.text == "ab"
    got = [(route, status) for route, status, _ in seen.calls]
    assert got == [("/ok/{x}", 200), ("/bad", 400), ("/boom", 500), ("other", 404), ("/stream", 200)]
    assert seen.calls[-1][2] >= 0.2  # a stream counts until its last byte, not its headers
