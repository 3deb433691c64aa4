"""The OpenAI-compatible API on Ray Serve: `build_app(args) -> Application` for `serve/*.yaml`, `ember serve`, and
Ray's own `serve run` / `serve deploy`.

Each replica of `EmberServer` loads the model dir once (safetensors only), runs an `Engine` (continuous batching) and
answers `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`) and `GET /health`. Request bodies are the typed models of
`ember.serve.protocol`; `RequestGuard` (`ember.serve.guard`) enforces API keys and the body limit in the replica.
A bad request gets OpenAI's error JSON with a 4xx status naming the field; a request whose generation fails gets a
5xx error JSON (or an error event in its stream) while the others go on; nothing a client sends can stop a replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import Literal, Optional

import ray
import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application, metrics
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import storage
from ember.config.specs import SpecModel
from ember.data.chat import BadRecord, ChatTemplate
from ember.data.tokenizer import load_tokenizer, tokenizer_config, turn_end_ids
from ember.errors import EmberError
from ember.metrics import SERVE_METRICS
from ember.model import builtin, load_model, stop_token_ids
from ember.model.generate import StopStrings
from ember.model.hf import DTYPES, config_from_hf, local_model_dir, read_json
from ember.serve.engine import Engine, Overloaded, Request
from ember.serve.guard import APIKeys, GuardPolicy, RequestGuard, key_digest, read_api_keys, require_keys
from ember.serve.kv import kv_bytes_per_token
from ember.serve.protocol import (
    MAX_N,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    ServerLimits,
    body_parse_error,
    documented,
    sampling_params,
    validation_error,
)

log = logging.getLogger("ember")

GIB = 1 << 30


class AutoscalingArgs(SpecModel):
    """Ray Serve autoscaling of the replicas."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(8, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Seconds of high load before adding replicas.")
    downscale_delay_s: float = Field(30, ge=0, description="Seconds of low load before removing replicas.")


class ServeArgs(SpecModel):
    """The `args` of `ember.serve.app:build_app` (a Ray Serve config's application args)."""

    model_dir: str = Field(description="The model dir to serve (Llama, Qwen2, Qwen3 or Mistral): a path, or a URI "
                                       "of object storage that each replica's node pulls into its node cache.")
    model_name: Optional[str] = Field(None, description="The model id clients send (default: the dir's name).")
    max_batch_size: int = Field(16, ge=1, description="Rows decoded together in one replica.")
    max_tokens_in_flight: Optional[int] = Field(None, ge=1, description="Prompt + output tokens of the running "
                                                                        "requests at most (default: batch × "
                                                                        "max_model_len).")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a row at most; beyond it: 503.")
    prefill_chunk: int = Field(128, ge=1, description="Prompt tokens read per step, so long prompts do not stall "
                                                      "the others.")
    prefill_tokens_per_step: int = Field(512, ge=1, description="Prompt tokens read per step over all new requests "
                                                                 "(at least prefill_chunk).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a chat request gives none.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413 (read as a stream and "
                                                              "refused as soon as they pass it).")
    max_n: int = Field(16, ge=1, le=MAX_N, description="Choices per prompt (`n`) at most.")
    max_model_len: Optional[int] = Field(None, ge=2, description="Prompt + output tokens of one request at most "
                                                                 "(default: the model's context, capped so one "
                                                                 "request fits kv_cache_memory_gb).")
    kv_cache_memory_gb: float = Field(4.0, gt=0, description="Memory the KV cache may take per replica (GiB), the "
                                                             "prefix cache's included; rows are allocated by need and "
                                                             "admission waits for room.")
    prefix_cache_tokens: int = Field(8192, ge=0, description="Tokens of prompt prefixes kept for the requests that "
                                                             "start with them (0 = no prefix caching).")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="Weights dtype (default: bfloat16 with num_gpus, float32 on CPU).")
    api_keys_env: Optional[str] = Field("EMBER_API_KEYS", description="Environment variable with comma-separated API "
                                                                      "keys; when set, requests need one as Bearer "
                                                                      "(read where build_app runs, and on each "
                                                                      "replica's node).")
    api_keys_file: Optional[str] = Field(None, description="A file with one API key per line (`#` starts a "
                                                           "comment line).")
    api_key_sha256: list[str] = Field(default_factory=list, description="SHA-256 hex digests of accepted keys; "
                                                                        "build_app adds those of api_keys_env and "
                                                                        "api_keys_file, so replicas get no key in "
                                                                        "clear.")
    host: str = Field("127.0.0.1", description="Where the HTTP proxy listens (ember serve passes it to Ray Serve; "
                                               "each replica checks the proxy's actual host).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Ray Serve's proxy.")
    allow_unauthenticated: bool = Field(False, description="Allow a host beyond 127.0.0.1 without API keys.")
    num_replicas: Optional[int] = Field(None, ge=1, description="A fixed replica count (instead of autoscaling).")
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="Replica autoscaling.")
    num_cpus: float = Field(1, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    torch_threads: Optional[int] = Field(None, ge=1, description="Torch threads per replica (default: num_cpus).")

    @model_validator(mode="after")
    def _checks(self):
        if self.dtype is None:  # the device's: bf16 on a GPU, fp32 on CPU
            self.dtype = "bfloat16" if self.num_gpus else "float32"
        if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            raise ValueError("autoscaling.min_replicas is above autoscaling.max_replicas")
        bad = [d for d in self.api_key_sha256 if len(d) != 64 or any(c not in "0123456789abcdef" for c in d)]
        if bad:
            raise ValueError(f"api_key_sha256: {len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not a "
                             "SHA-256 hex digest (64 lowercase hex characters)")
        return self

    def key_digests(self, *, missing_ok: bool = False) -> list[str]:
        """The accepted keys' digests: the configured ones and those of the keys this process can read."""
        keys = read_api_keys(self.api_keys_env, self.api_keys_file, missing_ok=missing_ok)
        return sorted(set(self.api_key_sha256) | {key_digest(k) for k in keys})


def serving_device(num_gpus: float) -> str:
    """Where a replica runs its model: a GPU when it was given one, and a loud error (not a quiet CPU fallback at a
    fraction of the speed) when it was given one but its node has no CUDA device torch can use."""
    if not num_gpus:
        return "cpu"
    if not torch.cuda.is_available():
        raise EmberError(f"num_gpus is {num_gpus:g} but this replica's node has no CUDA device that torch "
                         f"{torch.__version__} can use (a CPU build of torch, or no driver); install a CUDA build of "
                         "torch there, or serve with num_gpus: 0")
    return "cuda"


def kv_budget(cfg, args: ServeArgs, dtype_bytes: int) -> tuple[int, int]:
    """(bytes for the running rows' KV, bytes for the prefix cache): `kv_cache_memory_gb` is both together."""
    store = args.prefix_cache_tokens * kv_bytes_per_token(cfg, dtype_bytes)
    return int(args.kv_cache_memory_gb * GIB) - store, store


def plan_max_model_len(cfg, args: ServeArgs, dtype_bytes: int) -> int:
    """`max_model_len`: as configured, or the model's context capped so that one request of it (plus the prefill
    slack) fits the rows' part of `kv_cache_memory_gb`; raises EmberError naming the numbers when it does not. The
    rows are allocated by need: more requests run together as their lengths allow (see `ember.serve.kv`)."""
    context = cfg.max_position_embeddings
    per_token = kv_bytes_per_token(cfg, dtype_bytes)
    rows, store = kv_budget(cfg, args, dtype_bytes)
    fits = rows // per_token - args.prefill_chunk
    of = (f"kv_cache_memory_gb is {args.kv_cache_memory_gb}, {store / GIB:.2f} GiB of it the prefix cache's "
          f"{args.prefix_cache_tokens} tokens")
    if args.max_model_len is not None:
        if args.max_model_len > context:
            raise EmberError(f"max_model_len: {args.max_model_len} is more than the model's context of {context} "
                             "tokens")
        need = per_token * (args.max_model_len + args.prefill_chunk)
        if need > rows:
            raise EmberError(f"max_model_len: one request of {args.max_model_len} tokens needs {need / GIB:.2f} GiB "
                             f"of KV cache; {of} (raise it, or lower max_model_len or prefix_cache_tokens)")
        return args.max_model_len
    if fits < min(context, 64):
        raise EmberError(f"kv_cache_memory_gb: {args.kv_cache_memory_gb} GiB holds {max(fits, 0)} tokens of one "
                         f"request ({per_token} bytes per token; {store / GIB:.2f} GiB go to the prefix cache's "
                         f"{args.prefix_cache_tokens} tokens); raise it or lower prefix_cache_tokens")
    return min(context, fits)


class TextDecoder:
    """Turns one choice's tokens into text increments, with stop strings (text ends before the first one).

    Incremental, as vLLM does it: each step decodes only a short window (the last shown tokens as context, then the
    new ones) and emits what the new ones add, holding them while they end in an incomplete UTF-8 sequence. The cost
    per token stays flat, and tokenizers whose decoders strip a leading space still space words right."""

    def __init__(self, tokenizer, stops: tuple[str, ...], context: list[int] = ()):
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
        self.prefix_hit_rate = metrics.Gauge("ember_serve_prefix_cache_hit_rate",
                                             SERVE_METRICS["ember_serve_prefix_cache_hit_rate"], tag_keys=("model",))
        self.kv_bytes = metrics.Gauge("ember_serve_kv_cache_bytes", SERVE_METRICS["ember_serve_kv_cache_bytes"],
                                      tag_keys=("model",))
        for m in (self.ttft, self.tpot, self.tokens, self.batch, self.queue, self.prefix_hit_rate, self.kv_bytes):
            m.set_default_tags(dict(tags))
        self._last_step = 0.0

    def request(self, route: str, code: int) -> None:  # route: one of a fixed set (see guard.ROUTES)
        self.requests.inc(tags={"route": route, "code": str(code)})

    def finished(self, r) -> None:
        if r.first_token_at is None:
            return
        self.ttft.observe(r.first_token_at - r.arrival)
        if len(r.output) > 1:
            self.tpot.observe((time.perf_counter() - r.first_token_at) / (len(r.output) - 1))
        if r.output:
            self.tokens.inc(len(r.output))

    def step(self, record) -> None:  # an engine StepRecord
        now = time.perf_counter()
        if now - self._last_step > 0.25:  # gauges at most 4 times a second
            self._last_step = now
            self.batch.set(record.rows)
            self.queue.set(record.queued)
            self.kv_bytes.set(record.kv_cache_bytes)
            if record.prefix_hit_rate is not None:
                self.prefix_hit_rate.set(record.prefix_hit_rate)


app = FastAPI(title="Ember", docs_url=None, redoc_url=None)
app.add_middleware(RequestGuard)


@app.exception_handler(RequestValidationError)
async def _invalid_body(request, exc: RequestValidationError):
    return validation_error(list(exc.errors())).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException):
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
        return body_parse_error(exc.__cause__).response()
    return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()


@app.exception_handler(APIError)
async def _api_error(request, exc: APIError):
    return exc.response()


class GenerationFailed(Exception):
    """The engine ended a request with an error (its other choices, and other requests, are unaffected)."""


def _failed(exc: GenerationFailed) -> APIError:
    return APIError(500, f"generation failed for this request: {exc}", kind="server_error",
                    code="generation_failed")


async def proxy_host() -> Optional[str]:
    """The host Ray Serve's HTTP proxy binds, from the Serve controller (None when it cannot be learned)."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return (await controller.get_http_config.remote()).host
    except Exception as exc:  # an unknown host counts as exposed (see require_keys)
        log.warning("could not read the Serve proxy's host from the controller: %s", exc)
        return None

@serve.deployment(name="EmberServer", health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(app)
class EmberServer:
    async def __init__(self, args: dict):
        self.args = ServeArgs.model_validate(args)
        a = self.args
        # Keys are decided here, where requests are served: those the deployment carries, and this node's own.
        keys = APIKeys(a.key_digests(missing_ok=True))
        require_keys(await proxy_host(), bool(keys), a.allow_unauthenticated, "EmberServer")
        torch.set_num_threads(a.torch_threads or max(1, int(a.num_cpus or 1)))
        device = serving_device(a.num_gpus)
        # A model dir in object storage: each replica's node pulls it into its node cache.
        self.model_dir = local_model_dir(a.model_dir)
        self.name = a.model_name or storage.name(a.model_dir)
        self.model = load_model(self.model_dir, dtype=DTYPES[a.dtype], device=device)
        self.max_model_len = plan_max_model_len(self.model.config, a, DTYPES[a.dtype].itemsize)
        self.limits = ServerLimits(self.max_model_len, a.max_n, a.max_queue + a.max_batch_size)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.template = ChatTemplate.of(tokenizer_config(self.model_dir))
        self.stop_ids = frozenset(stop_token_ids(self.model_dir, self.tokenizer)
                                  | (turn_end_ids(self.tokenizer) if self.template else set()))
        self.created = int(time.time())
        self.metrics = _Metrics(self.name)
        self.guard_policy = GuardPolicy(keys, a.max_body_bytes, self.metrics.request)
        rows_bytes, _ = kv_budget(self.model.config, a, DTYPES[a.dtype].itemsize)
        self.engine = Engine(self.model, max_batch_size=a.max_batch_size, max_tokens_in_flight=a.max_tokens_in_flight,
                             max_queue=a.max_queue, prefill_chunk=a.prefill_chunk,
                             prefill_tokens_per_step=a.prefill_tokens_per_step, max_model_len=self.max_model_len,
                             on_step=self.metrics.step, kv_cache_bytes=rows_bytes,
                             prefix_cache_tokens=a.prefix_cache_tokens)

    def check_health(self):
        if not self.engine.healthy:
            raise RuntimeError(f"the generation engine is unhealthy ({self.engine.failed_steps} failed steps in a "
                               "row, or its loop has stopped)")

    # ----------------------------------------------------------------- routes

    @app.get("/health")
    async def health(self):
        body = {"status": "ok" if self.engine.healthy else "unhealthy", "model": self.name, **self.engine.stats()}
        return JSONResponse(body, status_code=200 if self.engine.healthy else 503)

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "ember", "max_model_len": self.max_model_len}]}

    @app.post("/v1/completions", response_model=None, responses=documented(CompletionResponse))
    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        prompt = body.prompt
        texts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt[0], str) else None
        self._check(body, len(texts) if texts is not None else 1)
        if texts is None:
            vocab = self.tokenizer.get_vocab_size()
            if any(p >= vocab for p in prompt):
                raise APIError(400, f"prompt: token ids must be below the vocabulary size {vocab}", "prompt")
            prompts = [list(prompt)]
        else:
            prompts = [self.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        return await self._generate(body, prompts, request, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions", response_model=None, responses=documented(ChatCompletionResponse))
    async def chat_completions(self, body: ChatCompletionRequest, request: HTTPRequest):
        self._check(body, 1)
        if self.template is None:
            raise APIError(400, f"the model {self.name!r} has no chat template; use /v1/completions", "messages")
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(400, "continue_final_message continues the last message, so add_generation_prompt must be "
                           "false", "continue_final_message")
        try:
            text = self.template.render([{"role": m.role, "content": m.content} for m in body.messages],
                                        add_generation_prompt=body.add_generation_prompt,
                                        continue_final_message=body.continue_final_message,
                                        **(body.chat_template_kwargs or {}))
        except BadRecord as exc:
            raise APIError(400, exc.detail, "messages") from None
        prompts = [self.tokenizer.encode(text, add_special_tokens=False).ids]
        return await self._generate(body, prompts, request, chat=True, logprobs=None)

    # ----------------------------------------------------------------- plumbing

    def _check(self, body: SamplingRequest, prompts: int) -> None:
        if body.model != self.name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                           "model", code="model_not_found")
        self.limits.check(body, prompts)

    def _choices(self, body: SamplingRequest, prompts: list[list[int]], chat: bool, logprobs):
        """The engine requests of one client request: each prompt × n."""
        field = "messages" if chat else "prompt"
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty", field)
            if len(p) >= self.max_model_len:
                raise APIError(400, f"the prompt has {len(p)} tokens; this server's max_model_len is "
                                    f"{self.max_model_len} tokens", field, code="context_length_exceeded")
        params = sampling_params(body, self.args.default_max_tokens if chat else 16)
        params.max_new_tokens = min(params.max_new_tokens, self.max_model_len - max(len(p) for p in prompts))
        stop_ids = frozenset() if body.ignore_eos else self.stop_ids
        jobs = []
        for p in prompts:
            for k in range(body.n):
                # n samples with one seed must still differ
                choice = replace(params, seed=params.seed + k) if params.seed is not None and body.n > 1 else params
                jobs.append(Request(prompt=p, params=choice, logprobs=logprobs, stop_ids=stop_ids,
                                    cache_salt=body.cache_salt))
        return jobs

    async def _generate(self, body: SamplingRequest, prompts, request: HTTPRequest, chat: bool, logprobs):
        jobs = self._choices(body, prompts, chat, logprobs)
        loop = asyncio.get_running_loop()
        for r in jobs:
            r.attach(loop)
        try:
            self.engine.submit(*jobs)  # all choices or none
        except Overloaded as exc:
            raise APIError(503, str(exc), kind="server_error", code="overloaded") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(jobs, ident, chat, include_usage), media_type="text/event-stream")
        return await self._complete(jobs, ident, chat)

    def _choice_texts(self, r):
        return TextDecoder(self.tokenizer, r.params.stop, r.prompt)

    async def _run_choice(self, r, decoder, on_text):
        """Feeds one request's tokens through its decoder; returns its finish reason (raises GenerationFailed)."""
        finish = "length"
        async for event in r.events():
            if event.token is None:
                if event.finish_reason not in ("stop", "length"):
                    raise GenerationFailed(event.error or "the server stopped before the request finished")
                finish = event.finish_reason
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

    def _logprobs(self, event) -> tuple[str, float, dict]:
        return (self.tokenizer.decode([event.token]), event.logprob,
                {self.tokenizer.decode([t]): v for t, v in (event.top_logprobs or [])})

    async def _complete(self, jobs, ident: str, chat: bool):
        async def one(index, r):
            decoder = self._choice_texts(r)
            parts, lp = [], {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0

            async def on_text(text, event):
                nonlocal offset
                parts.append(text)
                if event is not None and event.logprob is not None:
                    for key, value in zip(("tokens", "token_logprobs", "top_logprobs"), self._logprobs(event)):
                        lp[key].append(value)
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
        except GenerationFailed as exc:
            raise _failed(exc) from None
        finally:
            for r in jobs:
                self.engine.cancel(r)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name, "choices": list(choices), "usage": self._usage(jobs)}

    def _usage(self, jobs) -> dict:
        """OpenAI's usage: each prompt counted once (not per choice), with the tokens of it read from the prefix
        cache (the fewest over its choices: what no choice had to compute)."""
        cached: dict[int, int] = {}
        for r in jobs:
            cached[id(r.prompt)] = min(cached.get(id(r.prompt), r.cached_tokens), r.cached_tokens)
        prompt_tokens = sum(len(p) for p in {id(r.prompt): r.prompt for r in jobs}.values())
        completion = sum(len(r.output) for r in jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    async def _stream(self, jobs, ident: str, chat: bool, include_usage: bool):
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
                    token, logprob, top = self._logprobs(event)
                    logprobs = {"tokens": [token], "token_logprobs": [logprob], "top_logprobs": [top],
                                "text_offset": [0]}
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return {"id": ident, "object": kind, "created": created, "model": self.name, "choices": [choice]}

        async def one(index, r):
            decoder = self._choice_texts(r)

            async def on_text(text, event):
                queue.put_nowait(chunk(index, text, event=event))

            try:
                finish = await self._run_choice(r, decoder, on_text)
                queue.put_nowait(chunk(index, finish=finish))
            except GenerationFailed as exc:  # as vLLM does: an error event, then the stream ends
                queue.put_nowait(_failed(exc).body())
            finally:
                queue.put_nowait(None)  # this choice is done

        if chat:
            for i in range(len(jobs)):
                yield f"data: {json.dumps(chunk(i, role=True))}\n\n"
        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(jobs)]
        try:
            running, failed = len(tasks), False
            while running and not failed:
                # Everything already waiting goes out in one write: under load, fewer, larger messages.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                running -= sum(1 for item in items if item is None)
                failed = any(item is not None and "error" in item for item in items)
                text = "".join(f"data: {json.dumps(item)}\n\n" for item in items if item is not None)
                if text:
                    yield text
            if include_usage and not failed:
                usage = {"id": ident, "object": kind, "created": created, "model": self.name, "choices": [],
                         "usage": self._usage(jobs)}
                yield f"data: {json.dumps(usage)}\n\n"
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
    """The Ray Serve application for a model dir (Ray validates `args` against ServeArgs). The keys this process can
    read travel to the replicas as digests; the KV plan and the key requirement are checked here first, so a bad
    config fails before anything is deployed."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    path = builtin.resolve(args.model_dir)
    config = storage.join(path, "config.json")
    if not storage.is_file(config):
        raise EmberError(f"model_dir: {storage.display(path)} is not a model directory (no config.json)")
    plan_max_model_len(config_from_hf(read_json(config)), args, DTYPES[args.dtype].itemsize)
    digests = args.key_digests()
    require_keys(args.host, bool(digests), args.allow_unauthenticated, "build_app")
    given = args.model_dir if builtin.is_builtin(args.model_dir) else path  # each node resolves builtin:
    args = args.model_copy(update={"model_dir": given, "api_key_sha256": digests})
    return EmberServer.options(**deployment_options(args)).bind(args.model_dump())
