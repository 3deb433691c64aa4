"""GGUF import: a llama.cpp ``.gguf`` file → a model dir of its family (`ember.model.hf`), as `ember import` runs it.

What a GGUF holds, and what the import does with it (llama.cpp's ``convert_hf_to_gguf.py`` undone):

- **Metadata** (``general.architecture`` and ``{arch}.*`` keys) → the family's ``config.json``: ``llama``, ``qwen2``,
  ``qwen3``, and ``llama`` files whose ``general.name`` says Mistral as ``mistral`` (llama.cpp writes Mistral under
  Llama's architecture). Any other architecture, or RoPE scaling Ember would not reproduce, is refused by name.
- **Tensors** (``token_embd``, ``blk.N.attn_q``, …; shapes in ggml order, innermost first) → the family's HF names,
  each dequantized by llama.cpp's own reader (the ``gguf`` package) to float32 and checked against the shape the
  metadata implies. Llama's Q and K rows were permuted for llama.cpp's rotary layout; the import permutes them back
  (`unpermute_rows`). Qwen's are stored as they are.
- **Tokenizer** (``tokenizer.ggml.*``) → ``tokenizer.json`` built with the ``tokenizers`` library: the byte-level
  BPE vocabulary and merges, the pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` (`PRE_TOKENIZERS`), control
  tokens as special tokens; ``tokenizer_config.json`` with the special tokens and ``tokenizer.chat_template``.
- **Lineage**: ``lineage.json`` records the file's name, size, SHA-256 and quantization, and the import's identity.

Everything is read and checked before anything is written, and the model dir is written whole
(`ember.model.hf_format.save_weights`): a truncated file, a wrong magic, or a tensor that disagrees with the metadata
is one `EmberError` and leaves nothing at the output. Imports neither Ray nor DeepSpeed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ember import storage
from ember.errors import EmberError
from ember.identity import identity_of
from ember.model.hf_format import DTYPES, from_hf_state, save_weights, to_hf_state
from ember.model.llama import FAMILIES, ModelConfig, Transformer

IMPORT_FORMAT = 1  # bump when the same file would import to different bytes
LINEAGE = "lineage.json"
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # general.architecture values; Mistral arrives as llama

# The tensor types the import dequantizes (every one through gguf.quants.dequantize, llama.cpp's reference code).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")

# A GGUF tensor name inside a block → the HF name inside `model.layers.N.`.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizer for each `tokenizer.ggml.pre` (llama-vocab.cpp): how text is split before the merges.
_GPT2_SPLIT = None  # the ByteLevel pre-tokenizer's own GPT-2 pattern
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = "digits"  # each digit alone, then GPT-2's pattern (SmolLM's and StarCoder's tokenizer.json)
PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT,
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass
class GGUFModel:
    """What a GGUF file holds, read and checked: the config, the weights in HF names, and the tokenizer."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names, float32
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_config: dict
    bos_token_id: int | None
    eos_token_id: int | None
    lineage: dict


def read_gguf(path: str | os.PathLike):
    """llama.cpp's reader over a local file; a missing, truncated or foreign file is an EmberError naming it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EmberError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except ValueError as exc:
        why = "not a GGUF file (wrong magic)" if "magic" in str(exc) else f"not a readable GGUF file ({exc})"
        raise EmberError(f"{path}: {why}") from None
    except (IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
        raise EmberError(f"{path}: truncated or corrupt GGUF file ({type(exc).__name__}: {exc})") from None


def metadata(reader) -> dict:
    """The file's key/value metadata as plain Python values (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _family(meta: dict, where: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise EmberError(f"{where}: general.architecture = {arch!r}: not supported (Ember imports "
                         f"{', '.join(ARCHITECTURES)}; Mistral files are llama)")
    named = f"{meta.get('general.name') or ''} {meta.get('general.basename') or ''}".lower()
    return "mistral" if arch == "llama" and "mistral" in named else arch


def config_from_gguf(meta: dict, tensor_names: set[str], where: str) -> ModelConfig:
    """The ModelConfig a GGUF's metadata describes; a missing key or scaling Ember does not run is an error."""
    arch = meta.get("general.architecture")
    family = _family(meta, where)

    def key(name: str, default=None, required: bool = True):
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise EmberError(f"{where}: metadata {arch}.{name} is missing")
        return value

    scaling = key("rope.scaling.type", "none", required=False)
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise EmberError(f"{where}: {arch}.rope.scaling.type = {scaling!r}"
                         f"{' (with rope_freqs)' if 'rope_freqs.weight' in tensor_names else ''}: scaled RoPE is not "
                         "supported by the import")
    blocks = {n.split(".")[1] for n in tensor_names if n.startswith("blk.")}
    if key("block_count") != len(blocks):  # before a model of that many layers is laid out, even on meta
        raise EmberError(f"{where}: metadata {arch}.block_count = {key('block_count')!r}, the file has tensors for "
                         f"{len(blocks)} blocks")
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", None, required=False) or key("rope.dimension_count", None, required=False)
    vocab = key("vocab_size", None, required=False) or len(meta.get("tokenizer.ggml.tokens") or [])
    try:
        return ModelConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"), num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads), head_dim=head_dim or 0,
            max_position_embeddings=key("context_length", 2048), rope_theta=float(key("rope.freq_base", 10000.0)),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings="output.weight" not in tensor_names, model_type=family,
            sliding_window=key("attention.sliding_window", None, required=False) if family == "mistral" else None,
            **{k: v for k, v in FAMILIES[family].items() if k != "sliding_window"})
    except (ValueError, TypeError) as exc:
        raise EmberError(f"{where}: the metadata describes no model Ember runs: {exc}") from None


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for a name outside the layout."""
    base, dot, kind = gguf_name.rpartition(".")
    if not dot or kind not in ("weight", "bias"):
        return None
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's `permute` of a Q or K projection (weight rows or bias): within each head, llama.cpp
    interleaves the two rotary halves; HF keeps them as two halves. (heads·head_dim, ...) → the same shape."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized to float32 under its HF name, checked against the config's names and shapes."""
    from gguf.quants import dequantize

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in to_hf_state(Transformer(cfg).state_dict(), cfg).items()}
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise EmberError(f"{where}: tensor {t.name} is not part of a {cfg.model_type} model of this config")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the innermost dimension first
        if shape != expected[name]:
            raise EmberError(f"{where}: tensor {t.name} has shape {shape}, the metadata implies {expected[name]}")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise EmberError(f"{where}: tensor {t.name} is {t.tensor_type.name}: not a supported type "
                             f"({', '.join(SUPPORTED_TYPES)})")
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, IndexError) as exc:  # a data region cut short by a truncated file
            raise EmberError(f"{where}: tensor {t.name}: truncated or corrupt data ({exc})") from None
        if not np.isfinite(w).all():
            raise EmberError(f"{where}: tensor {t.name} holds {int((~np.isfinite(w)).sum())} NaN or infinite values")
        if cfg.model_type in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        out[name] = torch.from_numpy(np.array(w))  # a copy: F32 data is a read-only view of the file
    missing = sorted(set(expected) - set(out))
    if missing:
        raise EmberError(f"{where}: tensors missing for this config: {', '.join(missing[:5])}"
                         f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
    return out


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table, the spelling of every token of a byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def build_tokenizer(meta: dict, where: str):
    """The `tokenizers.Tokenizer` a GGUF's vocabulary describes: llama.cpp's byte-level BPE (`tokenizer.ggml.model`
    gpt2) with its pre-tokenizer and the control tokens as special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise EmberError(f"{where}: tokenizer.ggml.model = {kind!r}: not supported (Ember imports byte-level BPE "
                         "vocabularies, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise EmberError(f"{where}: tokenizer.ggml.pre = {pre!r}: unknown pre-tokenizer (known: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))})")
    tokens, merges = meta.get("tokenizer.ggml.tokens") or [], meta.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        raise EmberError(f"{where}: the file has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                               byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (_GPT2_SPLIT, _DIGITS_THEN_GPT2))
    if split == _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind_ in zip(tokens, types) if kind_ == _CONTROL and set(t) <= spelled]
    plain = [AddedToken(t, special=False, normalized=False)
             for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json: the special tokens by name, BOS/EOS flags, the chat template, the context."""
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos_token_id"),
              "eos_token": token("eos_token_id"), "unk_token": token("unknown_token_id"),
              "pad_token": token("padding_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False,
              "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length", 2048)}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def describe_source(path: Path, reader, meta: dict, name: str | None = None) -> dict:
    """The lineage of an import: the file (name, size, SHA-256) and its quantization."""
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"format": "gguf", "file": name or path.name, "bytes": path.stat().st_size,
            "sha256": storage.file_sha256(path), "quantization": types.most_common(1)[0][0] if types else None,
            "tensor_types": dict(sorted(types.items())), "general.name": meta.get("general.name"),
            "general.architecture": meta.get("general.architecture")}


def load_gguf(path: str | os.PathLike, name: str | None = None) -> GGUFModel:
    """Reads and checks a whole GGUF file (a local one; `name`: the file's own name, where it is a cached copy):
    config, dequantized weights, tokenizer, lineage."""
    path = Path(path)
    reader = read_gguf(path)
    where = str(path)
    meta = metadata(reader)
    cfg = config_from_gguf(meta, {t.name for t in reader.tensors}, where)
    tensors = read_tensors(reader, cfg, where)
    tok = build_tokenizer(meta, where)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise EmberError(f"{where}: the tokenizer has {tok.get_vocab_size()} tokens, the model {cfg.vocab_size}")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) else None

    return GGUFModel(cfg, tensors, tok, tokenizer_config(meta), token_id("bos_token_id"), token_id("eos_token_id"),
                     describe_source(path, reader, meta, name))


def import_identity(sha256: str, dtype: str) -> str:
    """What an imported dir is the result of: the file's bytes (their SHA-256), the dtype, the import's format."""
    return identity_of(["gguf-import", IMPORT_FORMAT, sha256, dtype])


def import_gguf(path: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "float32") -> dict:
    """`ember import`: writes the model dir a GGUF file describes at `output` (a path or a URI) and returns its
    lineage record. Nothing is written unless the whole file reads and checks."""
    if dtype not in DTYPES:
        raise EmberError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    name = storage.name(path)
    if storage.is_uri(path):
        try:
            path = storage.NodeCache().fetch(path).path
        except FileNotFoundError:
            raise EmberError(f"{storage.display(path)}: no such GGUF file") from None
    model = load_gguf(path, name)
    lineage = {"source": model.lineage, "dtype": dtype, "identity": import_identity(model.lineage["sha256"], dtype)}
    files = {"tokenizer.json": model.tokenizer.to_str(),
             "tokenizer_config.json": json.dumps(model.tokenizer_config, indent=2, sort_keys=True) + "\n",
             LINEAGE: json.dumps(lineage, indent=2, sort_keys=True) + "\n"}
    save_weights(from_hf_state(model.tensors, model.config), model.config, output, files=files,
                 dtype=DTYPES[dtype], bos_token_id=model.bos_token_id, eos_token_id=model.eos_token_id)
    return lineage
