"""Train, load and save byte-level BPE tokenizers in Hugging Face format (`tokenizer.json`, `tokenizer_config.json`).

A trained tokenizer carries Ember's special tokens: ``<|endoftext|>`` (joins documents in packed rows, and ends
generation), ``<|pad|>``, and the ChatML turn markers ``<|im_start|>`` / ``<|im_end|>`` that fine-tuning's default
chat template uses.

Paths here are locations (`ember.storage`): a local path or a URI of object storage.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ember import storage
from ember.errors import EmberError
from ember.identity import content_sha256

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TURN_END = CHAT_TOKENS[1]  # ends every turn in ChatML: an assistant turn's generation stops there (generation_stops)
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS)
# End-of-text names used by other families, tried when a loaded tokenizer has no tokenizer_config.json.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")

# ChatML, as `transformers` renders it; fine-tuning uses a base model's own template when it has one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(docs: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style pre-tokenization) with Ember's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def tokenizer_file(path: str | os.PathLike) -> str:
    """The tokenizer.json named by a location that is the file itself or a directory holding it."""
    location = storage.normalize(path)
    if storage.is_dir(location):
        location = storage.join(location, "tokenizer.json")
    if not storage.is_file(location):
        raise EmberError(f"tokenizer not found: {storage.display(location)}")
    return location


def tokenizer_identity(path: str | os.PathLike) -> str:
    """What a tokenizer is, for identities and manifests: the SHA-256 of its tokenizer.json's bytes (the file named
    by `path`, or the one in that directory). Every dataset job identifies its tokenizer so."""
    return content_sha256(tokenizer_file(path))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a `tokenizer.json` (or the one in a directory); fails with the path when it is missing or invalid."""
    location = tokenizer_file(path)
    try:
        return Tokenizer.from_str(storage.read_text(location))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception for malformed files)
        raise EmberError(f"{storage.display(location)}: not a valid tokenizer.json ({exc})") from None


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_config(path: str | os.PathLike) -> dict:
    """The `tokenizer_config.json` beside a tokenizer.json, or {} when there is none; a `chat_template.jinja` beside
    it (where `transformers` 4.43+ saves the template) is its `chat_template`."""
    directory = storage.parent(tokenizer_file(path))
    cfg = storage.join(directory, "tokenizer_config.json")
    try:
        config = json.loads(storage.read_bytes(cfg))
    except FileNotFoundError:
        config = {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmberError(f"{storage.display(cfg)}: not valid JSON ({exc})") from None
    if not config.get("chat_template"):
        try:
            config["chat_template"] = storage.read_bytes(storage.join(directory, CHAT_TEMPLATE_FILE)).decode()
        except FileNotFoundError:
            pass
        except UnicodeDecodeError as exc:
            raise EmberError(f"{storage.display(storage.join(directory, CHAT_TEMPLATE_FILE))}: not UTF-8 ({exc})") \
                from None
    return config


def token_name(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def eos_token(tok: Tokenizer, config: dict | None = None) -> tuple[str, int]:
    """The end-of-text token and its id: from tokenizer_config.json when given, else a well-known name."""
    names = [token_name((config or {}).get("eos_token"))] + list(_EOS_CANDIDATES)
    for name in names:
        if name and tok.token_to_id(name) is not None:
            return name, tok.token_to_id(name)
    raise EmberError(f"the tokenizer has no end-of-text token (looked for: {', '.join(n for n in names if n)})")


def write_tokenizer_config(tok: Tokenizer, directory: str | os.PathLike, *, model_max_length: int,
                           base_config: dict | None = None) -> None:
    """Writes tokenizer_config.json: the base model's settings when given, Ember's defaults for what is missing."""
    eos, _ = eos_token(tok, base_config)
    config = dict(base_config or {})
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config.setdefault("eos_token", eos)
    config.setdefault("bos_token", None)
    config.setdefault("unk_token", None)
    if tok.token_to_id(PAD_TOKEN) is not None:
        config.setdefault("pad_token", PAD_TOKEN)
    if all(tok.token_to_id(t) is not None for t in CHAT_TOKENS):
        config.setdefault("chat_template", DEFAULT_CHAT_TEMPLATE)
    config.setdefault("clean_up_tokenization_spaces", False)
    config["model_max_length"] = model_max_length
    storage.write_text(storage.join(directory, "tokenizer_config.json"),
                       json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike, *, model_max_length: int,
                   base_config: dict | None = None) -> str:
    """Writes tokenizer.json and tokenizer_config.json (HF format) into `directory`; returns the tokenizer.json
    location."""
    target = storage.join(directory, "tokenizer.json")
    storage.write_text(target, tok.to_str())
    write_tokenizer_config(tok, directory, model_max_length=model_max_length, base_config=base_config)
    return target
