"""The OpenAI protocol as typed request models: every field a client may send, with its bounds.

The routes take these models, so `/openapi.json` describes the real request bodies and FastAPI validates each body
before a route sees it. Numbers are finite (`NaN` and `Infinity`, which Python's JSON parser accepts, are refused),
strings are valid Unicode (no lone surrogates), lists are bounded, and types are strict (`"10"` is not an integer).
`chat_template_kwargs` may not use the names the server or the template engine sets. Bounds that depend on the
server (the context, `max_n`, the queue's room, a prompt's characters) are checked by `ServerLimits.check`.

A failure becomes OpenAI's error JSON (`APIError`): status 400 and `param` naming the field, e.g. `messages[2].role`.
"""

# No `from __future__ import annotations`: pydantic and FastAPI read these annotations at runtime.

from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from ember.model.sampling import MIN_PENALTY

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # the hold-back scan for stop strings runs per token; its cost grows with their length
MAX_LOGPROBS = 20
MAX_N = 128  # a hard bound; each server's `max_n` (ServeArgs) is at most this
MAX_PROMPTS = 256  # texts in one completions request (each server also bounds prompts × n by its queue's room)
MAX_TOKENS = 1 << 31  # beyond any context; each server checks max_tokens against its max_model_len
SEED_LIMIT = 1 << 63  # torch generators take 64-bit seeds; n > 1 adds the choice's index to the seed
GREEDY_BELOW = 1e-5  # a smaller temperature means greedy (1e-320 is 0 in float32 and divides logits by zero)


class APIError(Exception):
    """An error a client sees as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("unicode", "holds a lone surrogate at character {at} (not valid Unicode)",
                                  {"at": exc.start}) from None
    return text


def _one_of(expected: str):
    """A union's errors as one: the member whose shape fit but whose content did not, else 'must be …'."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError as exc:
            for e in exc.errors():
                if not e["type"].endswith("_type"):  # the member whose shape fit
                    where = _param(e["loc"])
                    raise PydanticCustomError("value_error", "{detail}", {
                        "detail": f"{_message(e)} (at {where})" if where else _message(e)}) from None
            raise PydanticCustomError("one_of", f"must be {expected}") from None

    return WrapValidator(validate)


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Stop = Annotated[Union[StopText, Annotated[list[StopText], Field(min_length=1, max_length=MAX_STOP_STRINGS)]],
                 _one_of(f"a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them (each at most "
                         f"{MAX_STOP_CHARS} characters)")]
PromptText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]
Prompt = Annotated[Union[PromptText, Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)],
                         Annotated[list[TokenId], Field(min_length=1)]],
                   _one_of(f"a non-empty string, a list of 1 to {MAX_PROMPTS} of them or a non-empty list of token "
                           "ids")]
Finite = dict(allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="Send a last chunk with the request's token usage.")


class SamplingRequest(BaseModel):
    """The fields both routes share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[Text, Field(min_length=1, max_length=256)] = Field(description="The served model's id.")
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS, description="New tokens at most (≤ max_model_len).")
    temperature: float = Field(1.0, ge=0, le=2, **Finite, description=f"0 (or below {GREEDY_BELOW}) is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, **Finite, description="Nucleus sampling: the smallest set of tokens "
                                                                  "holding this much probability.")
    top_k: int = Field(0, ge=-1, le=1 << 20, description="Sample among the k likeliest tokens (0 or -1: all).")
    repetition_penalty: float = Field(1.0, ge=MIN_PENALTY, le=100, **Finite,
                                      description="Above 1 discourages tokens already seen (vLLM's extension).")
    presence_penalty: float = Field(0.0, ge=-2, le=2, **Finite, description="Above 0 discourages tokens already "
                                                                            "generated, once each.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, **Finite, description="Above 0 discourages tokens already "
                                                                             "generated, by their count.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt (≤ the server's max_n).")
    seed: Optional[int] = Field(None, ge=0, lt=SEED_LIMIT, description="Same seed, same output.")
    stop: Optional[Stop] = Field(None, description="Text ends before the first of these strings.")
    stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format.")
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = Field(False, description="Generate max_tokens whatever comes (vLLM's extension).")
    return_token_ids: bool = Field(False, description="Also return the prompt's and each choice's token ids "
                                                      "(vLLM's extension).")
    user: Optional[Annotated[Text, Field(max_length=256)]] = Field(None, description="Accepted and ignored.")
    cache_salt: Optional[Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_valid_unicode)]] = Field(
        None, description="Prefix-cache isolation: the request shares cached prompt blocks only with requests of the "
                          "same salt (and, on a server with API keys, of the same key), so its time to first token "
                          "reveals nothing of others' prompts (vLLM's extension).")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt = Field(description="A text, a list of texts, or a list of token ids.")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Log probabilities of the chosen "
                                                                             "token and this many likeliest ones.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text
    name: Optional[Annotated[Text, Field(max_length=64)]] = None


# Names a request's chat_template_kwargs may not use, since the server or the template engine sets them: the
# conversation and the tokenizer's own tokens (template variables); the parameters of transformers'
# `apply_chat_template`, which vLLM passes them as (`self` is a TypeError there, a client's `continue_final_message`
# is silently replaced by vLLM's, and `sanitize_control_tokens` is the server's); and the globals of its Jinja
# environment and Jinja's own special names (a `namespace` or `raise_exception` that is a string breaks a template
# that uses it). A test keeps this list current with transformers.
RESERVED_TEMPLATE_VARIABLES = (
    "messages", "bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token",
    "additional_special_tokens",
    "self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "kwargs",
    "range", "dict", "lipsum", "cycler", "joiner", "namespace", "raise_exception", "strftime_now", "loop", "caller",
    "varargs")


def _template_variables(value: dict) -> dict:
    reserved = sorted(set(value) & set(RESERVED_TEMPLATE_VARIABLES))
    if reserved:
        raise PydanticCustomError("reserved", "sets {names}, which the server sets", {"names": ", ".join(reserved)})
    return value


TemplateName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
TemplateValue = Annotated[Union[bool, Annotated[int, Field(ge=-(1 << 31), lt=1 << 31)],
                                Annotated[str, Field(max_length=256), AfterValidator(_valid_unicode)]],
                          _one_of("a boolean, a 32-bit integer or a string of at most 256 characters")]


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024, description="The conversation so far.")
    chat_template_kwargs: Optional[Annotated[dict[TemplateName, TemplateValue], Field(max_length=16),
                                             AfterValidator(_template_variables)]] = Field(
        None, description="The chat template's own switches, e.g. Qwen3's {\"enable_thinking\": false} (vLLM's "
                          "extension).")
    add_generation_prompt: bool = Field(True, description="Open a new assistant turn after the conversation (vLLM's "
                                                      "extension).")
    continue_final_message: bool = Field(False, description="Continue the last message instead (an assistant "
                                                            "prefill), with add_generation_prompt false (vLLM's "
                                                            "extension).")
    logprobs: Optional[Literal[False]] = Field(None, description="Not supported for chat completions (false only).")


@dataclass(frozen=True)
class ServerLimits:
    """The bounds that depend on the server: its context, `max_n`, how many choices its queue can ever hold, and the
    characters of a prompt (checked before anything tokenizes it)."""

    max_model_len: int
    max_n: int
    max_choices: int  # prompts × n of one request
    max_prompt_chars: int  # of each text of a completions request, of a chat's messages together

    def check(self, req: SamplingRequest, prompts: int) -> None:
        """Raises APIError (400) naming the field and the bound."""
        self._check_prompt_chars(req)
        if req.max_tokens is not None and req.max_tokens > self.max_model_len:
            raise APIError(400, f"max_tokens: {req.max_tokens} is more than this model's context of "
                                f"{self.max_model_len} tokens", "max_tokens")
        if req.n > self.max_n:
            raise APIError(400, f"n: at most {self.max_n} choices per prompt on this server, got {req.n}", "n")
        if prompts * req.n > self.max_choices:
            raise APIError(400, f"{prompts} prompt(s) × n={req.n} is {prompts * req.n} choices; this server takes at "
                                f"most {self.max_choices} in one request", "n")

    def _check_prompt_chars(self, req: SamplingRequest) -> None:
        if isinstance(req, ChatCompletionRequest):
            param, chars = "messages", sum(len(m.content) for m in req.messages)
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
            param, chars = "prompt", max(map(len, texts), default=0)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"{param}: a prompt of {chars} characters; this server takes at most "
                                f"{self.max_prompt_chars} characters per prompt (max_prompt_chars)", param,
                           code="prompt_too_long")


def _message(error: dict) -> str:
    if error["type"] == "string_unicode":  # pydantic's own check of a constrained string
        return "holds a lone surrogate (not valid Unicode)"
    return error["msg"]


def _param(loc) -> Optional[str]:
    """`("body", "messages", 2, "role")` → `messages[2].role`; union member tags (`list[int]`, `str`) are left out."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part in ("str", "int", "float", "bool", "list", "dict"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """The first of a request body's validation errors as a 400 that names its field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail} at character {first['loc'][-1]})")
    param = _param(first["loc"])
    if first["type"] == "missing" and param is None:
        return APIError(400, "the request body must be a JSON object")
    if first["type"] == "extra_forbidden":
        return APIError(400, f"{param}: unknown field (not supported by this server)", param)
    if param is None:
        return APIError(400, f"the request body must be a JSON object ({first['msg']})")
    return APIError(400, f"{param}: {_message(first)}", param)


def body_parse_error(cause: Optional[BaseException]) -> APIError:
    """A body JSON could not be parsed for a reason other than its syntax."""
    if isinstance(cause, RecursionError):
        return APIError(400, "the request body is nested too deeply to parse")
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"the request body is not valid UTF-8 (byte {cause.start})")
    if isinstance(cause, ValueError):  # an integer of more than 4300 digits
        return APIError(400, "the request body holds a number too large to parse")
    return APIError(400, "the request body could not be parsed as JSON")


# ----------------------------------------------------------------- responses (documented in /openapi.json)

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens read from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant", "user", "system"] = Field(description="assistant; with add_generation_prompt false, "
                                                                     "the role of the message it continues (vLLM).")
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def documented(success: type[BaseModel]) -> dict:
    """A route's `responses`: its JSON body (or, with `stream: true`, server-sent events) and OpenAI's errors."""
    errors = {status: {"model": ErrorResponse, "description": what} for status, what in (
        (400, "An invalid request (the error's param names the field)"), (401, "A missing or wrong API key"),
        (404, "An unknown model"), (408, "A body that did not arrive within body_timeout_s"),
        (413, "A body over max_body_bytes"),
        (500, "Generation failed for this request"), (503, "The server is at capacity; retry later"))}
    return {200: {"model": success, "content": {"text/event-stream": {}}}, **errors}
