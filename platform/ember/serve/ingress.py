"""The HTTP side of Ember's serving app: OpenAI's routes, Ember's typed protocol and guard in front of vLLM.

`EmberIngress` is `ray.serve.llm`'s `OpenAiIngress` (the handle to the engine deployment, LoRA requests routed by
Serve's model multiplexing) with Ember's routes: `GET /v1/models`, `POST /v1/completions`, `POST
/v1/chat/completions` (streamed as server-sent events with `stream: true`) and `GET /health`. Each body is first
validated as Ember's typed request (`ember.serve.protocol`: every field bounded, strict types, finite numbers, valid
Unicode, a prompt of at most `max_prompt_chars`), then handed to vLLM as its own request model, with what the server
decides rather than the client: a prefix-cache salt of the request's API key (`cache_salt`, so keys share no cached
blocks) and, for chats, `sanitize_control_tokens` (special-token text inside a message is encoded as text). vLLM's
answer (or its error, turned into OpenAI's error JSON with `param`) goes back as it is; vLLM renders and tokenizes
prompts in its own threads, off the engine replica's event loop, and this ingress tokenizes nothing.
`RequestGuard` (`ember.serve.guard`) enforces API keys, the body limit and the body deadline here, where requests
arrive, whatever started the app. A client that goes away cancels its engine request: Serve cancels the handle call,
and vLLM aborts the sequence.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime.

import asyncio
import hashlib
import json
import logging
import time
from typing import Optional

import ray
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest as VLLMChatRequest
from ray.serve.llm.openai_api_models import CompletionRequest as VLLMCompletionRequest
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.exceptions import VLLMValidationError

from ember.metrics import SERVE_METRICS
from ember.serve.args import ServeArgs
from ember.serve.guard import APIKeys, GuardPolicy, RequestGuard, require_keys
from ember.serve.protocol import (
    GREEDY_BELOW,
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    SamplingRequest,
    ServerLimits,
    body_parse_error,
    documented,
    validation_error,
)
from ember.serve.server import adapter_path

log = logging.getLogger("ember")

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


async def proxy_host() -> Optional[str]:
    """The host Ray Serve's HTTP proxy binds, from the Serve controller (None when it cannot be learned)."""
    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return (await controller.get_http_config.remote()).host
    except Exception as exc:  # noqa: BLE001 (whatever the cause, an unknown host counts as exposed: require_keys)
        log.warning("could not read the Serve proxy's host from the controller: %s", exc)
        return None


def vllm_request(body: SamplingRequest, chat: bool, args: ServeArgs, key_digest: Optional[str] = None):
    """vLLM's request model for a body Ember's protocol accepted: the fields the client set, greedy as 0, and what
    the server sets (see the module docstring); `key_digest` is the request's API key's, None without keys."""
    fields = body.model_dump(exclude_unset=True, exclude_none=True)
    if "temperature" in fields and body.temperature < GREEDY_BELOW:
        fields["temperature"] = 0.0  # 1e-320 would divide the logits by zero
    if args.prefix_cache_per_key and key_digest is not None:
        fields["cache_salt"] = key_cache_salt(key_digest, body.cache_salt)
    if chat:
        fields.setdefault("max_tokens", args.default_max_tokens)
        if args.sanitize_control_tokens:
            # transformers' apply_chat_template encodes the control tokens found in messages as text when it
            # tokenizes the chat itself (vLLM otherwise renders text and tokenizes that; its path for Mistral's
            # tokenizers does the same), in vLLM's renderer threads like the rest.
            fields["chat_template_kwargs"] = {**fields.get("chat_template_kwargs", {}), "sanitize_control_tokens": True,
                                              "tokenize": True}
    try:
        return (VLLMChatRequest if chat else VLLMCompletionRequest).model_validate(fields)
    except VLLMValidationError as exc:  # a rule vLLM checks beyond the schema (stream_options without stream)
        raise APIError(400, str(exc).split(" (parameter=")[0], getattr(exc, "parameter", None)) from None


def key_cache_salt(key_digest: str, client_salt: Optional[str]) -> str:
    """The prefix-cache salt of a request made with the key of `key_digest` (a hash of the digest, never the key), with
    the client's own salt after it: requests of two keys never share a salt, whatever salts their clients send."""
    tenant = hashlib.sha256(b"ember prefix cache\0" + bytes.fromhex(key_digest)).hexdigest()[:32]
    return tenant if client_salt is None else f"{tenant}:{client_salt}"


def engine_error(error, field: str) -> APIError:
    """vLLM's ErrorResponse as Ember's APIError: the prompt's length (vLLM's `input_tokens`, or `input_text` for the
    characters it checks before tokenizing) is the request's `prompt` / `messages`, with OpenAI's code
    `context_length_exceeded`."""
    e = error.error
    status = e.code if isinstance(e.code, int) and 400 <= e.code < 600 else 500
    if e.param in ("input_tokens", "input_text"):
        return APIError(400, e.message, field, code="context_length_exceeded")
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, e.message, e.param, kind=kind)


def _is_error(item) -> bool:
    """vLLM's ErrorResponse (the engine yields `ray.serve.llm`'s internal subclass of it, not the public one)."""
    return not isinstance(item, (str, list)) and getattr(item, "error", None) is not None


def _sse(batch) -> str:
    """One or several of the engine's stream items as server-sent events (vLLM's are already `data: ...` lines; an
    error object becomes an error event, as vLLM's own server sends it)."""
    items = batch if isinstance(batch, list) else [batch]
    return "".join(i if isinstance(i, str) else f"data: {json.dumps(i.model_dump(mode='json'))}\n\n" for i in items)


async def _events(first, stream):
    """The engine's server-sent events as they come (vLLM batches them in lists); a client that goes away cancels
    the engine request."""
    done = False
    try:
        yield _sse(first)
        async for batch in stream:
            yield _sse(batch)
        done = True
    finally:
        if not done:
            stream.cancel()


class _Metrics:
    """The ingress's own Ray Serve metric (vLLM exports the engine's: `ray_vllm_*`)."""

    def __init__(self, model: str):
        from ray.serve import metrics

        self.requests = metrics.Counter("ember_serve_requests", SERVE_METRICS["ember_serve_requests"],
                                        tag_keys=("model", "route", "code"))
        self.requests.set_default_tags({"model": model})

    def request(self, route: str, code: int) -> None:  # route: one of a fixed set (see guard.ROUTES)
        self.requests.inc(tags={"route": route, "code": str(code)})


@serve.deployment(name="EmberIngress")
@serve.ingress(app)
class EmberIngress(OpenAiIngress):
    async def __init__(self, server, args: dict, facts: dict):
        super().__init__({facts["name"]: server}, {facts["name"]: None})
        self.args = ServeArgs.model_validate(args)
        a = self.args
        # Keys are decided here, where requests are served: those the deployment carries, and this node's own.
        keys = APIKeys(a.key_digests(missing_ok=True))
        require_keys(await proxy_host(), bool(keys), a.allow_unauthenticated, "EmberIngress")
        self.name, self.facts = facts["name"], facts
        self.limits = ServerLimits(facts["max_model_len"], a.max_n, a.max_choices,
                                   a.prompt_chars(facts["max_model_len"]))
        self.created = int(time.time())
        self.metrics = _Metrics(self.name)
        self.guard_policy = GuardPolicy(keys, a.max_body_bytes, a.body_timeout_s, self.metrics.request)
        self.server = server

    # ----------------------------------------------------------------- routes

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(self):
        """The ingress is up and an engine replica answers; its figures (`ember.serve.stats`)."""
        try:
            stats = await asyncio.wait_for(self.server.stats.remote(), timeout=10)
        except Exception as exc:  # noqa: BLE001 (no engine replica answers: not healthy, whatever the cause)
            return JSONResponse({"status": "unavailable", "model": self.name, "detail": type(exc).__name__},
                                status_code=503)
        return {"status": "ok", "model": self.name, **stats}

    @app.get("/v1/models")
    async def models(self):
        base = {"object": "model", "created": self.created, "owned_by": "ember",
                "max_model_len": self.facts["max_model_len"]}
        listed = [{"id": self.name, "root": self.name, "parent": None, **base}]
        listed += [{"id": f"{self.name}:{a}", "root": a, "parent": self.name, **base}
                   for a in sorted(self.args.adapters)]
        return {"object": "list", "data": listed}

    @app.post("/v1/completions", response_model=None, responses=documented(CompletionResponse))
    async def completions(self, body: CompletionRequest, request: HTTPRequest):
        prompt = body.prompt
        prompts = 1 if isinstance(prompt, str) or not isinstance(prompt[0], str) else len(prompt)
        self._check(body, prompts)
        vocab = self.facts["vocab_size"]
        if not isinstance(prompt, str) and isinstance(prompt[0], int) and vocab and any(p >= vocab for p in prompt):
            raise APIError(400, f"prompt: token ids must be below the vocabulary size {vocab}", "prompt")
        return await self._forward(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=None, responses=documented(ChatCompletionResponse))
    async def chat_completions(self, body: ChatCompletionRequest, request: HTTPRequest):
        self._check(body, 1)
        if not self.facts["chat_template"]:
            raise APIError(400, f"the model {self.name!r} has no chat template; use /v1/completions", "messages")
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(400, "continue_final_message continues the last message, so add_generation_prompt must be "
                           "false", "continue_final_message")
        return await self._forward(body, request, chat=True)

    # ----------------------------------------------------------------- plumbing

    def _check(self, body: SamplingRequest, prompts: int) -> None:
        base, _, adapter = body.model.partition(":")
        known = base == self.name and (not adapter or adapter_path(self.args.adapters, self.args.adapter_prefix,
                                                                   adapter) is not None)
        if not known:
            served = [self.name] + [f"{self.name}:{a}" for a in sorted(self.args.adapters)]
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{', '.join(repr(s) for s in served)}", "model", code="model_not_found")
        self.limits.check(body, prompts)

    async def _forward(self, body: SamplingRequest, http: HTTPRequest, chat: bool):
        """Sends the request to an engine replica; its JSON, its stream, or its error as OpenAI's error JSON."""
        request = vllm_request(body, chat, self.args, http.scope["state"].get("api_key_sha256"))
        handle = self._get_configured_serve_handle(body.model)
        stream = handle.chat.remote(request, None) if chat else handle.completions.remote(request, None)
        try:
            first = await stream.__anext__()
        except BackPressureError:
            raise APIError(503, "the server is at capacity (every replica's queue is full); retry later",
                           kind="server_error", code="overloaded") from None
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the request without an answer", kind="server_error") from None
        item = first[0] if isinstance(first, list) and first else first
        if _is_error(item):
            stream.cancel()
            raise engine_error(item, "messages" if chat else "prompt")
        if not isinstance(first, list) and not isinstance(first, str):
            return JSONResponse(first.model_dump(mode="json"))
        return StreamingResponse(_events(first, stream), media_type="text/event-stream")

