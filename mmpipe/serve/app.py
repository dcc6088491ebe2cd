"""The FastAPI application: OpenAI-shaped routes over one shared ``Engine``.

Routes read raw forms and JSON (no pydantic models) so every bad field is answered with
OpenAI's error JSON and a 400, never FastAPI's 422. Which routes a recipe gets follows from
its declared inputs: an ``audio`` input serves /v1/audio/*, a ``prompt`` text input with an
image output serves /v1/images/generations; /v1/pipelines/run serves any recipe.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmpipe.graphs.base import Request as PipeRequest
from mmpipe.serve import openai_shapes as oa
from mmpipe.serve.engine import Engine
from mmpipe.serve.metrics import Metrics
from mmpipe.serve.openai_shapes import ApiError, bad

log = logging.getLogger("mmpipe.serve")


def create_app(engine: Engine) -> FastAPI:
    """The app serving ``engine``'s pipeline; weights load in the background at start-up."""
    metrics = Metrics(engine)
    plan = engine.plan
    from mmpipe.dsl.params import check_params, request_params

    specs = request_params(plan)
    audio_input = next((k for k, v in plan.inputs.items() if v.get("type") == "audio"), None)
    model_name = _model_name(plan)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.get_running_loop().run_in_executor(None, engine.load)
        yield
        await loading  # a SIGTERM while weights load: let them finish, then close cleanly
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title=f"mmpipe serve {plan.recipe}", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def any_error(_: Request, exc: Exception) -> JSONResponse:  # a bug of ours: logged, still OpenAI-shaped
        log.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(), status_code=500)

    app.add_middleware(_Count, metrics=metrics)

    def checked(values: dict[str, Any]) -> dict[str, Any]:
        """Per-request parameters converted and checked like recipe values (400 otherwise)."""
        out, problems = check_params(specs, values)
        if problems:
            name, msg = problems[0]
            raise bad(name, f"{name}: {msg}")
        return out

    # ---------------------------------------------------------------- info routes
    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.ready.is_set():
            return JSONResponse({"status": "ok", "recipe": plan.recipe, "in_flight": engine.active})
        return JSONResponse({"status": "error" if engine.load_error else "loading", "message": engine.load_error},
                            status_code=503, headers={"Retry-After": "5"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(engine.started), "owned_by": "mmpipe",
                                            "recipe": plan.recipe}]}

    @app.get("/metrics")
    async def prom() -> Response:
        text = await asyncio.to_thread(metrics.render)  # distributed: other ranks answer over the network
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---------------------------------------------------------------- audio
    async def audio(request: Request, task: str) -> Response:
        if audio_input is None:
            raise ApiError(404, f"recipe '{plan.recipe}' takes no audio input", "invalid_request_error")
        try:
            form = await request.form()
        except Exception as exc:
            raise bad(None, f"the body must be multipart/form-data: {exc}") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("file", "'file' must be an uploaded audio file")
        f = oa.audio_form(form, task)
        # extensions: any other per-request parameter the recipe declares (beam_size=1, ...)
        extra = {k: oa.form_value(form.get(k)) for k in form.keys() if k in specs and k not in f.params and k not in oa.AUDIO_FIELDS}
        params = checked({**extra, **f.params})
        rid = engine.new_id("audio")
        path = engine.work_dir / f"{rid}{Path(upload.filename or '').suffix[:8]}"
        path.write_bytes(await upload.read())
        try:
            duration = await asyncio.get_running_loop().run_in_executor(None, _audio_seconds, path)
            engine.admit()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        req = PipeRequest(id=rid, values={audio_input: str(path)}, input={"audio": upload.filename}, params=params)
        if f.stream:
            q: asyncio.Queue[str] = asyncio.Queue()
            fut = engine.submit(req, on_progress=_progress_to(q))
            fut.add_done_callback(lambda _: path.unlink(missing_ok=True))
            return StreamingResponse(_stream(engine, req, fut, q, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            res = await engine.run(req, request.is_disconnected)
        finally:
            path.unlink(missing_ok=True)
        body, media = oa.transcript_response(engine.check_result(res, "file"), f, task, duration)
        return Response(body, media_type=media)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await audio(request, "transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await audio(request, "translate")

    # ---------------------------------------------------------------- images
    @app.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        if "prompt" not in plan.inputs:
            raise ApiError(404, f"recipe '{plan.recipe}' takes no prompt", "invalid_request_error")
        f = oa.image_form(await _json(request))
        denoise = _node_with(plan, "height")
        if f.size is not None and denoise is not None:
            have = (int(denoise.config["width"]), int(denoise.config["height"]))
            if f.size != have:
                raise bad("size", f"this server makes {have[0]}x{have[1]} images (the size is fixed when it starts: "
                                  f"mmpipe serve {plan.recipe} width={f.size[0]} height={f.size[1]})")
        sched = f.params.pop("scheduler", None)
        if sched is not None and denoise is not None and sched != denoise.config.get("scheduler"):
            raise bad("scheduler", f"this server runs scheduler={denoise.config.get('scheduler')} (set when it starts: scheduler={sched})")
        params = checked(f.params)
        g = params.get("guidance_scale")
        if g is not None and denoise is not None and g > 1 >= float(denoise.config.get("guidance_scale", 0)):
            raise bad("guidance_scale", "this server runs without classifier-free guidance (start it with guidance_scale > 1)")
        seed0 = f.seed if f.seed is not None else int(plan.source["params"].get("seed", 0) if plan.source else 0)
        reqs = []
        for k in range(f.n):
            values: dict[str, Any] = {"prompt": f.prompt}
            if "negative_prompt" in plan.inputs:
                values["negative_prompt"] = f.negative_prompt
            reqs.append(PipeRequest(id=engine.new_id("img"), values=values, input={"prompt": f.prompt, "seed": seed0 + k},
                                    params={**params, "seed": seed0 + k}))
        engine.admit(len(reqs))
        results = await asyncio.gather(*(engine.run(r, request.is_disconnected) for r in reqs), return_exceptions=True)
        pngs = [_png_of(res) for res in results if not isinstance(res, BaseException) and res.ok]
        try:
            for res in results:  # the first error answers for all n (as one OpenAI request)
                if isinstance(res, BaseException):
                    raise res
                engine.check_result(res)
            if None in pngs:
                raise ApiError(500, f"recipe '{plan.recipe}' produced no PNG file (outputs: {', '.join(plan.outputs)})", "server_error")
            data = [{"b64_json": oa.b64_file(str(p)), "revised_prompt": None, "seed": r.outputs.get("seed")}  # type: ignore[union-attr]
                    for p, r in zip(pngs, results)]
        finally:
            for p in pngs:  # the files the save node wrote: answered inline, not kept
                if p is not None:
                    Path(p).unlink(missing_ok=True)
        return JSONResponse({"created": int(time.time()), "data": data})

    # ---------------------------------------------------------------- any recipe
    @app.post("/v1/pipelines/run")
    async def pipelines_run(request: Request) -> JSONResponse:
        from mmpipe.runtime.results import jsonable

        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
            raise bad("inputs", 'the body must be {"inputs": {...}, "params": {...}} with the recipe\'s declared inputs')
        values = _inputs(plan, body["inputs"])
        p = body.get("params") or {}
        if not isinstance(p, dict):
            raise bad("params", "'params' must be an object")
        rid = body.get("id", engine.new_id("run"))
        if not isinstance(rid, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", rid):
            raise bad("id", "'id' (optional) must be 1-64 letters, digits, '_', '.' or '-'")
        if engine.pipe is not None and engine.pipe.table.is_live(rid):
            raise ApiError(409, f"a request with id '{rid}' is already in flight", "invalid_request_error", "id")
        req = PipeRequest(id=rid, values=values, input={k: v for k, v in body["inputs"].items()}, params=checked(p))
        engine.admit()
        res = await engine.run(req, request.is_disconnected)
        return JSONResponse({"id": req.id, "recipe": plan.recipe, "outputs": jsonable(engine.check_result(res)),
                             "timings": jsonable(res.timings)})

    return app


class _Count:
    """Counts every HTTP request by route and status, and its latency (to the last byte of
    its body: a stream's whole length). Plain ASGI, because ``@app.middleware("http")``
    wraps each request in a task group and memory streams and makes every
    ``is_disconnected`` poll spawn tasks: with it the event loop took 5.3 ms of CPU per
    image request of ``benchmarks/serve.py --only sd``, without it 1.1 ms."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]  # an exception that escapes the routes becomes a 500 further out

        async def sent(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")  # the router sets it in this same scope
            self.metrics.observe_http(getattr(route, "path", "other"), status[0], time.perf_counter() - t0)


def _progress_to(q: "asyncio.Queue[str]") -> Callable[[Any, Any], None]:
    """An ``on_progress`` for the pipeline (called on a worker thread): a one-window request's
    agreed text, into ``q`` on the event loop. Later windows are stitched with overlaps
    trimmed, so a longer recording streams its text at the end."""
    loop = asyncio.get_running_loop()

    def progress(meta: Any, p: Any) -> None:
        if meta.of == 1 and meta.sub == 0 and isinstance(p, dict) and p.get("text"):
            loop.call_soon_threadsafe(q.put_nowait, oa.normalize(str(p["text"])))

    return progress


async def _stream(engine: Engine, req: PipeRequest, fut: "asyncio.Future[Any]", q: "asyncio.Queue[str]",
                  request: Request) -> AsyncIterator[bytes]:
    """Server-sent events: ``transcript.text.delta`` as the decoder's agreed text grows,
    then ``transcript.text.done`` with the whole text (and ``data: [DONE]``)."""
    sent = ""
    task = asyncio.ensure_future(engine.wait(req, fut, request.is_disconnected))
    try:
        while not task.done() or not q.empty():
            getter = asyncio.ensure_future(q.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                continue
            text = getter.result()
            # a prefix that grew (a fallback attempt that restarted the text is not sent)
            if len(text) > len(sent) and text.startswith(sent):
                delta, sent = text[len(sent):], text
                yield oa.sse({"type": "transcript.text.delta", "delta": delta})
        try:
            out = engine.check_result(task.result(), "file")
        except ApiError as exc:
            yield oa.sse({"type": "error", **exc.body()})
            return
        text = str(out.get("text") or "")
        if text.startswith(sent) and len(text) > len(sent):
            yield oa.sse({"type": "transcript.text.delta", "delta": text[len(sent):]})
        elif not text.startswith(sent):
            log.warning("request %s: streamed text %r is not a prefix of the final text %r", req.id, sent, text)
        yield oa.sse({"type": "transcript.text.done", "text": text})
        yield b"data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
            engine.pipe.cancel(req.id, "the client disconnected")


def _png_of(res: Any) -> str | None:
    """The PNG a text-to-image request's save node wrote (an output that names a .png file)."""
    return next((v for v in (res.outputs or {}).values() if isinstance(v, str) and v.endswith(".png")), None)


def _audio_seconds(path: Path) -> float:
    """The upload's duration; a file soundfile cannot read is the client's mistake (400)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise bad("file", f"the uploaded file is not audio that can be decoded (wav, flac, ogg, mp3): {exc}") from None
    if info.frames <= 0:
        path.unlink(missing_ok=True)
        raise bad("file", "the uploaded audio has no samples")
    return float(info.frames) / float(info.samplerate)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except Exception:
        raise bad(None, "the body must be JSON") from None


def _inputs(plan: Any, given: dict[str, Any]) -> dict[str, Any]:
    """JSON values for the recipe's declared inputs (tensors from nested lists)."""
    out: dict[str, Any] = {}
    for name, spec in plan.inputs.items():
        if name not in given:
            if spec.get("optional"):
                continue
            raise bad(f"inputs.{name}", f"missing input '{name}' ({spec.get('type')}); this recipe takes: {', '.join(plan.inputs)}")
        v, kind = given[name], spec.get("type")
        if kind == "tensor":
            import torch

            try:
                out[name] = torch.tensor(v, dtype=torch.float32)
            except (TypeError, ValueError) as exc:
                raise bad(f"inputs.{name}", f"input '{name}' must be a (nested) list of numbers: {exc}") from None
        elif kind == "audio":
            raise bad(f"inputs.{name}", "audio inputs are uploaded: POST /v1/audio/transcriptions")
        elif kind == "text" and not isinstance(v, str):
            raise bad(f"inputs.{name}", f"input '{name}' must be a string")
        else:
            out[name] = v
    extra = set(given) - set(plan.inputs)
    if extra:
        raise bad(f"inputs.{sorted(extra)[0]}", f"unknown input(s) {sorted(extra)}; this recipe takes: {', '.join(plan.inputs)}")
    return out


def _node_with(plan: Any, key: str) -> Any:
    return next((n for n in plan.nodes.values() if key in n.config and "guidance_scale" in n.config), None)


def _model_name(plan: Any) -> str:
    """The served model's name: the recipe plus its model group's name or path."""
    for n in plan.nodes.values():
        m = n.config.get("model")
        if isinstance(m, dict):
            name = m.get("name") or Path(str(m.get("path") or "")).name
            if name:
                return f"{plan.recipe}/{name}"
    return str(plan.recipe)
