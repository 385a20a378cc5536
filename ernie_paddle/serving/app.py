"""The OpenAI-compatible HTTP routes (FastAPI) over one model and its continuous-batching engine.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (each whole or streamed as server-sent
events; several choices and echoed prompts whole: `scoring_api`), `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info` (`tokenize_api`), `GET /health` and `GET /metrics`. With an API key every route but /health needs `Authorization: Bearer
KEY`. Every error is OpenAI's error object. A client that goes away, streaming or not, has its request cancelled in
the engine at once. With a prefix cache folder the engine's pool of computed prefixes is read from it before the
engine starts and written back (`Service.save_prefix_cache`) once it has stopped.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ernie_paddle.text.chat_output import ChatDelta, ChatFormat, ChatOutputParser
from ernie_paddle.text.tokenizer import ErnieTokenizer
from ernie_paddle.serving.bridge import Generation
from ernie_paddle.generation import GenerationConfig
from ernie_paddle.serving.engine import Engine
from ernie_paddle.errors import ErnieError
from ernie_paddle.serving.metrics import CountRequests, ServerMetrics
from ernie_paddle.serving.prefix_cache import FILE as PREFIX_CACHE_FILE
from ernie_paddle.serving.protocol import ApiError, ServedModel, parse_chat, parse_completion, read_body
from ernie_paddle.serving.responses import (DONE, Head, chat_choice, chat_message, completion_choice, completion_logprobs, sse,
                        tool_calls)
from ernie_paddle.serving.responses import chat_logprobs
from ernie_paddle.serving import scoring_api, tokenize_api

CLIENT_CLOSED = 499  # the status logged for a request whose client left before the answer (nginx's)


@dataclass
class Service:
    """What the routes serve: the model as clients see it, its running engine, the metrics and the API key;
    `prefix_cache_file`: where the prefix cache is kept across restarts (None: not kept)."""

    engine: Engine
    model: ServedModel
    metrics: ServerMetrics
    api_key: str | None = None
    prefix_cache_file: str | None = None

    def save_prefix_cache(self) -> None:
        """Write the prefix cache to its file, atomically (call once the engine has stopped: it owns the pool)."""
        if self.prefix_cache_file is not None:
            self.engine.prefix.save(self.prefix_cache_file, self.engine.model.identity)


def prefix_cache_file(folder: str) -> str:
    """The prefix cache's file in `folder` (`serve --prefix-cache-dir`), the folder made if missing; an ErnieError
    naming it when it cannot be made or written (found at start, not when the pool is saved at shutdown)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ErnieError(f"{folder}: cannot make the prefix cache folder: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ErnieError(f"{folder}: the prefix cache folder is not writable")
    return os.path.join(folder, PREFIX_CACHE_FILE)


def start_service(model, folder: str, name: str | None = None, api_key: str | None = None,
                  prefill_chunk: int = GenerationConfig.prefill_chunk, prefix_cache_dir: str | None = None,
                  **engine_options) -> Service:
    """Start an engine on `model` (its tokenizer read from `folder`); `name` defaults to the folder's name;
    requests prefill `prefill_chunk` tokens at a time. With `prefix_cache_dir` (and a prefix cache: its memory is
    not 0) the pool saved there is loaded first; a file of another model, or corrupt, is a KVFileError naming it."""
    tok = ErnieTokenizer(folder)
    engine = Engine(model, **engine_options)
    path = prefix_cache_file(prefix_cache_dir) if prefix_cache_dir is not None and engine.prefix.enabled else None
    if path is not None and os.path.exists(path):
        engine.prefix.load(path, model.identity)
    served = ServedModel(name or os.path.basename(os.path.normpath(folder)), tok, engine.max_len,
                         model.config.vocab_size, ChatFormat.of(tok), prefill_chunk)
    engine.start()
    return Service(engine, served, ServerMetrics(engine), api_key, path)


def create_app(service: Service) -> FastAPI:
    """The routes of `service`, with request counting and OpenAI-style errors."""
    app = FastAPI(title="ernie-paddle", docs_url=None, redoc_url=None, openapi_url=None)
    engine, served, metrics = service.engine, service.model, service.metrics
    auth = [Depends(_key_check(service.api_key))]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), e.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                                         "owned_by": "ernie-paddle",
                                                         "max_model_len": served.max_len}]})

    async def answer(request: Request, chat: bool) -> Response:
        """Check the body, queue the request, then answer it whole or as a stream of events."""
        parse, whole, events = (parse_chat, _chat, _chat_events) if chat else (
            parse_completion, _completion, _completion_events)
        job = parse(read_body(await request.body()), served)
        jobs = scoring_api.choices(job)
        if len(jobs) > 1 or job.echo:  # several choices (prompts, n), or the prompt echoed: answered whole
            several = scoring_api.Choices([Generation(engine, j, served.tokenizer, metrics) for j in jobs], job.n)
            several.submit()
            head = Head.new(chat=chat, stream=False, model=served.name)
            return await _unless_client_leaves(request, several.whole(head, whole, served.tokenizer), several)
        gen = Generation(engine, job, served.tokenizer, metrics)
        gen.submit()
        head = Head.new(chat=chat, stream=job.stream, model=served.name, include_usage=job.include_usage)
        if job.stream:
            return _event_stream(events(gen, head), gen)
        return await _unless_client_leaves(request, whole(gen, head), gen)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await answer(request, chat=True)

    tokenize_api.add_routes(app, served, auth)
    endpoints = {route.path for route in app.routes}
    app.add_middleware(CountRequests, metrics=metrics, endpoints=endpoints)
    return app


def _key_check(api_key: str | None):
    """A dependency refusing (401) a request without `Authorization: Bearer <api_key>`; none without a key."""
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        if api_key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                           expected):
            raise ApiError(401, "missing or wrong API key: send the header \"Authorization: Bearer <key>\"",
                           code="invalid_api_key")

    return check


# ---- whole answers -------------------------------------------------------------------------------------------------
async def _completion(gen: Generation, head: Head) -> dict:
    texts, tokens = [], []
    async for piece in gen.pieces():
        texts.append(piece.text)
        tokens += piece.tokens
    logprobs = completion_logprobs(tokens) if gen.job.logprobs is not None else None
    return head.wrap([completion_choice("".join(texts), gen.finish_reason, logprobs)],
                     gen.usage)


async def _chat(gen: Generation, head: Head) -> dict:
    parser = ChatOutputParser(gen.job.chat, gen.job.reasoning_open)
    tokens = []
    async for piece in gen.pieces():
        parser.push(piece.text)
        tokens += piece.tokens
    parser.finish()
    out = parser.result
    logprobs = chat_logprobs(tokens) if gen.job.logprobs is not None else None
    return head.wrap([chat_choice(chat_message(out.content, out.reasoning, out.tool_calls),
                                  _chat_finish_reason(gen, bool(out.tool_calls)), logprobs=logprobs)],
                     gen.usage)


def _chat_finish_reason(gen: Generation, called: bool) -> str | None:
    """"tool_calls" when the answer ended (not cut by max_tokens) after calling tools."""
    return "tool_calls" if called and gen.finish_reason == "stop" else gen.finish_reason


async def _unless_client_leaves(request: Request, answer: Awaitable[dict], gen: Generation) -> Response:
    """The answer as JSON; if the client disconnects first, its request is cancelled in the engine."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            gen.cancel()
    if work.cancelled():
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; it names the case in the metrics
    return JSONResponse(work.result())  # an ApiError raised by the generation becomes its error answer


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- streams ---------------------------------------------------------------------------------------------------------
def _event_stream(events: AsyncIterator[bytes], gen: Generation) -> StreamingResponse:
    """Server-sent events; the engine request is cancelled however the stream ends (a client gone included)."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                             background=BackgroundTask(gen.cancel))


async def _completion_events(gen: Generation, head: Head) -> AsyncIterator[bytes]:
    try:
        async for piece in gen.pieces():
            logprobs = completion_logprobs(piece.tokens) if gen.job.logprobs is not None else None
            if piece.text or logprobs:
                yield sse(head.wrap([completion_choice(piece.text, None, logprobs)]))
        yield sse(head.wrap([completion_choice("", gen.finish_reason)]))
        if head.include_usage:
            yield sse(head.wrap([], gen.usage))
    except ApiError as e:  # the status has been sent: the error goes in the stream, as vLLM sends it
        yield sse(e.body())
    yield DONE


async def _chat_events(gen: Generation, head: Head) -> AsyncIterator[bytes]:
    parser = ChatOutputParser(gen.job.chat, gen.job.reasoning_open)
    calls = 0
    try:
        yield sse(head.wrap([chat_choice({"role": "assistant", "content": ""}, None, stream=True)]))
        async for piece in gen.pieces():
            delta = parser.push(piece.text)
            logprobs = chat_logprobs(piece.tokens) if gen.job.logprobs is not None and piece.tokens else None
            if delta.reasoning or delta.content or delta.tool_calls or logprobs:
                yield sse(head.wrap([chat_choice(_chat_delta(delta, calls), None, stream=True, logprobs=logprobs)]))
                calls += len(delta.tool_calls)
        delta = parser.finish()
        if delta.reasoning or delta.content or delta.tool_calls:
            yield sse(head.wrap([chat_choice(_chat_delta(delta, calls), None, stream=True)]))
        reason = _chat_finish_reason(gen, bool(parser.result.tool_calls))
        yield sse(head.wrap([chat_choice({}, reason, stream=True)]))
        if head.include_usage:
            yield sse(head.wrap([], gen.usage))
    except ApiError as e:
        yield sse(e.body())
    yield DONE


def _chat_delta(delta: ChatDelta, calls_before: int) -> dict:
    """A stream's delta: reasoning_content, content and whole tool calls (numbered across the answer)."""
    out: dict = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        out["tool_calls"] = tool_calls(delta.tool_calls, calls_before, indexed=True)
    return out
