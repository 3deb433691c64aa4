"""The OpenAI-compatible API on Ray Serve: `build_app(args) -> Application` for `serve/*.yaml`, `ember serve`, and
Ray's own `serve run` / `serve deploy`.

Each replica of `EmberServer` loads the model dir once (safetensors only), runs an `Engine` (continuous batching) and
answers `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`) and `GET /health`. A bad request gets OpenAI's error JSON with a
4xx status naming the field; nothing a client sends can stop a replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application

from ember.config.specs import SpecModel
from ember.errors import EmberError
from ember.metrics import SERVE_METRICS
from ember.runtime import is_loopback

log = logging.getLogger("ember")



class AutoscalingArgs(SpecModel):
    """Ray Serve autoscaling of the replicas."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(8, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Seconds of high load before adding replicas.")
    downscale_delay_s: float = Field(30, ge=0, description="Seconds of low load before removing replicas.")


class ServeArgs(SpecModel):
    """The `args` of `ember.serve.app:build_app` (a Ray Serve config's application args)."""

    model_dir: str = Field(description="The Llama-format model dir to serve.")
    model_name: Optional[str] = Field(None, description="The model id clients send (default: the dir's name).")
    max_batch_size: int = Field(16, ge=1, description="Rows decoded together in one replica.")
    max_tokens_in_flight: Optional[int] = Field(None, ge=1, description="Prompt + output tokens of the running "
                                                                        "requests at most (default: batch × context).")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a row at most; beyond it: 503.")
    prefill_chunk: int = Field(128, ge=1, description="Prompt tokens read per step, so long prompts do not stall "
                                                      "the others.")
    prefill_tokens_per_step: int = Field(512, ge=1, description="Prompt tokens read per step over all new requests "
                                                                 "(at least prefill_chunk).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a chat request gives none.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    dtype: str = Field("float32", description="Weights dtype: float32, bfloat16 or float16.")
    api_keys_env: Optional[str] = Field("EMBER_API_KEYS", description="Environment variable with comma-separated API "
                                                                      "keys; when set, requests need one as Bearer.")
    api_keys_file: Optional[str] = Field(None, description="A file with one API key per line.")
    host: str = Field("127.0.0.1", description="Where the HTTP proxy listens (ember serve passes it to Ray Serve).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    allow_unauthenticated: bool = Field(False, description="Allow a host beyond 127.0.0.1 without API keys.")
    num_replicas: Optional[int] = Field(None, ge=1, description="A fixed replica count (instead of autoscaling).")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Replica autoscaling.")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    torch_threads: Optional[int] = Field(None, ge=1, description="Torch threads per replica (default: num_cpus).")

    @model_validator(mode="after")
    def _checks(self):
        if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas is above autoscaling.max_replicas")
        return self


def load_api_keys(args: ServeArgs) -> set[str]:
    keys = set()
    if args.api_keys_env and os.environ.get(args.api_keys_env):
        keys |= {k.strip() for k in os.environ[args.api_keys_env].split(",") if k.strip()}
    if args.api_keys_file:
        path = Path(args.api_keys_file).expanduser()
        if not path.is_file():
            raise EmberError(f"api_keys_file: {path} not found")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    return keys


def check_exposure(args: ServeArgs) -> None:
    """A server reachable beyond this machine needs API keys, unless the config says otherwise."""
    if not is_loopback(args.host) and not load_api_keys(args) \
            and not args.allow_unauthenticated:
        raise EmberError(f"host {args.host} exposes the server beyond this machine and no API key is configured "
                         f"(set {args.api_keys_env} or api_keys_file), or set allow_unauthenticated: true")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _number(body: dict, key: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        bounds = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise APIError(400, f"'{key}' must be {bounds}, got {value!r}", key)
    return value


def sampling_from(body: dict, default_max_tokens: int):
    from ember.model.sampling import SamplingParams

    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise APIError(400, f"'{key}' is not supported (use repetition_penalty)", key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 4):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return SamplingParams(
        max_new_tokens=_number(body, "max_tokens", default_max_tokens, 1, integer=True),
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, integer=True) if body.get("top_k", 0) != -1 else 0,
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, lo_open=True)),
        stop=tuple(stop or ()),
        seed=_number(body, "seed", None, integer=True),
    )


class TextDecoder:
    """Turns one choice's tokens into text increments, with stop strings (text ends before the first one).

    Incremental, as vLLM does it: each step decodes only a short window (the last shown tokens as context, then the
    new ones) and emits what the new ones add, holding them while they end in an incomplete UTF-8 sequence. The cost
    per token stays flat, and tokenizers whose decoders strip a leading space still space words right."""

    def __init__(self, tokenizer, stops: tuple[str, ...], context: list[int] = ()):
        from ember.model.generate import StopStrings

        self.tok = tokenizer
        self.ids = list(context[-4:])  # the prompt's last tokens give the first new token its context
        self.prefix, self.read = 0, len(self.ids)
        self.stops = StopStrings(stops) if stops else None
        self.stopped = False

    def _increment(self) -> str:
        shown = self.tok.decode(self.ids[self.prefix: self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
            return ""  # nothing yet, or an incomplete UTF-8 sequence: wait for the rest
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        new = self._increment()
        if self.stops is None or not new:
            return new
        out, self.stopped = self.stops.feed(new)
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids[self.prefix:])[len(self.tok.decode(self.ids[self.prefix: self.read])):]
        if self.stops is None:
            return text
        out, self.stopped = self.stops.feed(text) if text else ("", False)
        return out + ("" if self.stopped else self.stops.flush())


class _Metrics:
    """Ray Serve application metrics (Prometheus through Ray's metrics export)."""

    def __init__(self, model: str):
        from ray.serve import metrics

        tags = {"model": model}
        self.requests = metrics.Counter("ember_serve_requests", SERVE_METRICS["ember_serve_requests"],
                                        tag_keys=("model", "route", "code"))
        self.requests.set_default_tags(dict(tags))  # Ray adds its tags to the dict it is given
        buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self.ttft = metrics.Histogram("ember_serve_time_to_first_token_seconds",
                                      SERVE_METRICS["ember_serve_time_to_first_token_seconds"], boundaries=buckets,
                                      tag_keys=("model",))
        self.tpot = metrics.Histogram("ember_serve_time_per_output_token_seconds",
                                      SERVE_METRICS["ember_serve_time_per_output_token_seconds"],
                                      boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
                                      tag_keys=("model",))
        self.tokens = metrics.Counter("ember_serve_generated_tokens", SERVE_METRICS["ember_serve_generated_tokens"],
                                      tag_keys=("model",))
        self.batch = metrics.Gauge("ember_serve_batch_size", SERVE_METRICS["ember_serve_batch_size"],
                                   tag_keys=("model",))
        self.queue = metrics.Gauge("ember_serve_queue_depth", SERVE_METRICS["ember_serve_queue_depth"],
                                   tag_keys=("model",))
        for m in (self.ttft, self.tpot, self.tokens, self.batch, self.queue):
            m.set_default_tags(dict(tags))
        self._last_step = 0.0

    def request(self, route: str, code: int) -> None:
        self.requests.inc(tags={"route": route, "code": str(code)})

    def finished(self, r) -> None:
        if r.first_token_at is None:
            return
        self.ttft.observe(r.first_token_at - r.arrival)
        if len(r.output) > 1:
            self.tpot.observe((time.perf_counter() - r.first_token_at) / (len(r.output) - 1))
        if r.output:
            self.tokens.inc(len(r.output))

    def step(self, batch: int, queued: int) -> None:
        now = time.perf_counter()
        if now - self._last_step > 0.25:  # gauges at most 4 times a second
            self._last_step = now
            self.batch.set(batch)
            self.queue.set(queued)


app = FastAPI(title="Ember", docs_url=None, redoc_url=None)


@serve.deployment(name="EmberServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(app)
class EmberServer:
    def __init__(self, args: dict):
        import torch

        from ember.data.chat import ChatTemplate, special_token_vars, template_source
        from ember.data.tokenizer import load_tokenizer, tokenizer_config
        from ember.model import load_model, stop_token_ids
        from ember.model.hf import DTYPES
        from ember.serve.engine import Engine

        self.args = ServeArgs.model_validate(args)
        a = self.args
        torch.set_num_threads(a.torch_threads or max(1, int(a.num_cpus or 1)))
        device = "cuda" if a.num_gpus and torch.cuda.is_available() else "cpu"
        self.model_dir = Path(a.model_dir)
        self.name = a.model_name or self.model_dir.name
        self.model = load_model(self.model_dir, dtype=DTYPES[a.dtype], device=device)
        self.tokenizer = load_tokenizer(self.model_dir)
        config = tokenizer_config(self.model_dir)
        source = template_source(config)
        self.template = ChatTemplate(source, special_token_vars(config)) if source else None
        self.stop_ids = frozenset(stop_token_ids(self.model_dir, self.tokenizer) | {
            i for i in (self.tokenizer.token_to_id("<|im_end|>"),) if i is not None and source})
        self.keys = load_api_keys(a)
        self.context = self.model.config.max_position_embeddings
        self.created = int(time.time())
        self.metrics = _Metrics(self.name)
        self.engine = Engine(self.model, max_batch_size=a.max_batch_size, max_tokens_in_flight=a.max_tokens_in_flight,
                             max_queue=a.max_queue, prefill_chunk=a.prefill_chunk,
                             prefill_tokens_per_step=a.prefill_tokens_per_step, on_step=self.metrics.step)

    def check_health(self):
        if not self.engine.alive:
            raise RuntimeError("the generation engine has stopped")

    # ----------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.name, **self.engine.stats()}

    @app.get("/v1/models")
    async def models(self, request: HTTPRequest):
        try:
            self._authorize(request)
        except APIError as exc:
            return self._fail("/v1/models", exc)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "ember", "max_model_len": self.context}]}

    @app.post("/v1/completions")
    async def completions(self, request: HTTPRequest):
        return await self._handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: HTTPRequest):
        return await self._handle(request, "/v1/chat/completions", chat=True)

    # ----------------------------------------------------------------- plumbing

    def _fail(self, route: str, exc: APIError):
        self.metrics.request(route, exc.status)
        return exc.response()

    def _authorize(self, request: HTTPRequest) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        if token not in self.keys:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")

    async def _body(self, request: HTTPRequest) -> dict:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > self.args.max_body_bytes:
            raise APIError(413, f"the request body is {size} bytes; at most {self.args.max_body_bytes} are accepted")
        raw = await request.body()
        if len(raw) > self.args.max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes; at most {self.args.max_body_bytes} are "
                                "accepted")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model != self.name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}", "model",
                           code="model_not_found")
        return body

    def _prompts(self, body: dict, chat: bool) -> list[list[int]]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                        or not isinstance(m.get("content"), str):
                    raise APIError(400, f"messages[{i}] must be {{role: system|user|assistant, content: string}}",
                                   f"messages[{i}]")
            if self.template is None:
                raise APIError(400, f"the model {self.name!r} has no chat template; use /v1/completions", "messages")
            from ember.data.chat import BadRecord

            try:
                text = self.template.render([{"role": m["role"], "content": m["content"]} for m in messages],
                                            add_generation_prompt=True)
            except BadRecord as exc:
                raise APIError(400, exc.detail, "messages") from None
            prompts = [self.tokenizer.encode(text, add_special_tokens=False).ids]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                prompts = [self.tokenizer.encode(prompt, add_special_tokens=False).ids]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompt]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                             for p in prompt):
                vocab = self.tokenizer.get_vocab_size()
                if any(not 0 <= p < vocab for p in prompt):
                    raise APIError(400, f"'prompt' holds token ids outside the vocabulary (0..{vocab - 1})", "prompt")
                prompts = [list(prompt)]
            else:
                raise APIError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty", "messages" if chat else "prompt")
            if len(p) >= self.context:
                raise APIError(400, f"the prompt has {len(p)} tokens; this model's context is {self.context} tokens",
                               "messages" if chat else "prompt", code="context_length_exceeded")
        return prompts

    async def _handle(self, request: HTTPRequest, route: str, chat: bool):
        from ember.serve.engine import Overloaded, Request

        try:
            self._authorize(request)
            body = await self._body(request)
            prompts = self._prompts(body, chat)
            params = sampling_from(body, self.args.default_max_tokens if chat else 16)
            n = _number(body, "n", 1, 1, 16, integer=True)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise APIError(400, "'stream' must be true or false", "stream")
            logprobs = None
            if chat:
                if body.get("logprobs"):
                    raise APIError(400, "'logprobs' is not supported for chat completions; use /v1/completions",
                                   "logprobs")
            else:
                logprobs = _number(body, "logprobs", None, 0, 5, integer=True)
            params.max_new_tokens = min(params.max_new_tokens, self.context - max(len(p) for p in prompts))
            ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: generate max_tokens whatever comes
            if not isinstance(ignore_eos, bool):
                raise APIError(400, "'ignore_eos' must be true or false", "ignore_eos")
            stream_options = body.get("stream_options") or {}
            include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        except APIError as exc:
            return self._fail(route, exc)
        loop = asyncio.get_running_loop()
        jobs = []
        try:
            for p in prompts:
                for k in range(n):
                    choice_params = params
                    if params.seed is not None and n > 1:  # n samples with one seed must still differ
                        from dataclasses import replace

                        choice_params = replace(params, seed=params.seed + k)
                    r = Request(prompt=p, params=choice_params, logprobs=logprobs,
                                stop_ids=frozenset() if ignore_eos else self.stop_ids)
                    r.attach(loop)
                    jobs.append(r)
            for r in jobs:
                self.engine.submit(r)
        except Overloaded as exc:
            for r in jobs:
                self.engine.cancel(r)
            return self._fail(route, APIError(503, str(exc), kind="server_error", code="overloaded"))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.metrics.request(route, 200)
        if stream:
            return StreamingResponse(self._stream(jobs, ident, chat, include_usage, request),
                                     media_type="text/event-stream")
        return await self._complete(jobs, ident, chat)

    def _choice_texts(self, r):
        return TextDecoder(self.tokenizer, r.params.stop, r.prompt)

    async def _run_choice(self, r, decoder, on_text):
        """Feeds one request's tokens through its decoder; returns its finish reason."""
        finish = "length"
        async for event in r.events():
            if event.token is None:
                finish = event.finish_reason if event.finish_reason in ("stop", "length") else "length"
                tail = decoder.flush()
                if tail:
                    await on_text(tail, None)
                break
            text = decoder.feed(event.token)
            if text or event.logprob is not None:
                await on_text(text, event)
            if decoder.stopped:
                self.engine.cancel(r)
                finish = "stop"
                break
        self.metrics.finished(r)
        return finish

    async def _complete(self, jobs, ident: str, chat: bool):
        choices = []

        async def one(index, r):
            decoder = self._choice_texts(r)
            parts, lp = [], {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0

            async def on_text(text, event):
                nonlocal offset
                parts.append(text)
                if event is not None and event.logprob is not None:
                    lp["tokens"].append(self.tokenizer.decode([event.token]))
                    lp["token_logprobs"].append(event.logprob)
                    lp["top_logprobs"].append({self.tokenizer.decode([t]): v for t, v in (event.top_logprobs or [])})
                    lp["text_offset"].append(offset)
                offset += len(text)

            finish = await self._run_choice(r, decoder, on_text)
            text = "".join(parts)
            if chat:
                return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish}
            return {"index": index, "text": text, "logprobs": lp if r.logprobs is not None else None,
                    "finish_reason": finish}

        try:
            choices = await asyncio.gather(*(one(i, r) for i, r in enumerate(jobs)))
        finally:
            for r in jobs:
                self.engine.cancel(r)
        usage = self._usage(jobs)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name, "choices": list(choices), "usage": usage}

    def _usage(self, jobs) -> dict:
        prompt_tokens = sum(len(p) for p in {id(r.prompt): r.prompt for r in jobs}.values())
        completion = sum(len(r.output) for r in jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def _stream(self, jobs, ident: str, chat: bool, include_usage: bool, request: HTTPRequest):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()

        def chunk(index, text=None, finish=None, role=False, event=None):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                logprobs = None
                if event is not None and event.logprob is not None:
                    logprobs = {"tokens": [self.tokenizer.decode([event.token])],
                                "token_logprobs": [event.logprob],
                                "top_logprobs": [{self.tokenizer.decode([t]): v
                                                  for t, v in (event.top_logprobs or [])}], "text_offset": [0]}
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return {"id": ident, "object": kind, "created": created, "model": self.name, "choices": [choice]}

        async def one(index, r):
            decoder = self._choice_texts(r)

            async def on_text(text, event):
                queue.put_nowait(chunk(index, text, event=event))

            try:
                finish = await self._run_choice(r, decoder, on_text)
                queue.put_nowait(chunk(index, finish=finish))
            finally:
                queue.put_nowait(None)  # this choice is done

        if chat:
            for i in range(len(jobs)):
                yield f"data: {json.dumps(chunk(i, role=True))}\n\n"
        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(jobs)]
        try:
            running = len(tasks)
            while running:
                # Everything already waiting goes out in one write: under load, fewer, larger messages.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                running -= sum(1 for item in items if item is None)
                text = "".join(f"data: {json.dumps(item)}\n\n" for item in items if item is not None)
                if text:
                    yield text
            for t in tasks:
                t.result()  # a failed choice fails the stream
            if include_usage:
                yield f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': self.name, 'choices': [], 'usage': self._usage(jobs)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the rows at once
            for r in jobs:
                self.engine.cancel(r)
            for t in tasks:
                t.cancel()


def deployment_options(args: ServeArgs) -> dict:
    options = {"ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
               "max_ongoing_requests": max(4, args.max_batch_size + args.max_queue)}
    if args.num_replicas:
        options["num_replicas"] = args.num_replicas
    else:
        a = args.autoscaling
        options["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                         "initial_replicas": max(1, a.min_replicas),
                                         "target_ongoing_requests": a.target_ongoing_requests,
                                         "upscale_delay_s": a.upscale_delay_s,
                                         "downscale_delay_s": a.downscale_delay_s}
    return options


def build_app(args: ServeArgs) -> Application:
    """The Ray Serve application for a model dir (Ray validates `args` against ServeArgs)."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    path = Path(args.model_dir).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise EmberError(f"model_dir: {path} is not a model directory (no config.json)")
    check_exposure(args)
    args = args.model_copy(update={"model_dir": str(path)})
    return EmberServer.options(**deployment_options(args)).bind(args.model_dump())
