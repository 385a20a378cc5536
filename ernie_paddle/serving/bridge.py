"""One request in the engine, seen from the event loop: its events crossed over from the engine thread, its text.

The engine calls `emit` from its own thread; each event is handed to the loop with `call_soon_threadsafe`, stamped
with the time it happened (so the latency histograms measure the engine, not the loop). The request is cancelled
in the engine as soon as its reader stops reading for any reason (a stop string, a client gone, an error), which
frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from ernie_paddle.errors import InputError
from ernie_paddle.serving.engine import Engine, Finished, QueueFull, Request, ShuttingDown, Token
from ernie_paddle.serving.metrics import ServerMetrics
from ernie_paddle.serving.protocol import ApiError, Job
from ernie_paddle.serving.responses import usage
from ernie_paddle.serving.text import Piece, TextStream


class Generation:
    """Submit a Job (`submit`), then read its text (`pieces`); `finish_reason` and the token counts are set as it
    goes."""

    def __init__(self, engine: Engine, job: Job, tokenizer, metrics: ServerMetrics):
        self.engine, self.job, self.metrics = engine, job, metrics
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[float, Token | Finished]] = asyncio.Queue()
        self.request = Request(job.prompt, job.gen, self._emit, logprobs=job.logprobs,
                               score_prompt=job.echo and job.logprobs is not None)
        self.text = TextStream(tokenizer, job.prompt, job.stops, keep=job.chat.tags if job.chat else ())
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.ended = False  # the engine has sent Finished, or was told to cancel

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt)

    @property
    def usage(self) -> dict:
        """The answer's `usage`: its tokens, and the prompt tokens the prefix cache gave (set at its first prefill)."""
        return usage(self.prompt_tokens, self.completion_tokens, self.request.cached_tokens)

    def _emit(self, event: Token | Finished) -> None:
        """The engine thread's callback."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (time.monotonic(), event))
        except RuntimeError:  # the loop has closed (the server stopped): nobody is reading
            pass

    def submit(self) -> None:
        """Queue the request; a full queue, a server shutting down or a prompt that does not fit is an ApiError."""
        try:
            self.engine.submit(self.request)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", code="queue_full") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        except InputError as e:  # the prompt (or prompt + max_tokens) does not fit the context, or bad token ids
            raise ApiError(400, str(e), self._length_param()) from None
        self.metrics.prompt_tokens.inc(self.prompt_tokens)

    def _length_param(self) -> str:
        """The field to blame: max_tokens when the user set it and the prompt alone fits, else the prompt."""
        fits = self.prompt_tokens < self.engine.max_len
        return self.job.max_tokens_param if fits and self.job.max_tokens_param else self.job.prompt_param

    async def pieces(self) -> AsyncIterator[Piece]:
        """The answer's text as it is released; `finish_reason` is set before the last piece. A request the model
        failed is an ApiError (500), one the server aborted at shutdown an ApiError (503)."""
        last = None
        try:
            while True:
                at, event = await self.events.get()
                if isinstance(event, Finished):
                    self.ended = True
                    if event.reason in ("stop", "length"):
                        self.finish_reason = event.reason
                        yield self.text.finish()
                        return
                    if event.reason == "error":
                        raise ApiError(500, f"the model failed on this request: {event.error}", code="model_error")
                    raise ApiError(503, event.error or f"the request was {event.reason}", code="shutting_down")
                self._observe(at, last)
                last = at
                piece = self.text.push(event)
                if self.text.stopped:
                    self.cancel()
                    self.finish_reason = "stop"
                    yield piece
                    return
                if piece.text or piece.tokens:
                    yield piece
        finally:
            self.cancel()  # the reader stopped early (a client gone): free the row now

    def _observe(self, at: float, last: float | None) -> None:
        self.completion_tokens += 1
        self.metrics.generation_tokens.inc()
        if last is None:
            self.metrics.ttft.observe(at - self.request.submitted)
        else:
            self.metrics.itl.observe(at - last)

    def cancel(self) -> None:
        """Stop the request in the engine unless it has ended (idempotent)."""
        if not self.ended:
            self.ended = True
            self.engine.cancel(self.request)
