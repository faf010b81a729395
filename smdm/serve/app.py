"""The HTTP layer: OpenAI's completions / chat completions / models schemas (as vLLM's server speaks them), errors
as OpenAI error bodies, Bearer auth, limits, and server-sent-event streaming. It only translates: requests become
batcher Jobs, job events become responses. A request carries text and numbers only; it selects nothing on disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smdm.block_diffusion import BlockLayout
from smdm.chat import prompt_from_messages
from smdm.errors import ContextLengthError, SmdmError
from smdm.sample import check_prompts, make_plan, prepare_prompts
from smdm.serve.batcher import Batcher, BatcherConfig, Job, QueueFull, Row, RowResult, Settings, ShuttingDown, StepView

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/health", "/", "/playground.js", "/playground.css")  # no data behind them: the page and liveness


@dataclass
class ServeConfig:
    """Limits and identity of one server."""

    name: str = "smdm"  # the model id clients pass as `model`
    api_key: str | None = None
    max_batch: int = 16
    window_ms: float = 2.0
    max_queue: int = 64
    timeout_s: float = 300.0  # per request, queueing included
    max_body_bytes: int = 1 << 20
    max_rows: int = 16  # prompts x n of one request
    max_stop: int = 16


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 504: "timeout"}.get(self.status, "invalid_request_error")
        if self.status >= 500 and self.status not in (503, 504):
            kind = "server_error"
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# --- request parsing ----------------------------------------------------------------------------------------

@dataclass
class Parsed:
    """A validated request: the job's rows and settings, and how to present the answer."""

    rows: list[Row]
    settings: Settings
    prompt_tokens: int
    stop: list[str]
    stream: bool
    show_steps: bool
    include_usage: bool


def _number(body: dict, name: str, default: Any, kind: type, low: float | None = None, high: float | None = None,
            allow_none: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        if allow_none or default is None:
            return None
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", "invalid_type", name)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ApiError(400, f"{name} must be a number, got {value!r}", "invalid_type", name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", "invalid_value", name)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be <= {high}, got {value}", "invalid_value", name)
    return kind(value)


def _prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    ids_lists = [prompt] if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt) else prompt
    if isinstance(ids_lists, list) and ids_lists and all(
            isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            for ids in ids_lists):
        for ids in ids_lists:
            if any(not 0 <= i < vocab for i in ids):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", "invalid_value", "prompt")
        return [list(ids) for ids in ids_lists]
    raise ApiError(400, "prompt must be a string, a list of strings, or token ids", "invalid_type", "prompt")


def _stop(body: dict, limit: int) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > limit:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {limit} of them", "invalid_value",
                       "stop")
    return stops


def model_family(model) -> str:
    """"arm", "mdm" or "bdm" (block diffusion), as /health and /v1/models report it."""
    if model.causal:
        return "arm"
    return "bdm" if getattr(model, "diffusion_block_size", None) else "mdm"


def parse_request(body: Any, model, tokenizer, config: ServeConfig, chat: bool) -> Parsed:
    """Validate everything up front (the batcher's sampler call must not fail on one request's input)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    name = body.get("model", config.name)
    if name != config.name:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{config.name}`",
                       "model_not_found", "model")
    if body.get("echo") or body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise ApiError(400, "logprobs and echo are not supported; score text with `smdm likelihood`",
                       "unsupported_parameter", "logprobs")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of is not supported", "unsupported_parameter", "best_of")
    vocab, context = model.config.vocab_size, model.config.block_size
    if chat:
        try:
            prompts = [tokenizer.encode(prompt_from_messages(tokenizer, body.get("messages")))]
        except SmdmError as error:
            raise ApiError(400, str(error), "invalid_value", "messages") from None
        suffix = None
        default_max = 64
    else:
        prompts = _prompts(body, tokenizer, vocab)
        suffix = body.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise ApiError(400, "suffix must be a string", "invalid_type", "suffix")
        default_max = 16
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, max_field, default_max, int, 1, context)
    n = _number(body, "n", 1, int, 1, config.max_rows)
    if n * len(prompts) > config.max_rows:
        raise ApiError(400, f"prompts x n = {n * len(prompts)} rows exceed this server's limit of {config.max_rows}",
                       "invalid_value", "n")
    temperature = _number(body, "temperature", 1.0, float, 0, 2)
    top_p = _number(body, "top_p", 1.0, float, 0, 1)
    if top_p == 0:
        raise ApiError(400, "top_p must be > 0", "invalid_value", "top_p")
    seed = _number(body, "seed", None, int)
    steps = _number(body, "steps", None, int, 1)
    block_length = _number(body, "block_length", None, int, 1)
    cfg_scale = _number(body, "cfg_scale", None, float, 0)
    threshold = _number(body, "threshold", None, float)
    remasking = body.get("remasking", "low_confidence")
    cache = body.get("cache")
    for field_name, value in (("remasking", remasking), ("cache", cache)):
        if value is not None and not isinstance(value, str):
            raise ApiError(400, f"{field_name} must be a string", "invalid_type", field_name)
    suffix_ids = tokenizer.encode(suffix) if suffix else None
    family = model_family(model)
    if family != "mdm" and suffix_ids:
        kind = "an ARM" if family == "arm" else "block diffusion, which generates blocks left to right"
        raise ApiError(400, "suffix (infilling) needs an MDM, which predicts masked positions from both sides; "
                       f"this model is {kind}", "unsupported_parameter", "suffix")
    prompts = prepare_prompts(model, prompts, tokenizer.eos_id)  # an ARM starts a fresh document after an EOS
    try:
        make_plan(model, max_tokens, steps, temperature, remasking=remasking, block_length=block_length,
                  cfg_scale=cfg_scale, threshold=threshold, cache=cache, top_p=top_p, eos_id=tokenizer.eos_id)
        for ids in prompts:
            if family == "bdm":  # whole blocks after the prompt's full blocks
                BlockLayout.check_fits([len(ids)], max_tokens, model.diffusion_block_size, context)
            check_prompts(model, [ids + (suffix_ids or [])], max_tokens)
    except SmdmError as error:
        code = "context_length_exceeded" if isinstance(error, ContextLengthError) else "invalid_value"
        raise ApiError(400, str(error), code) from None
    stream_options = body.get("stream_options") or {}
    settings = Settings(temperature, top_p, remasking, cfg_scale, threshold, cache,
                        seed if temperature > 0 else None)
    rows = [Row(ids, max_tokens, suffix_ids, steps, block_length) for ids in prompts for _ in range(n)]
    return Parsed(rows, settings, sum(len(ids) for ids in prompts), _stop(body, config.max_stop),
                  bool(body.get("stream", False)), bool(body.get("smdm_show_steps", False)),
                  bool(isinstance(stream_options, dict) and stream_options.get("include_usage")))


# --- answers -------------------------------------------------------------------------------------------------

class ChoiceText:
    """A choice's text as it grows: revealed tokens up to the first hidden one, cut at EOS and at a stop string;
    a tail that could still become a stop string (or an incomplete UTF-8 character) is held back."""

    def __init__(self, tokenizer, stop: list[str], mask_id: int | None) -> None:
        self.tokenizer, self.stop, self.mask_id = tokenizer, stop, mask_id
        self.sent = ""
        self.revealed = -1
        self.stopped = False
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def cut(self, text: str) -> tuple[str, bool]:
        """Text before the earliest stop string, and whether one was found."""
        hits = [text.index(s) for s in self.stop if s in text]
        return (text[: min(hits)], True) if hits else (text, False)

    def delta(self, ids: list[int], final: bool) -> str:
        if self.stopped:
            return ""
        if self.mask_id is not None and self.mask_id in ids:
            ids = ids[: ids.index(self.mask_id)]
        if len(ids) == self.revealed and not final:
            return ""  # nothing new revealed at the front: no need to decode
        self.revealed = len(ids)
        eos = self.tokenizer.eos_id
        ended = eos in ids
        if ended:
            ids = ids[: ids.index(eos)]
        text, hit = self.cut(self.tokenizer.decode(ids))
        if hit:
            self.stopped = True
        elif not (final or ended):
            text = text[: len(text) - self.holdback] if self.holdback else text
            text = text.rstrip("\ufffd")
        if not text.startswith(self.sent):  # a merge changed earlier text: never resend, wait for the final text
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def _frame(tokenizer, ids: list[int], mask_id: int | None, step: int, passes: int) -> dict:
    """One denoising frame for the playground: each position's token text, None where still masked."""
    tokens = [None if i == mask_id else ("" if i == tokenizer.eos_id else tokenizer.decode([i])) for i in ids]
    eos = ids.index(tokenizer.eos_id) if tokenizer.eos_id in ids else None
    return {"step": step + 1, "forward_passes": passes, "tokens": tokens, "eos": eos}


def _finish(result: RowResult, choice: ChoiceText, tokenizer, max_tokens: int) -> tuple[str, str]:
    text, hit = choice.cut(tokenizer.decode(result.ids))
    if hit or result.finished_by_eos:
        return text, "stop"
    return text, "length" if len(result.ids) >= max_tokens else "stop"


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app around one loaded model; the batcher thread lives as long as the app."""
    from contextlib import asynccontextmanager

    config = config or ServeConfig()
    batcher = Batcher(model, tokenizer.eos_id, BatcherConfig(config.max_batch, config.window_ms / 1000,
                                                              config.max_queue))
    mask_id = None if model.causal else model.mask_id
    family = model_family(model)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="smdm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path not in PUBLIC_PATHS:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), config.api_key.encode()):
                return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                "invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return ApiError(error.status_code, str(error.detail), "not_found" if error.status_code == 404 else None)\
            .response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.name, "family": family, "waiting": batcher.waiting,
                "batches": batcher.batches_run, "rows": batcher.rows_run, "abandoned": batcher.batches_abandoned}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": 0, "owned_by": "smdm",
                                            "family": family, "context_length": model.config.block_size}]}

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html")

    @app.get("/playground.js")
    async def playground_js():
        return FileResponse(STATIC / "playground.js", media_type="text/javascript")

    @app.get("/playground.css")
    async def playground_css():
        return FileResponse(STATIC / "playground.css", media_type="text/css")

    async def read_body(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes", "request_too_large")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, f"request body over {config.max_body_bytes} bytes", "request_too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON ({error})", "invalid_json") from None

    async def handle(request: Request, chat: bool):
        parsed = parse_request(await read_body(request), model, tokenizer, config, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(*event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass  # the event loop is gone (shutdown)

        job = Job(parsed.rows, parsed.settings, emit, watch_steps=parsed.stream, every_step=parsed.show_steps)
        try:
            batcher.submit(job)
        except QueueFull as error:
            raise ApiError(429, f"server busy: {error}", "queue_full") from None
        except ShuttingDown as error:
            raise ApiError(503, str(error), "shutting_down") from None
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        deadline = loop.time() + config.timeout_s
        choices = [ChoiceText(tokenizer, parsed.stop, mask_id) for _ in parsed.rows]
        if parsed.stream:
            return StreamingResponse(_stream(job, events, parsed, choices, ident, created, deadline, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise ApiError(504, f"the request took longer than {config.timeout_s:g} s", "timeout")
                try:
                    event = await asyncio.wait_for(events.get(), timeout=min(left, 0.5))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ApiError(499, "client disconnected") from None
                    continue
                if event[0] == "error":
                    raise _job_error(event[1])
                if event[0] == "done":
                    break
        finally:
            batcher.cancel(job)  # no-op once done; frees the slot of a request that timed out or was abandoned
        results, passes = event[1], event[2]
        out, completion_tokens = [], 0
        for index, (result, choice, row) in enumerate(zip(results, choices, parsed.rows)):
            text, reason = _finish(result, choice, tokenizer, row.max_tokens)
            completion_tokens += len(result.ids)
            if chat:
                out.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": reason, "logprobs": None})
            else:
                out.append({"index": index, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": config.name, "choices": out,
                "usage": {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": parsed.prompt_tokens + completion_tokens},
                "smdm": {"forward_passes": passes}}

    def _chunk(ident: str, created: int, chat: bool, choices: list[dict]) -> str:
        body = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": config.name, "choices": choices}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _choice(chat: bool, index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}

    async def _stream(job: Job, events: asyncio.Queue, parsed: Parsed, choices: list[ChoiceText], ident: str,
                      created: int, deadline: float, chat: bool):
        loop = asyncio.get_running_loop()
        last_step = 0
        try:
            if chat:
                yield _chunk(ident, created, chat, [_choice(chat, i, "", None, first=True)
                                                    for i in range(len(choices))])
            while True:
                left = deadline - loop.time()
                try:
                    event = await asyncio.wait_for(events.get(), timeout=max(left, 0.001))
                except asyncio.TimeoutError:
                    error = ApiError(504, f"the request took longer than {config.timeout_s:g} s", "timeout")
                    yield f"data: {json.dumps({'error': {'message': error.message, 'code': error.code}})}\n\n"
                    break
                if event[0] == "error":
                    error = _job_error(event[1])
                    yield f"data: {json.dumps({'error': {'message': error.message, 'code': error.code}})}\n\n"
                    break
                if event[0] == "step":
                    view: StepView = event[1]
                    last_step = view.step + 1
                    out = []
                    for index, (ids, choice) in enumerate(zip(view.rows, choices)):
                        text = choice.delta(ids, final=False)
                        item = _choice(chat, index, text, None)
                        if parsed.show_steps:
                            item["smdm"] = _frame(tokenizer, ids, mask_id, view.step, view.forward_passes)
                        if text or parsed.show_steps:
                            out.append(item)
                    if out:
                        yield _chunk(ident, created, chat, out)
                    continue
                results, passes = event[1], event[2]
                out, completion_tokens = [], 0
                for index, (result, choice, row) in enumerate(zip(results, choices, parsed.rows)):
                    text = choice.delta(result.ids, final=True)
                    _, reason = _finish(result, choice, tokenizer, row.max_tokens)
                    completion_tokens += len(result.ids)
                    item = _choice(chat, index, text, reason)
                    item["smdm"] = {"forward_passes": passes, "done": True}
                    if parsed.show_steps:  # the final frame: masks after an EOS were filled without a step
                        ids = result.ids + ([tokenizer.eos_id] if result.finished_by_eos else [])
                        item["smdm"].update(_frame(tokenizer, ids, mask_id, last_step - 1, passes), done=True)
                    out.append(item)
                yield _chunk(ident, created, chat, out)
                if parsed.include_usage:
                    usage = {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": parsed.prompt_tokens + completion_tokens}
                    body = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": config.name, "choices": [], "usage": usage}
                    yield f"data: {json.dumps(body)}\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:
            batcher.cancel(job)  # the client went away (or we are done): stop feeding this job

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _job_error(error: Exception) -> ApiError:
    if isinstance(error, ShuttingDown):
        return ApiError(503, str(error), "shutting_down")
    if isinstance(error, SmdmError):
        return ApiError(400, str(error), "invalid_value")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "internal_error")
