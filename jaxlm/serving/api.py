"""The HTTP front of `jaxlm serve`: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/health and Prometheus /metrics, on FastAPI. Each request becomes n sequences for the scheduler; their tokens
come back on the event loop, are turned into text (cut at stop strings), and are answered whole or streamed
as server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxlm.data.chat import Template, TemplateError
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference.generate import prompt_ids
from jaxlm.serving import protocol
from jaxlm.serving.detokenize import TextStream
from jaxlm.serving.engine import Sampling
from jaxlm.serving.metrics import ServerMetrics
from jaxlm.serving.protocol import APIError, ChatRequest, CompletionRequest
from jaxlm.serving.scheduler import Closed, Finished, QueueFull, Scheduler, Sequence, Token

DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class Served:
    """What the endpoints need: the model's scheduler, its tokenizer and chat template, and the settings."""

    scheduler: Scheduler
    tokenizer: Tokenizer
    template: Template
    model_name: str
    api_key: str = ""

    @property
    def metrics(self) -> ServerMetrics:
        return self.scheduler.metrics

    @property
    def slots(self) -> int:
        return self.scheduler.engine.slots

    @property
    def context(self) -> int:
        """The model's context length, in tokens."""
        return self.scheduler.engine.max_len

    @property
    def vocab_size(self) -> int:
        return self.scheduler.engine.model.config.vocab_size


@dataclasses.dataclass
class Choice:
    """One sequence's progress as the endpoint sees it."""

    sequence: Sequence
    text: TextStream
    tokens: int = 0
    finish: str | None = None


@dataclasses.dataclass
class Job:
    """One HTTP request in flight: its choices and the queue their events arrive on."""

    choices: list[Choice]
    events: asyncio.Queue
    prompt_tokens: int
    logprobs: int | None  # alternatives per token to report; None reports no log-probabilities


def create_app(served: Served) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        served.scheduler.start()
        yield
        served.scheduler.stop()  # after uvicorn has let the requests in flight finish (or the grace ran out)

    app = FastAPI(title="jaxlm", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        served.metrics.requests.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        message, param = protocol.validation_message(list(e.errors()))
        return await api_error(request, APIError(400, message, param=param))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        served.metrics.observe_counts(*served.scheduler.counts())
        return Response(served.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(served, request)
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": 0,
                                            "owned_by": "jaxlm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _authorize(served, request)
        _check_common(served, body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = [_completion_prompt(served, p) for p in _prompt_list(body.prompt)]
        return await _answer(served, request, body, prompts, body.max_tokens, body.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        _authorize(served, request)
        _check_common(served, body)
        try:
            text = served.template.render([{"role": m.role, "content": m.text()} for m in body.messages],
                                          add_generation_prompt=True)
        except TemplateError as e:
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        if served.template.stop_string:
            body = body.model_copy(update={"stop": [*body.stops(), served.template.stop_string]})
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(served, request, body, [prompt_ids(served.tokenizer, text)], max_tokens, top, chat=True)

    return app


def _authorize(served: Served, request: Request) -> None:
    if not served.api_key:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(given.encode(), served.api_key.encode()):
        raise APIError(401, "incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


def _check_common(served: Served, body) -> None:
    if body.model != served.model_name:
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{served.model_name}'",
                       param="model", code="model_not_found")
    if body.top_k > served.vocab_size:
        raise APIError(400, f"top_k={body.top_k} is more than the vocabulary's {served.vocab_size} tokens",
                       param="top_k")
    for field in ("presence_penalty", "frequency_penalty"):
        if getattr(body, field):
            raise APIError(400, f"{field} is not supported (only 0)", param=field)


def _prompt_list(prompt) -> list:
    """The prompts of a completions request: one string or token list, or a list of them."""
    if not prompt and not isinstance(prompt, str):
        raise APIError(400, "'prompt' is an empty list; send a string, a list of token ids, or a list of those",
                       param="prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _completion_prompt(served: Served, prompt) -> list[int]:
    if isinstance(prompt, str):
        return prompt_ids(served.tokenizer, prompt)
    if not prompt or any(t < 0 or t >= served.vocab_size for t in prompt):
        raise APIError(400, f"a token prompt must be a non-empty list of ids in [0, {served.vocab_size})",
                       param="prompt")
    return list(prompt)


def _plan(served: Served, prompts: list[list[int]], n: int, max_tokens: int | None) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) of each choice; a prompt that leaves no room, or more choices than slots, is a 400."""
    if len(prompts) * n > served.slots:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} sequences, more than the "
                            f"server's {served.slots} decode slots (--max-batch); send fewer", param="n")
    plan = []
    for prompt in prompts:
        room = served.context - len(prompt)
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, beyond the "
                                f"model's context of {served.context} tokens; shorten the prompt or lower "
                                "max_tokens", param="max_tokens" if room >= 1 else "prompt",
                           code="context_length_exceeded")
        plan += [(prompt, max_tokens or room)] * n
    return plan


def _start(served: Served, body, prompts, max_tokens, logprobs) -> Job:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    seed = body.seed if body.seed is not None else secrets.randbits(32)
    choices = []
    for i, (prompt, limit) in enumerate(_plan(served, prompts, body.n, max_tokens)):
        emit = lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, event))
        sampling = Sampling(body.temperature, body.top_k, body.top_p, (seed + i) % (1 << 32))
        sequence = Sequence(prompt, limit, sampling, emit, top_logprobs=logprobs or 0, ignore_eos=body.ignore_eos)
        choices.append(Choice(sequence, TextStream(served.tokenizer, body.stops())))
    try:
        served.scheduler.submit([c.sequence for c in choices])
    except QueueFull as e:
        raise APIError(429, str(e), kind="rate_limit_error", code="queue_full") from None
    except Closed as e:
        raise APIError(503, str(e), kind="server_error") from None
    return Job(choices, events, sum(len(p) for p in prompts), logprobs)


async def _answer(served, request, body, prompts, max_tokens, logprobs, chat: bool):
    job = _start(served, body, prompts, max_tokens, logprobs)
    served.metrics.requests.labels("200").inc()
    shape = ChatShape(served, body.model) if chat else CompletionShape(served, body.model)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(served, job, shape, usage), media_type="text/event-stream")
    watcher = asyncio.create_task(_watch_disconnect(served, request, job))
    try:
        parts = [[] for _ in job.choices]
        async for i, text, token in _deltas(served, job):
            parts[i].append((text, token))
    finally:
        watcher.cancel()
        served.scheduler.cancel([c.sequence for c in job.choices])
    return shape.whole(job, parts)


async def _watch_disconnect(served: Served, request: Request, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    served.scheduler.cancel([c.sequence for c in job.choices])


async def _deltas(served: Served, job: Job) -> AsyncIterator[tuple[int, str, Token | None]]:
    """(choice, new text, token) as tokens arrive; token None marks a choice's end (its finish is set)."""
    pending = len(job.choices)
    while pending:
        i, event = await job.events.get()
        choice = job.choices[i]
        if choice.finish is not None:
            continue  # a stop string ended it; the engine's last tokens are not part of it
        if isinstance(event, Finished):
            if event.reason == "error":
                raise APIError(500, f"generation failed: {event.message}", kind="server_error")
            choice.finish = "stop" if event.reason == "cancelled" else event.reason
            pending -= 1
            yield i, choice.text.finish(), None
            continue
        choice.tokens += 1
        text = choice.text.push(event.id)
        if choice.text.stopped:
            choice.finish = "stop"
            served.scheduler.cancel([choice.sequence])
            pending -= 1
            yield i, text, event
            yield i, "", None
            continue
        yield i, text, event


async def _sse(served: Served, job: Job, shape, usage: bool) -> AsyncIterator[str]:
    """The streamed answer: one event per new piece of text (or token, with log-probabilities), a last one
    per choice with its finish reason, usage if asked, then [DONE]. Closing the stream (the client went away)
    cancels the sequences, which frees their slots."""
    try:
        for event in shape.opening(job):
            yield _event(event)
        async for i, text, token in _deltas(served, job):
            if token is None:
                yield _event(shape.chunk(job, i, "", None, job.choices[i].finish))
            elif text or job.logprobs is not None:
                yield _event(shape.chunk(job, i, text, token, None))
        if usage:
            yield _event(shape.usage_chunk(job))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield _event(e.body())
    finally:
        served.scheduler.cancel([c.sequence for c in job.choices])


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class CompletionShape:
    """/v1/completions bodies: `text_completion` objects, legacy log-probabilities."""

    def __init__(self, served: Served, model: str):
        self.served, self.model, self.id = served, model, protocol.request_id("cmpl")

    def _object(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": protocol.now(), "model": self.model,
                "choices": choices, **extra}

    def opening(self, job: Job) -> list[dict]:
        return []

    def chunk(self, job: Job, i: int, text: str, token: Token | None, finish: str | None) -> dict:
        logprobs = self._logprobs([(text, token)] if token else []) if job.logprobs is not None else None
        return self._object([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def usage_chunk(self, job: Job) -> dict:
        return self._object([], usage=_usage(job))

    def whole(self, job: Job, parts: list[list]) -> dict:
        choices = [{"index": i, "text": "".join(t for t, _ in p),
                    "logprobs": self._logprobs(p) if job.logprobs is not None else None,
                    "finish_reason": job.choices[i].finish} for i, p in enumerate(parts)]
        return self._object(choices, usage=_usage(job))

    def _logprobs(self, parts: list) -> dict:
        tokens = [t for _, t in parts if t is not None]
        decode = self.served.tokenizer.decode
        return {"tokens": [decode([t.id]) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{decode([j]): lp for j, lp in zip(t.top_ids, t.top_logprobs)} for t in tokens],
                "text_offset": []}


class ChatShape:
    """/v1/chat/completions bodies: `chat.completion(.chunk)` objects with messages and deltas."""

    def __init__(self, served: Served, model: str):
        self.served, self.model, self.id = served, model, protocol.request_id("chatcmpl")

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": protocol.now(), "model": self.model, "choices": choices,
                **extra}

    def opening(self, job: Job) -> list[dict]:
        return [self._object("chat.completion.chunk", [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            for i in range(len(job.choices))]

    def chunk(self, job: Job, i: int, text: str, token: Token | None, finish: str | None) -> dict:
        logprobs = {"content": self._entries([token])} if job.logprobs is not None and token else None
        delta = {"content": text} if finish is None else {}
        return self._object("chat.completion.chunk",
                            [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def usage_chunk(self, job: Job) -> dict:
        return self._object("chat.completion.chunk", [], usage=_usage(job))

    def whole(self, job: Job, parts: list[list]) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t for t, _ in p)},
                    "logprobs": ({"content": self._entries([t for _, t in p if t is not None])}
                                 if job.logprobs is not None else None),
                    "finish_reason": job.choices[i].finish} for i, p in enumerate(parts)]
        return self._object("chat.completion", choices, usage=_usage(job))

    def _entries(self, tokens: list[Token]) -> list[dict]:
        decode = self.served.tokenizer.decode
        entry = lambda i, lp: {"token": decode([i]), "logprob": lp, "bytes": list(decode([i]).encode())}
        return [{**entry(t.id, t.logprob), "top_logprobs": [entry(j, lp) for j, lp in zip(t.top_ids, t.top_logprobs)]}
                for t in tokens]


def _usage(job: Job) -> dict:
    return protocol.usage(job.prompt_tokens, sum(c.tokens for c in job.choices))
