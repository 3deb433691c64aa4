"""Conversations for fine-tuning: records → messages → chat-template text → token ids with a loss mask → packed rows.

- Records come as ``messages`` (a list of ``{role, content}``), ShareGPT's ``conversations`` (a list of
  ``{from, value}``, from ``human``/``gpt``/``system``), a list under another name (``messages_field``),
  ``prompt``/``response``, or Alpaca-style ``instruction``/``input``/``output``. A bad record raises `BadRecord` (a
  reason kind and a detail); the reader counts it with its ``file:line`` or ``file:row N``.
- The chat template is the base model's (``chat_template`` in its ``tokenizer_config.json``, Jinja, rendered the way
  `transformers` renders it) or Ember's ChatML default.
- The loss mask marks the tokens of each assistant turn as the template writes it (its content and its end marker):
  for turn i, the text of ``messages[:i]`` with the generation prompt is a prefix of the text of ``messages[:i+1]``,
  and the characters between the two are that turn's. Templates for which that does not hold (Mistral Nemo's puts
  the system message on the last user turn; Qwen3's writes earlier turns without their thinking blocks) mark each
  assistant content where it appears in the text, in order, with the special token right after it. Tokens whose
  first character lies in a turn are targets.
- `SFTPacker` packs whole conversations into rows of ``seq_len + 1`` with a segment number per token, so training
  keeps their attention and their positions apart (see `Transformer.forward(segments=...)`).
"""

from __future__ import annotations

import logging
from datetime import datetime

import numpy as np
from jinja2 import ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from ember.config.specs import SourceSpec
from ember.data.sources import RecordReader, SkipLog, plan_units, resolve_inputs
from ember.data.steps import encodable
from ember.data.tokenizer import CHAT_TOKENS, DEFAULT_CHAT_TEMPLATE, PAD_TOKEN, token_name
from ember.errors import EmberError

log = logging.getLogger("ember")

ROLES = ("system", "user", "assistant")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for where a continued message ends
FORMATS = ("auto", "messages", "prompt_response", "alpaca")
MESSAGES_FIELDS = ("messages", "conversations")  # where a list of turns is looked for when no field is named
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class BadRecord(Exception):
    """A record that is not a usable conversation; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def text_field(record: dict, key: str) -> str:
    if key not in record:
        raise BadRecord("missing_field", f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field {key!r} is {type(value).__name__}, expected a string")
    if not value.isascii() and not encodable(value):
        raise BadRecord("lone_surrogate", f"field {key!r} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                          "escape), not text")
    return value


def detect_format(record: dict, messages_field: str | None = None) -> str:
    if any(k in record for k in ((messages_field,) if messages_field else MESSAGES_FIELDS)):
        return "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "prompt" in record or "response" in record:
        return "prompt_response"
    listed = " or ".join(repr(k) for k in ((messages_field,) if messages_field else MESSAGES_FIELDS))
    raise BadRecord("missing_field", f"no {listed}, 'prompt'/'response' or 'instruction'/'output' fields "
                    f"(has: {', '.join(sorted(record)) or 'none'})")


def to_messages(record, fmt: str = "auto", messages_field: str | None = None) -> list[dict]:
    """The conversation a record holds, as a list of {role, content}; raises BadRecord. `messages_field` names the
    field holding the list of turns (default: messages, else conversations)."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    kind = detect_format(record, messages_field) if fmt == "auto" else fmt
    if kind == "prompt_response":
        messages = [{"role": "user", "content": text_field(record, "prompt")},
                    {"role": "assistant", "content": text_field(record, "response")}]
    elif kind == "alpaca":
        messages = _alpaca_messages(record)
    else:
        messages = _listed_messages(record, messages_field)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn", "the conversation has no assistant turn")
    if all(not m["content"].strip() for m in messages):
        raise BadRecord("empty_conversation", "every message is empty")
    return messages


def _alpaca_messages(record: dict) -> list[dict]:
    """instruction (+ input) as the user's turn, output as the assistant's."""
    instruction, extra = text_field(record, "instruction"), record.get("input") or ""
    if not isinstance(extra, str):
        raise BadRecord("wrong_type", f"field 'input' is {type(extra).__name__}, expected a string")
    return [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": text_field(record, "output")}]


def _listed_messages(record: dict, messages_field: str | None) -> list[dict]:
    """A record's own list of turns (under `messages_field`, else `messages` or `conversations`), each checked: a
    dict with a known role and string content, as {role, content} or ShareGPT's {from, value}."""
    key = messages_field or next((k for k in MESSAGES_FIELDS if k in record), MESSAGES_FIELDS[0])
    if key not in record:
        raise BadRecord("missing_field", f"missing field {key!r}")
    raw = record[key]
    if not isinstance(raw, list):
        raise BadRecord("wrong_type", f"field {key!r} is {type(raw).__name__}, expected a list")
    if not raw:
        raise BadRecord("empty_conversation", f"{key!r} is empty")
    return [_turn(m, f"{key}[{i}]") for i, m in enumerate(raw)]


def _turn(m, where: str) -> dict:
    """One turn as {role, content}: given so, or ShareGPT's {from, value} (human → user, gpt → assistant)."""
    if isinstance(m, dict) and "role" not in m and "from" in m and "value" in m:
        role, content, names = SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"], ("from", "value")
        known = ", ".join(SHAREGPT_ROLES)
    elif isinstance(m, dict) and "role" in m and "content" in m:
        role, content, names, known = m["role"], m["content"], ("role", "content"), ", ".join(ROLES)
    else:
        raise BadRecord("missing_field", f"{where} needs 'role' and 'content' (or ShareGPT's 'from' and 'value')")
    if role not in ROLES:
        raise BadRecord("unknown_role", f"{where} has unknown role {m[names[0]]!r} (one of: {known})")
    if not isinstance(content, str):
        raise BadRecord("wrong_type", f"{where}.{names[1]} is {type(content).__name__}, expected a string")
    if not content.isascii() and not encodable(content):
        raise BadRecord("lone_surrogate", f"{where}.{names[1]} holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                          "escape), not text")
    return {"role": role, "content": content}


def _raise_exception(message: str):
    raise TemplateError(message)


class ChatTemplate:
    """A Jinja chat template compiled as `transformers` compiles one (sandboxed, trim_blocks, lstrip_blocks,
    `raise_exception`, `strftime_now`, and the tokenizer's special tokens as variables)."""

    def __init__(self, source: str, special_tokens: dict[str, str | None] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise EmberError(f"the chat template does not compile: {exc}") from None
        self.source = source
        self.special = dict(special_tokens or {})

    @classmethod
    def of(cls, config: dict) -> "ChatTemplate | None":
        """The chat template of a tokenizer_config.json, with its special tokens as variables; None without one."""
        source = template_source(config)
        return cls(source, special_token_vars(config)) if source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, continue_final_message: bool = False,
               **variables) -> str:
        """The conversation as text; `variables` are the template's own switches (Qwen3's `enable_thinking`, ...),
        over the special-token variables, as `apply_chat_template(..., **kwargs)` passes them.

        `continue_final_message` ends the text inside the last message, so that generation continues it (a prefilled
        answer, or the harness's multiple-choice contexts), as transformers does it: the message is rendered with a
        tag after its content and the text cut at the tag (and its trailing spaces too, when the template strips
        the content)."""
        if continue_final_message:
            if add_generation_prompt:
                raise BadRecord("template_error", "continue_final_message and add_generation_prompt cannot both be "
                                "on: the first continues the last message, the second starts a new one")
            if not messages:
                raise BadRecord("template_error", "continue_final_message needs a message to continue")
            final = messages[-1]["content"]
            messages = [*messages[:-1], {**messages[-1], "content": final + CONTINUE_TAG}]
        try:
            text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **{**self.special, **variables})
        except TemplateError as exc:
            raise BadRecord("template_error", f"the chat template refused the conversation: {exc}") from None
        if not continue_final_message:
            return text
        at = text.rfind(CONTINUE_TAG.strip())
        if at < 0 or final.strip() not in text:
            raise BadRecord("template_error", "continue_final_message: the chat template does not write the last "
                            "message's content as it is, so the text cannot end inside it")
        return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()


def template_source(config: dict) -> str | None:
    """The chat template in a tokenizer_config.json (a string, or the 'default' of a list of named ones)."""
    value = config.get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    return value


def special_token_vars(config: dict) -> dict[str, str | None]:
    return {k: token_name(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def chat_tokenizer(tok: Tokenizer, config: dict) -> tuple[Tokenizer, dict, list[str]]:
    """The tokenizer and tokenizer_config for fine-tuning a model with this tokenizer: the model's own chat template
    when it has one; otherwise Ember's ChatML template, with its turn markers (and a pad token) added as special
    tokens when missing. Returns (tokenizer, config, added token names); new ids follow the old ones."""
    config = dict(config)
    added: list[str] = []
    if template_source(config) is None:
        config["chat_template"] = DEFAULT_CHAT_TEMPLATE
        missing = [t for t in (*CHAT_TOKENS, PAD_TOKEN) if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            added = missing
    if config.get("pad_token") is None and tok.token_to_id(PAD_TOKEN) is not None:
        config["pad_token"] = PAD_TOKEN
    return tok, config, added


class ChatEncoder:
    """Renders a conversation with the template and tokenizes it, with the loss mask (see the module doc)."""

    def __init__(self, tok: Tokenizer, template: ChatTemplate, train_on: str = "assistant",
                 variables: dict | None = None):
        self.tok, self.template, self.train_on = tok, template, train_on
        self.variables = dict(variables or {})
        self.special = sorted((t.content for t in tok.get_added_tokens_decoder().values() if t.special),
                              key=len, reverse=True)

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its assistant turns."""
        text = self.template.render(messages, **self.variables)
        try:
            return text, self._turn_spans(messages, text)
        except BadRecord:
            return text, self._content_spans(messages, text)

    def _turn_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """Each assistant turn as the template writes it (its header aside): what rendering the turn adds to the
        conversation before it with the generation prompt. Needs each prefix of the conversation to render as a
        prefix of the whole, which templates that move the system message to the last user turn (Mistral Nemo) or
        write earlier turns differently from the last (Qwen3's thinking blocks) do not."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.template.render(messages[:i], add_generation_prompt=True, **self.variables)
            through = self.template.render(messages[: i + 1], **self.variables)
            if not (through.startswith(before) and text.startswith(through)):
                raise BadRecord("template_error", "the chat template does not render the conversation's turns as "
                                "prefixes of each other")
            spans.append((len(before), len(through)))
        return spans

    def _content_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """For the other templates: each assistant message's content, found in order in the rendered text, with the
        special token the template writes right after it (its end-of-turn marker)."""
        spans, cursor = [], 0
        for m in messages:
            content = m["content"].strip() if m["role"] == "assistant" else ""
            if not content:
                continue
            start = text.find(content, cursor)
            if start < 0:
                raise BadRecord("template_error", "the chat template does not write an assistant turn's content "
                                "as it is, so its tokens cannot be located")
            end = start + len(content)
            end += len(next((t for t in self.special if text.startswith(t, end)), ""))
            spans.append((start, end))
            cursor = end
        return spans

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and the loss mask (uint8, 1 = a training target) of one conversation."""
        text, spans = self.spans(messages)
        enc = self.tok.encode(text, add_special_tokens=False)
        ids = np.array(enc.ids, dtype=np.int64)
        if self.train_on == "all":
            mask = np.ones(len(ids), dtype=np.uint8)
            mask[:1] = 0  # the first token has nothing before it
            return ids, mask
        starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=np.uint8)
        for lo, hi in spans:
            mask[(starts >= lo) & (starts < hi)] = 1
        return ids, mask


class SFTPacker:
    """Packs whole conversations into rows of `row_len`; a conversation never spans two rows. Returns completed rows
    as (ids, mask, segments) arrays; padding has id `pad_id`, mask 0 and segment 0."""

    def __init__(self, row_len: int, pad_id: int, pack: bool = True):
        self.row_len, self.pad_id, self.pack = row_len, pad_id, pack
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._used = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if len(ids) > self.row_len:
            raise ValueError(f"a conversation of {len(ids)} tokens does not fit a row of {self.row_len}")
        if self._parts and (not self.pack or self._used + len(ids) > self.row_len):
            self._close()
        self._parts.append((ids, mask))
        self._used += len(ids)

    def _close(self) -> None:
        ids = np.full(self.row_len, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.row_len, dtype=np.uint8)
        seg = np.zeros(self.row_len, dtype=np.uint16)
        at = 0
        for n, (i, m) in enumerate(self._parts, 1):
            ids[at: at + len(i)], mask[at: at + len(i)], seg[at: at + len(i)] = i, m, n
            at += len(i)
        self.rows.append((ids, mask, seg))
        self._parts, self._used = [], 0

    def finish(self) -> None:
        if self._parts:
            self._close()

    def take(self) -> dict[str, np.ndarray]:
        """The completed rows as columns (input_ids, loss_mask, segments), and forgets them."""
        rows, self.rows = self.rows, []
        if not rows:
            return {}
        return {"input_ids": np.stack([r[0] for r in rows]), "loss_mask": np.stack([r[1] for r in rows]),
                "segments": np.stack([r[2] for r in rows])}


def read_records(inputs: list[str], convert, what: str, limit: int | None = None) -> list[tuple[object, str]]:
    """(convert(record), file:line) of the first `limit` usable records of `inputs`, in the order read (evaluation's
    conversations and pairs); records `convert` refuses (`BadRecord`) are counted, logged and skipped."""
    source, skips = SourceSpec(inputs=inputs), SkipLog()
    reader, found = RecordReader(source, skips), []
    records = (item for unit in plan_units(resolve_inputs(source), source) for item in reader(unit))
    for record, where in records:
        if limit is not None and len(found) >= limit:
            break
        try:
            found.append((convert(record), str(where)))
        except BadRecord as bad:
            skips.skip(bad.reason, str(where), bad.detail)
    if skips.skipped:
        log.info("%s: skipped %s", what, ", ".join(f"{k} {v}" for k, v in skips.skipped.items()))
    if not found:
        raise EmberError(f"no usable {what} in {', '.join(inputs)}")
    return found
