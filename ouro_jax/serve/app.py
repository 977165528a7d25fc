"""The OpenAI-compatible HTTP API over a `Runner` (FastAPI): /v1/completions, /v1/chat/completions,
/v1/models, /health.

Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed or invalid
request (bad JSON, wrong types, out-of-range values, a prompt that does not fit the context), 401 without
the bearer key (when one is set), 404 for an unknown model or path; nothing is queued then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ouro_jax import tokenizer as tok
from ouro_jax.inference.engine import SamplingParams, TokenEvent
from ouro_jax.serve import scoring
from ouro_jax.serve.runner import Runner

MAX_N = 16  # choices per prompt
MAX_TOP_LOGPROBS = 5  # as OpenAI's completions API
DEFAULT_CHAT_TOKENS = 256  # a chat request without max_tokens: at most this many (and what the context holds)


class _Body(BaseModel):
    """Strict types (no "5" for 5), unknown fields ignored (clients send options this server lacks)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    exit_threshold: float | None = Field(None, ge=0.0, le=1.0)  # extension: per-request Q-exit q


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class _Detokenizer:
    """Incremental text of one choice: `push(token)` -> the new text that is safe to send (no half UTF-8
    character, nothing that may still turn out to begin a stop string); the text ends before the first stop
    string; `finish()` -> the rest."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop, self.tokens, self.sent, self.stopped = tokenizer, stop, [], 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        cuts = [text.find(s) for s in self.stop if s and s in text]
        if cuts:
            self.stopped = True
            return text[:min(cuts)]
        return text

    def push(self, token: int | None) -> str:
        if token is not None and not self.stopped:
            self.tokens.append(token)
        text = self._text()
        safe = len(text) if self.stopped else len(text.rstrip("\ufffd")) - self.hold
        return self._send(text, safe)

    def finish(self) -> str:
        text = self._text()
        return self._send(text, len(text))

    def _send(self, text: str, upto: int) -> str:
        out = text[self.sent:max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        return out


def create_app(runner: Runner, model, tokenizer, *, model_name: str, eos_token_ids: Sequence[int],
               api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (for prompt log-probabilities) through `runner` under the id
    `model_name`; requests need `Authorization: Bearer <api_key>` when `api_key` is set (/health never)."""
    backend = runner.backend
    vocab, max_context = model.config.vocab_size, backend.max_context
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await asyncio.to_thread(runner.close)  # uvicorn stops accepting first; in-flight requests end

    app = FastAPI(title="ouro_jax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if loc and loc[0] == "prompt":  # a union: pydantic's message names one of its branches
            return _error(400, "prompt: must be a string, a list of strings, a list of token ids or a list "
                          "of token-id lists", param="prompt")
        message = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg"))
        return _error(400, message, param=".".join(loc) or None)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return _error(err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500
                      else "server_error")

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return _error(err.status, err.message, err.kind, err.param, err.code)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key is not None and request.url.path != "/health" and (
                request.headers.get("authorization") != f"Bearer {api_key}"):
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "ouro_jax", "max_model_len": max_context}]}

    def params_of(body: _Sampling, max_tokens: int, index: int) -> SamplingParams:
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=None if body.seed is None else body.seed + index,
                              stop=tuple(s for s in stop if s), exit_threshold=body.exit_threshold)

    def check_prompt(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if len(ids) + max(max_tokens, 1) > max_context:
            raise ApiError(400, f"this model's context holds {max_context} tokens; the prompt has {len(ids)} "
                           f"and max_tokens is {max_tokens}", param="max_tokens" if len(ids) < max_context
                           else "prompt", code="context_length_exceeded")

    async def start(prompts: list[list[int]], params: list[SamplingParams]):
        """Submit every (prompt, params); on a refusal abort the ones already queued and answer 400.
        Returns (request ids, the shared event queue)."""
        outbox: asyncio.Queue = asyncio.Queue()
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(await runner.submit(prompt, p, outbox))
        except ValueError as err:
            for request_id in ids:
                runner.abort(request_id)
            raise ApiError(400, str(err)) from None
        return ids, outbox

    async def events_of(ids: list[int], outbox: asyncio.Queue) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every request finished; aborts the unfinished ones if cancelled."""
        index = {request_id: i for i, request_id in enumerate(ids)}
        running = set(ids)
        try:
            while running:
                event = await outbox.get()
                if isinstance(event, Exception):
                    raise event
                if event.finish_reason is not None:
                    running.discard(event.request_id)
                yield index[event.request_id], event
        finally:
            for request_id in running:
                runner.abort(request_id)

    def usage(prompts, completions: list[list[TokenEvent]]) -> dict:
        loops = [e.exit_loop for c in completions for e in c]
        return {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": len(loops),
                "total_tokens": sum(len(p) for p in prompts) + len(loops),
                "mean_loops_per_token": sum(loops) / len(loops) if loops else None}

    def token_text(token: int) -> str:
        return token_string(tokenizer, token)

    stop_ids_all = frozenset(eos_token_ids)

    def completion_tokens(events: list[TokenEvent]) -> list[int]:
        """The tokens a choice's text shows: all but a final stop token."""
        tokens = [e.token for e in events]
        if events and events[-1].finish_reason == "stop" and tokens[-1] in stop_ids_all:
            tokens.pop()
        return tokens

    async def stream(name: str, kind: str, first: list[dict], request_ids: list[int], outbox: asyncio.Queue,
                     detok: list[_Detokenizer], chunk) -> AsyncIterator[str]:
        """Server-sent events: the `first` chunks, then one chunk per token (`chunk(choice, event, new
        text)`), then [DONE]. A client that disconnects cancels this generator, which aborts its requests."""
        for c in first:
            yield _sse(name, model_name, kind, c)
        async for c, e in events_of(request_ids, outbox):
            stopped = e.finish_reason == "stop" and e.token in stop_ids_all
            text = detok[c].push(None if stopped else e.token)
            if e.finish_reason is not None:
                text += detok[c].finish()
            yield _sse(name, model_name, kind, chunk(c, e, text))
        yield "data: [DONE]\n\n"

    def prompts_of(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return [tokenizer.encode(p, add_special_tokens=False).ids if isinstance(p, str) else list(p)
                for p in prompt]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = prompts_of(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        for ids in prompts:
            check_prompt(ids, max_tokens)
        params = [params_of(body, max(max_tokens, 1), j) for _ in prompts for j in range(body.n)]
        rows = [ids for ids in prompts for _ in range(body.n)]
        scored = {}  # choice -> the prompt's (token log-probs, top log-probs)
        if body.echo and body.logprobs is not None:
            for i, ids in enumerate(prompts):
                result = await asyncio.to_thread(scoring.prompt_logprobs, model, ids, body.exit_threshold,
                                                 body.logprobs)
                scored.update({i * body.n + j: result for j in range(body.n)})
        request_ids, outbox = ([], None) if max_tokens == 0 else await start(rows, params)
        name = f"cmpl-{uuid.uuid4().hex}"

        def logprobs_of(choice: int, events: list[TokenEvent]) -> dict | None:
            """OpenAI's completion logprobs: the prompt's (with echo) then the generated tokens'; a
            generated token's top_logprobs hold only itself (the backend returns one log-prob a token), and
            its log-prob is null where the backend computes none (`StaticBatchBackend(logprobs=False)`)."""
            if body.logprobs is None:
                return None
            tokens, token_logprobs, top = [], [], []
            if choice in scored:
                token_logprobs, tops = (list(x) for x in scored[choice])
                tokens = [token_text(t) for t in rows[choice]]
                top = [None if d is None else {token_text(t): x for t, x in d.items()} for d in tops]
            for e in events:
                tokens.append(token_text(e.token))
                token_logprobs.append(_known(e.logprob))
                top.append({tokens[-1]: e.logprob} if body.logprobs and _known(e.logprob) is not None else {})
            offsets, at = [], 0
            for t in tokens:
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                    "text_offset": offsets}

        def echo_text(choice: int) -> str:
            return tokenizer.decode(rows[choice], skip_special_tokens=False)

        if max_tokens == 0:  # echo only: the prompts (and their log-probs), nothing generated
            choices = [{"index": c, "text": echo_text(c), "logprobs": logprobs_of(c, []),
                        "finish_reason": "length"} for c in range(len(rows))]
            return {"id": name, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": choices, "usage": usage(prompts, [])}
        detok = [_Detokenizer(tokenizer, p.stop) for p in params]

        if body.stream:
            def chunk(c: int, e: TokenEvent | None, text: str) -> dict:
                logprobs = None if body.logprobs is None or e is None else {
                    "tokens": [token_text(e.token)], "token_logprobs": [_known(e.logprob)],
                    "top_logprobs": [{} if _known(e.logprob) is None else {token_text(e.token): e.logprob}],
                    "text_offset": [0]}
                return {"index": c, "text": text, "logprobs": logprobs,
                        "finish_reason": None if e is None else e.finish_reason}

            first = [chunk(c, None, echo_text(c)) for c in range(len(rows))] if body.echo else []
            events = stream(name, "text_completion", first, request_ids, outbox, detok, chunk)
            return StreamingResponse(events, media_type="text/event-stream")

        per_choice: list[list[TokenEvent]] = [[] for _ in rows]
        async for c, e in events_of(request_ids, outbox):
            per_choice[c].append(e)
        choices = []
        for c, events in enumerate(per_choice):
            d = detok[c]
            d.tokens = completion_tokens(events)
            prefix = echo_text(c) if body.echo else ""
            choices.append({"index": c, "text": prefix + d.finish(), "logprobs": logprobs_of(c, events),
                            "finish_reason": events[-1].finish_reason})
        return {"id": name, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage(prompts, per_choice)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        ids = tok.encode_chat(tokenizer, [m.model_dump() for m in body.messages])
        if body.max_tokens == 0:
            raise ApiError(400, "max_tokens must be >= 1", param="max_tokens")
        max_tokens = body.max_tokens or min(max_context - len(ids), DEFAULT_CHAT_TOKENS)
        check_prompt(ids, max_tokens)
        params = [params_of(body, max_tokens, j) for j in range(body.n)]
        request_ids, outbox = await start([ids] * body.n, params)
        name = f"chatcmpl-{uuid.uuid4().hex}"
        detok = [_Detokenizer(tokenizer, p.stop) for p in params]

        if body.stream:
            def chunk(c: int, e: TokenEvent | None, text: str) -> dict:
                if e is None:
                    return {"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                delta = {"content": text} if text else {}
                return {"index": c, "delta": delta, "finish_reason": e.finish_reason}

            first = [chunk(c, None, "") for c in range(body.n)]
            return StreamingResponse(stream(name, "chat.completion.chunk", first, request_ids, outbox, detok,
                                            chunk), media_type="text/event-stream")

        per_choice: list[list[TokenEvent]] = [[] for _ in range(body.n)]
        async for c, e in events_of(request_ids, outbox):
            per_choice[c].append(e)
        choices = []
        for c, events in enumerate(per_choice):
            detok[c].tokens = completion_tokens(events)
            choices.append({"index": c, "message": {"role": "assistant", "content": detok[c].finish()},
                            "finish_reason": events[-1].finish_reason, "logprobs": None})
        return {"id": name, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage([ids], per_choice)}

    return app


def _known(logprob: float) -> float | None:
    """A log-probability for JSON: None where the backend gave NaN (none computed)."""
    return None if math.isnan(logprob) else logprob


def token_string(tokenizer, token: int) -> str:
    """A token as the logprobs lists name it: its text, or its vocabulary entry where its text is not whole
    UTF-8 (a byte of a longer character), so that different ids get different names."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    return tokenizer.id_to_token(token) if "\ufffd" in text or not text else text


def _sse(name: str, model: str, kind: str, choice: dict) -> str:
    """One server-sent event of a stream: a chunk holding one choice."""
    return "data: " + json.dumps({"id": name, "object": kind, "created": int(time.time()), "model": model,
                                  "choices": [choice]}) + "\n\n"
