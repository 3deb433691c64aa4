"""Generation: prefill, decoding with the KV cache, stop tokens and stop strings, and streaming text.

`decode_steps` drives a batch of prompts of different lengths through one KV cache and yields each step's new tokens;
`TextStream` turns one prompt into streamed text chunks, holding back only what might be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ember.errors import EmberError
from ember.model.llama import KVCache, Transformer
from ember.model.sampling import SamplingParams, make_generator, next_tokens, padded_history


def check_prompt(n_tokens: int, context: int) -> None:
    if n_tokens == 0:
        raise EmberError("empty prompt: give at least one token of text")
    if n_tokens >= context:
        raise EmberError(f"the prompt has {n_tokens} tokens; the model's context is {context} tokens "
                         f"(at most {context - 1} prompt tokens leave room for one new token)")


@torch.inference_mode()
def decode_steps(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                 stop_ids: set[int] = frozenset()) -> Iterator[list[int | None]]:
    """Yields, per decoding step, each row's new token (None once a row has stopped).

    A row stops at a stop token (not yielded) or after `max_new_tokens`; the context bounds both.
    """
    params.validate()
    context = model.config.max_position_embeddings
    for p in prompts:
        check_prompt(len(p), context)
    device = next(model.parameters()).device
    b = len(prompts)
    longest = max(len(p) for p in prompts)
    budget = min(params.max_new_tokens, context - longest)
    cache = KVCache(model.config, b, longest + budget, dtype=next(model.parameters()).dtype, device=device)
    tokens = torch.zeros(b, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    num_new = torch.tensor([len(p) for p in prompts], device=device)
    history = [list(p) for p in prompts]
    stops = set(stop_ids) | set(params.stop_token_ids)
    generator = make_generator(params.seed, device)
    active = [True] * b
    for _ in range(budget):
        logits = model(tokens, cache=cache, num_new=num_new, last_only=True)  # (B, V)
        seen = padded_history(history, device) if params.repetition_penalty != 1.0 else None
        chosen = next_tokens(logits, params, seen, generator).tolist()
        if -1 in chosen:
            raise EmberError("the model produced non-finite logits: its weights may be broken (NaN or infinite)")
        step: list[int | None] = []
        for i, token in enumerate(chosen):
            if active[i] and token in stops:
                active[i] = False
            step.append(token if active[i] else None)
            if active[i]:
                history[i].append(token)
        if not any(active):
            return
        yield step
        tokens = torch.tensor(chosen, device=device)[:, None]
        num_new = torch.ones(b, dtype=torch.long, device=device)


def generate_ids(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                 stop_ids: set[int] = frozenset()) -> list[list[int]]:
    """The new tokens of each prompt (stop tokens excluded)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode_steps(model, prompts, params, stop_ids):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
    return out


class StopStrings:
    """Finds stop strings in streamed text; holds back a tail that might be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        text = self.pending + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = max((self._partial(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """The length of the longest tail of `text` that `stop` starts with (and is shorter than it). Only tails
        beginning with the stop's first character are tried, so the scan is linear in the stop's length for text
        that does not repeat that character."""
        first = stop[0]
        for start in range(max(0, len(text) - len(stop) + 1), len(text)):
            if text[start] == first and stop.startswith(text[start:]):
                return len(text) - start
        return 0

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"  # "stop" (stop token or string) or "length" (max_new_tokens or context)


class TextStream:
    """Streams the text generated for one prompt; after iteration, `completion` holds the whole result.

    Detokenization is incremental and byte-safe: text is emitted only once the tokens so far decode to whole
    characters (a byte-level BPE token can end inside a UTF-8 sequence).
    """

    def __init__(self, model: Transformer, tokenizer, prompt: str, params: SamplingParams, stop_ids: set[int]):
        self.model, self.tokenizer, self.params, self.stop_ids = model, tokenizer, params.validate(), stop_ids
        self.prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        check_prompt(len(self.prompt_ids), model.config.max_position_embeddings)
        self.completion = Completion(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[str]:
        stops = StopStrings(self.params.stop)
        ids = self.completion.token_ids
        emitted = 0  # characters of decode(ids) already handed out (or held back by `stops`)
        steps = 0
        for step in decode_steps(self.model, [self.prompt_ids], self.params, self.stop_ids):
            ids.append(step[0])
            steps += 1
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):
                continue  # the last token ends inside a character: wait for the rest
            chunk, stopped = stops.feed(text[emitted:])
            emitted = len(text)
            if chunk:
                self.completion.text += chunk
                yield chunk
            if stopped:
                self.completion.finish_reason = "stop"
                return
        budget = min(self.params.max_new_tokens, self.model.config.max_position_embeddings - len(self.prompt_ids))
        self.completion.finish_reason = "length" if steps >= budget else "stop"
        rest, stopped = stops.feed(self.tokenizer.decode(ids)[emitted:])  # what was waiting for more bytes
        tail = rest if stopped else rest + stops.flush()
        if stopped:
            self.completion.finish_reason = "stop"
        if tail:
            self.completion.text += tail
            yield tail
