"""HTTP: the OpenAI-compatible API (/v1), /health, /metrics and the chat page (/)."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..generate import GenerationConfig
from ..pipeline import Encoded
from ..processing.image import load_image
from ..processing.video import VideoBytes, VideoError, open_video
from .config import ServerConfig, request_context
from .connections import uvicorn_config
from .engine import Engine, Job, QueueFull
from .fetch import FetchBusy, RemoteFetcher
from .media import MediaError, MediaPolicy, is_remote
from .memory import TrimAfterBigBodies
from .metrics import CONTENT_TYPE, Metrics
from .schema import (ChatRequest, CompletionRequest, GenerationRequest, ImagePart, TextPart, chunk, completion,
                     error_body, new_id, parse_request, text_chunk, text_completion, text_logprobs, token_logprobs,
                     usage)

PAGE = Path(__file__).parent / "static" / "index.html"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data: blob:; media-src blob:",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class ApiError(Exception):
    """Becomes an OpenAI-style JSON error response."""

    def __init__(self, status: int, message: str, code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.headers = status, message, code, type_, headers

    def response(self) -> Response:
        # json.dumps escapes non-ASCII: a message quoting odd client input always encodes
        return Response(json.dumps(error_body(self.message, self.type, self.code)), self.status,
                        headers=self.headers, media_type="application/json")


class _CountRequests:
    """ASGI middleware: counts /v1 responses by endpoint and status (streams stay untouched)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = _endpoint(path)

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(endpoint, message["status"])
            await send(message)
        await self.app(scope, receive, counted)


def _endpoint(path: str) -> str:
    return path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"


def create_app(pipe, config: ServerConfig) -> FastAPI:
    if config.max_batch > pipe.runner.max_slots:
        raise ValueError(f"--max-batch {config.max_batch}: at most {pipe.runner.max_slots} sequences run at once")
    max_context = request_context(pipe.runner, config.max_context)
    # No token is longer than the vocabulary's longest entry (byte-level: one character a byte at
    # most), so text longer than this cannot fit the context: refused before any tokenizing.
    token_chars = max(map(len, pipe.tokenizer.get_vocab(with_added_tokens=True)))
    max_chars = token_chars * max_context
    metrics = Metrics(config.max_batch)
    engine = Engine(pipe, config.max_batch, config.max_queue, metrics)
    media = MediaPolicy(config.media_root, config.max_media_bytes)
    fetcher = RemoteFetcher(config.allow_remote_media, config.allow_private_media_hosts, config.max_media_bytes,
                            config.remote_timeout_s, config.max_remote_fetches)
    metrics.gauges.update(
        queue_depth=("Requests waiting for a slot.", engine.queue_depth),
        running_sequences=("Sequences being generated.", engine.running),
        batch_slots=("Sequences decoded together (--max-batch).", lambda: config.max_batch),
        context_tokens=("Tokens per request (--max-context).", lambda: max_context),
        kv_cache_free_pages=("KV-cache pages free (cached prefixes no request holds included).",
                             lambda: pipe.runner.cache.free_pages),
        kv_cache_cached_pages=("KV-cache pages holding a prefix for reuse.", lambda: pipe.runner.cache.cached_pages))
    metrics.counters.update(
        prefix_cache_hits_total=("Requests that reused a cached prompt prefix.", lambda: pipe.runner.cache.hits),
        prefix_cache_hit_tokens_total=("Prompt tokens taken from the prefix cache instead of prefilled.",
                                       lambda: pipe.runner.cache.hit_tokens),
        prefix_cache_evictions_total=("Cached prefix pages given up to make room.",
                                      lambda: pipe.runner.cache.evictions))
    model = config.model_id
    # Requests reading videos now: each holds up to --max-video-frames decoded frames in memory.
    video_slots = threading.BoundedSemaphore(config.max_video_requests)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    # redirect_slashes off: /v1/models/ would answer 307 before the key is checked
    app = FastAPI(title="meganeura", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.engine, app.state.max_context, app.state.config = engine, max_context, config
    app.state.video_slots = video_slots
    app.add_middleware(_CountRequests, metrics=metrics)
    app.add_middleware(TrimAfterBigBodies)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        # A bug: bad input is a 4xx before it gets here. Starlette logs the traceback after this;
        # its answer comes from outside _CountRequests, so it is counted here.
        metrics.request(_endpoint(request.url.path), 500)
        return ApiError(500, "internal server error (details in the server's log)", type_="server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown routes and methods, in the same JSON shape
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    async def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
    keyed = APIRouter(dependencies=[Depends(require_key)])  # /health and /metrics tell load and usage

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "meganeura",
                                            "max_model_len": max_context}]}

    # ---- turning a request into a job -----------------------------------------------------
    def read(body: bytes, kind: type[GenerationRequest] = ChatRequest) -> GenerationRequest:
        """JSON and schema, then the cheap bounds (in a worker thread: a body may be 32 MB)."""
        try:
            data = json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        try:
            req = parse_request(data, kind)
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_request") from None
        if req.model != model:
            raise ApiError(404, f"model {req.model!r} does not exist: this server serves {model!r}",
                           code="model_not_found")
        chars = sum(map(len, req.texts()))
        if chars > max_chars:
            raise ApiError(400, f"the {'prompt holds' if kind is CompletionRequest else 'messages hold'} {chars} characters of text; this server's context of {max_context} "
                                f"tokens holds at most {max_chars} ({token_chars} characters a token at most)",
                           code="context_length_exceeded")
        count = len(req.image_urls())
        if count > config.max_images:
            raise ApiError(400, f"{count} images in the request; this server takes at most {config.max_images}",
                           code="too_many_images")
        videos = req.videos()
        if len(videos) > config.max_videos:
            raise ApiError(400, f"{len(videos)} videos in the request; this server takes at most {config.max_videos}",
                           code="too_many_videos")
        if (count or videos) and pipe.spec.vlm is None:
            raise ApiError(400, f"model {model!r} reads text only: remove the image and video parts",
                           code="images_not_supported")
        for asked in [getattr(req, "max_frames", None)] + [v.max_frames for v in videos]:
            if asked is not None and asked > config.max_video_frames:
                raise ApiError(400, f"max_frames {asked}: this server samples at most {config.max_video_frames} "
                                    "frames from a video (--max-video-frames)", code="too_many_frames")
        return req

    async def fetch(req: GenerationRequest) -> dict[str, bytes]:
        remote = [url for url in req.image_urls() + [v.url for v in req.videos()] if is_remote(url)]
        if not remote:
            return {}
        try:
            return await fetcher.fetch(remote)
        except MediaError as e:
            raise ApiError(400, f"remote media: {e}", code="media_not_allowed") from None
        except FetchBusy as e:
            raise ApiError(429, f"the server is busy ({e}): retry shortly or send the media as a data: URL",
                           code="fetches_busy", type_="server_busy", headers={"Retry-After": "1"}) from None

    def image(url: str, index: int, fetched: dict[str, bytes]):
        try:
            return load_image(fetched[url] if url in fetched else media.open(url), max_pixels=config.max_image_pixels)
        except MediaError as e:
            raise ApiError(400, f"image {index}: {e}", code="media_not_allowed") from None
        except ValueError as e:
            raise ApiError(400, f"image {index}: {e}", code="invalid_image") from None

    def video(part, index: int, fetched: dict[str, bytes], default_frames: int | None):
        """A video part opened (probed and sampled; decoded later, by pipe.encode) within the limits."""
        name = f"video {index}"
        try:
            source = fetched[part.url] if part.url in fetched else media.open(part.url, "video")
            data = VideoBytes.from_data_url(source, name) if isinstance(source, str) else VideoBytes(source, name)
            frames = min(part.max_frames or default_frames or pipe.video_config.max_frames, config.max_video_frames)
            return open_video(data, pipe.video_config, max_frames=frames, max_pixels=config.max_image_pixels,
                              max_stream_frames=config.max_video_stream_frames, time_limit_s=config.video_timeout_s)
        except MediaError as e:
            raise ApiError(400, f"{name}: {e}", code="media_not_allowed") from None
        except ValueError as e:  # VideoError names the video
            raise ApiError(400, str(e), code="invalid_video") from None

    def constrain(req: GenerationRequest):
        """The request's grammar, checked (a bad schema or regex is a 400 naming it)."""
        asked = req.constraint_fields()
        if len(asked) > 1:
            raise ApiError(400, f"give one of {', '.join(asked)}, not several", code="invalid_request")
        for name, (arg, value) in asked.items():
            try:
                grammar = pipe.constraint(**{arg: value})
            except ValueError as e:
                where = "" if str(e).startswith(name) else f"{name}: "
                raise ApiError(400, f"{where}{e}", code="invalid_response_format") from None
            if grammar is not None and req.ignore_eos:  # ({"type": "text"} asks for no grammar)
                raise ApiError(400, f"ignore_eos cannot go with {name}: the grammar decides where the answer "
                                    "ends", code="invalid_request")
            return grammar
        return None

    def prepare(req: GenerationRequest, fetched: dict[str, bytes], grammar) -> tuple[object, GenerationConfig]:
        """Images decoded and the prompt tokenized (in a worker thread: both are slow)."""
        enc = encode_text(req) if isinstance(req, CompletionRequest) else encode_chat(req, fetched)
        n, limit = len(enc.input_ids), req.answer_limit
        room = max_context - n
        if room < 1 or (limit or 0) > room:
            asked = f" + {limit} for the answer (max_tokens)" if limit else ""
            raise ApiError(400, f"this server's context is {max_context} tokens per request; the prompt takes "
                                f"{n}{asked}", code="context_length_exceeded")
        return enc, req.sampling(limit or room, grammar)

    def encode_text(req: CompletionRequest) -> Encoded:
        """A raw prompt: its tokens as they are, no chat template."""
        try:
            ids = pipe.tokenizer.encode(req.prompt, add_special_tokens=False).ids
        except TypeError as e:
            raise ApiError(400, f"prompt: {e}", code="invalid_prompt") from None
        return Encoded(np.array(ids, dtype=np.int64), None, None)

    def encode_chat(req: ChatRequest, fetched: dict[str, bytes]) -> Encoded:
        messages, images, videos = [], 0, 0
        for m in req.messages:
            if isinstance(m.content, str):
                messages.append({"role": m.role, "content": m.content})
                continue
            parts = []
            for p in m.content:
                if isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
                elif isinstance(p, ImagePart):
                    parts.append({"type": "image", "image": image(p.image_url.url, images, fetched)})
                    images += 1
                else:
                    parts.append({"type": "video", "video": video(p, videos, fetched, req.max_frames)})
                    videos += 1
            messages.append({"role": m.role, "content": parts})
        try:
            return pipe.encode(messages)  # decodes the videos' frames: errors name the video
        except VideoError as e:
            raise ApiError(400, str(e), code="invalid_video") from None
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_messages") from None

    # ---- running a job ----------------------------------------------------------------
    def token_text(token: int) -> str:
        return pipe.tokenizer.decode([token], skip_special_tokens=False)

    async def answer(job: Job):
        """Text pieces (and lists of TokenLogprob when asked), then the GenerationResult; an
        engine failure raises ApiError(500)."""
        first = None
        while True:
            kind, value = await job.next_event()
            if kind == "error":
                raise ApiError(500, value, type_="server_error")
            if kind == "logprobs":
                yield value
                continue
            if kind == "text":
                first = first or time.perf_counter()
                yield value
                continue
            now = time.perf_counter()
            metrics.finished(value.prompt_tokens, len(value.token_ids), now - job.arrived,
                             first - job.arrived if first else None)
            yield value
            return

    async def stream(job: Job, id_: str, include_usage: bool, raw: bool = False, offset: int = 0):
        """Server-sent events of a chat completion, or with `raw` of a text completion (whose
        legacy logprobs count text offsets from `offset`, the prompt's length)."""
        def event(body: dict) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def logprobs(tokens) -> dict | None:
            nonlocal offset
            if not tokens:
                return None
            if not raw:
                return token_logprobs(tokens, token_text)
            body = text_logprobs(tokens, token_text, offset)
            offset = body["text_offset"][-1] + len(body["tokens"][-1])
            return body
        ended, tokens = False, []  # tokens: log-probabilities waiting for the text they make
        try:
            if not raw:
                yield event(chunk(id_, model, {"role": "assistant", "content": ""}))
            async for item in answer(job):
                if isinstance(item, list):
                    tokens += item
                    continue
                if isinstance(item, str):
                    yield event(text_chunk(id_, model, item, logprobs=logprobs(tokens)) if raw else
                                chunk(id_, model, {"content": item}, logprobs=logprobs(tokens)))
                    tokens = []
                    continue
                ended = True
                yield event(text_chunk(id_, model, "", item.finish_reason, logprobs=logprobs(tokens)) if raw else
                            chunk(id_, model, {}, item.finish_reason, logprobs=logprobs(tokens)))
                if include_usage:
                    counts = usage(item.prompt_tokens, len(item.token_ids), item.cached_tokens)
                    yield event(text_chunk(id_, model, usage_=counts) if raw else chunk(id_, model, usage_=counts))
        except ApiError as e:
            ended = True
            yield event(error_body(e.message, e.type, e.code))
        finally:
            if not ended:  # the client left (Starlette cancelled us): free the slot now
                job.cancelled = True
                metrics.disconnected()
        yield "data: [DONE]\n\n"

    async def complete(request: Request, job: Job, id_: str, raw: bool = False, offset: int = 0):
        tokens = []

        async def result():
            async for item in answer(job):
                if isinstance(item, list):
                    tokens.extend(item)
                elif not isinstance(item, str):
                    return item
        waiter, gone = asyncio.ensure_future(result()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():  # the client left (or the server is stopping): free the slot now
                waiter.cancel()
                job.cancelled = True
                metrics.disconnected()
        if not waiter.done() or waiter.cancelled():
            return Response(status_code=499)  # nobody reads it
        res = waiter.result()  # raises ApiError on an engine failure
        asked = job.cfg.logprobs is not None
        if raw:
            return text_completion(id_, model, res.text, res.finish_reason, res.prompt_tokens, len(res.token_ids),
                                   res.cached_tokens, text_logprobs(tokens, token_text, offset) if asked else None)
        return completion(id_, model, res.text, res.finish_reason, res.prompt_tokens, len(res.token_ids),
                          token_logprobs(tokens, token_text) if asked else None, res.cached_tokens)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatRequest)

    @v1.post("/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    async def generate(request: Request, kind: type[GenerationRequest]):
        arrived = time.perf_counter()
        raw = kind is CompletionRequest
        body = await _read_body(request, config.max_body_bytes, config.body_timeout_s)
        req = await run_in_threadpool(read, body, kind)
        grammar = await run_in_threadpool(constrain, req)  # a bad schema is refused before any fetch
        # A request with videos holds a slot from reading them until the engine has their features.
        videos = bool(req.videos())
        if videos and not video_slots.acquire(blocking=False):
            raise ApiError(429, f"the server is busy ({config.max_video_requests} requests are reading or holding "
                                "videos): retry shortly", code="videos_busy", type_="server_busy",
                           headers={"Retry-After": "1"})
        try:
            enc, cfg = await run_in_threadpool(prepare, req, await fetch(req), grammar)
        except BaseException:
            if videos:
                video_slots.release()
            raise
        job = Job(enc, cfg, asyncio.get_running_loop(), arrived=arrived,
                  on_drop=video_slots.release if videos else None)
        try:
            engine.submit(job)
        except QueueFull:
            job.drop_encoded()
            raise ApiError(429, f"the server is busy ({config.max_batch} requests running, {config.max_queue} "
                                "waiting): retry shortly", code="queue_full", type_="server_busy",
                           headers={"Retry-After": "1"}) from None
        id_prefix = "cmpl-" if raw else "chatcmpl-"
        offset = len(req.prompt) if raw else 0  # OpenAI counts text_offset from the start of the prompt
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, new_id(id_prefix), include_usage, raw, offset),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, new_id(id_prefix), raw, offset)

    app.include_router(v1)

    @keyed.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok", "model": model, "running": engine.running(), "queued": engine.queue_depth()}

    @keyed.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(keyed)

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html", headers=PAGE_HEADERS)

    return app


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    too_big = ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big

    async def read() -> bytes:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
        return bytes(body)
    try:  # a deadline for the whole body: a client trickling it would hold its connection for ever
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        # closed: the rest of the body would follow on this connection otherwise
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout",
                       headers={"Connection": "close"}) from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- running the server -------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(pipe, config: ServerConfig) -> None:
    """`meganeura serve`: blocks until interrupted."""
    if config.host not in LOOPBACK and config.api_key is None:
        print(f"warning: listening on {config.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(pipe, config)
    cache = pipe.runner.cache
    print(f"serving {config.model_id} on http://{config.host}:{config.port} ({config.max_batch} sequences at once, "
          f"{app.state.max_context} tokens each; KV cache of {cache.capacity_tokens} tokens)", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, config, host=config.host, port=config.port, log_level="info",
                                  timeout_graceful_shutdown=5)).run()


class ServerThread:
    """The server on 127.0.0.1 and an ephemeral port, in a background thread (tests, benchmarks).

        with ServerThread(create_app(pipe, config)) as url: ...
    """

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn_config(app, app.state.config, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
