"""Model directories in Hugging Face format, found and read without `transformers`, for the families Ember runs:
Llama, Qwen2 / Qwen2.5, Qwen3 and Mistral (`ember.model.llama.FAMILIES`; an exported dir is in its family's own
format, so `transformers` and vLLM load it as that family).

A model dir holds ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), ``model.safetensors`` (or shards
plus ``model.safetensors.index.json``), ``generation_config.json`` and the tokenizer files. Weights are read only from
safetensors, never from pickles. What Ember cannot run exactly (another model type, MLP or output biases, Qwen's
per-layer sliding windows, other RoPE scalings) is refused with the field and value named, as are missing,
unexpected and misshapen tensors.

A model dir is a location (`ember.storage`): a bucket prefix is read through the node cache (`local_model_dir`), a
built-in model (`builtin:NAME`) is imported on the node first. The format's tensor names and config.json, and writing
a model dir, are `ember.model.hf_format`'s. The token ids that end a generation are `generation_stops`'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ember import storage
from ember.data.tokenizer import TURN_END
from ember.errors import EmberError
from ember.identity import files_fingerprint, path_stats
from ember.model import builtin
from ember.model.hf_format import HF_FAMILY, INDEX, WEIGHTS, from_hf_state, to_hf_state
from ember.model.llama import FAMILIES, ROPE_TYPES, ModelConfig, Transformer, rope_frequencies

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(data: dict, where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a config.json of a supported family (`FAMILIES`); anything Ember would not reproduce
    exactly is an error naming it."""
    def bad(field: str, value, why: str):
        raise EmberError(f"{where}: {field} = {value!r}: {why}")

    family = _checked_family(data, bad)
    window = data.get("sliding_window") if family == "mistral" else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        bad("sliding_window", window, "must be a positive integer or null")
    for key in _REQUIRED:
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            bad(key, data.get(key), "missing or not an integer")
    theta, scaling = _rope(data, bad)
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data.get("num_key_value_heads") or data["num_attention_heads"],
            head_dim=data.get("head_dim") or 0, max_position_embeddings=data.get("max_position_embeddings", 2048),
            rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            initializer_range=data.get("initializer_range", 0.02), model_type=family,
            sliding_window=window, **{k: v for k, v in FAMILIES[family].items() if k != "sliding_window"})
    except (ValueError, TypeError) as exc:
        raise EmberError(f"{where}: {exc}") from None


def _checked_family(data: dict, bad) -> str:
    """The config's family (model_type), once its architecture and the layout flags the family fixes are its own."""
    family = data.get("model_type")
    if family not in FAMILIES:
        bad("model_type", family, f"not supported (Ember runs {', '.join(repr(f) for f in FAMILIES)})")
    expected_arch = HF_FAMILY[family]["architectures"][0]
    archs = data.get("architectures") or [expected_arch]
    if expected_arch not in archs:
        bad("architectures", archs, f"expected {expected_arch} for model_type {family!r}")
    rules = [("mlp_bias", False), ("hidden_act", "silu")]
    rules += [("attention_bias", False)] if family != "qwen2" else []  # Qwen2's q/k/v biases are its layout
    rules += [("use_sliding_window", False)] if family in ("qwen2", "qwen3") else []
    rules += [("sliding_window", None)] if family == "llama" else []
    for key, expected in rules:
        if data.get(key) is not None and data[key] != expected:
            bad(key, data[key], f"not supported ({family} models here use {expected!r})")
    layer_types = sorted({t for t in data.get("layer_types") or [] if t != "full_attention"})
    if layer_types:
        bad("layer_types", layer_types, "only full_attention layers are supported")
    return family


def _rope(data: dict, bad) -> tuple[float, dict | None]:
    """RoPE's base and scaling (rope_parameters, or the older rope_scaling + rope_theta); a type Ember does not
    compute is an error."""
    rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    theta = rope.pop("rope_theta", None) or data.get("rope_theta", 10000.0)
    field = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    if rope_type not in ROPE_TYPES:
        bad(f"{field}.rope_type", rope_type, f"not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type != "llama3":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        bad(field, data.get(field), f"llama3 scaling needs {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: rope[k] for k in keys}}


def bos_token_id(config: dict) -> int | None:
    """A config.json's beginning-of-text token id, when it names one (an int)."""
    bos = config.get("bos_token_id")
    return bos if isinstance(bos, int) and not isinstance(bos, bool) else None


def read_json(path: str | os.PathLike) -> dict:
    """A model dir's JSON file (a local path or a URI)."""
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise EmberError(f"not a model directory (no {storage.name(path)}): {storage.display(storage.parent(path))}") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmberError(f"{storage.display(path)}: not valid JSON ({exc})") from None


def local_model_dir(model_dir: str | os.PathLike) -> Path:
    """A model dir this process can open: a local one as it is, one in object storage through the node cache, a
    built-in model (`builtin:NAME`) imported on this node."""
    if builtin.is_builtin(model_dir):
        return builtin.model_dir(str(model_dir)[len(builtin.PREFIX):])
    try:
        local = storage.local_dir(model_dir)
    except FileNotFoundError:
        local = None
    if local is None or not local.is_dir():
        raise EmberError(f"model directory not found: {storage.display(storage.normalize(model_dir))}")
    return local


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    if (model_dir / INDEX).is_file():
        index = read_json(model_dir / INDEX)
        return {name: model_dir / storage.relative_key(str(file), model_dir / INDEX)
                for name, file in index.get("weight_map", {}).items()}
    if (model_dir / WEIGHTS).is_file():
        with safe_open(model_dir / WEIGHTS, framework="pt") as f:
            return {name: model_dir / WEIGHTS for name in f.keys()}
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt*"))
    hint = (f" (found {', '.join(pickles)}: Ember never unpickles weights; convert them to safetensors)"
            if pickles else "")
    raise EmberError(f"{model_dir}: no {WEIGHTS} or {INDEX}{hint}")


def load_model(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """Builds the model a model dir of a supported family describes and loads its safetensors weights (sharded or
    not)."""
    model_dir = local_model_dir(model_dir)
    cfg = config_from_hf(read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    files = _weight_files(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = to_hf_state(model.state_dict(), cfg)  # meta tensors: names and shapes only
    ignored = {n for n in files
               if n.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and n == "lm_head.weight")}
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - ignored)
    if missing or unexpected:
        def listed(what: str, names: list[str]) -> list[str]:
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            return [f"{what}: {', '.join(names[:5])}{more}"] if names else []

        parts = listed("missing tensors", missing) + listed("unexpected tensors", unexpected)
        raise EmberError(f"{model_dir}: weights do not match config.json: {'; '.join(parts)}")
    state = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise EmberError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                     f"{tuple(expected[name].shape)}")
                state[name] = tensor.to(dtype)
    model.load_state_dict(from_hf_state(state, cfg), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg).to(device)
    return model.eval()


def generation_stops(tokenizer, *, chat: bool, model_dir: str | os.PathLike | None = None,
                     eos_ids: Iterable[int] = ()) -> set[int]:
    """The token ids that end a generation, by one rule for every caller (the command, evaluation, the harness, the
    generation_config.json a fine-tuned model is exported with): the end-of-text ids (`eos_ids`, and those `model_dir`
    names) and, for an answer in a chat (`chat`), ChatML's end of turn where the tokenizer has it."""
    ids = set(eos_ids) | (_end_of_text_ids(model_dir, tokenizer) if model_dir is not None else set())
    if chat and tokenizer.token_to_id(TURN_END) is not None:
        ids.add(tokenizer.token_to_id(TURN_END))
    return ids


def _end_of_text_ids(model_dir: str | os.PathLike, tokenizer) -> set[int]:
    """End-of-text ids: generation_config.json's eos_token_id (an id or a list) and tokenizer_config's eos_token."""
    model_dir = local_model_dir(model_dir)
    ids: set[int] = set()
    if (model_dir / "generation_config.json").is_file():
        eos = read_json(model_dir / "generation_config.json").get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)])
    if (model_dir / "tokenizer_config.json").is_file():
        eos = read_json(model_dir / "tokenizer_config.json").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
            ids.add(tokenizer.token_to_id(eos))
    return ids


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """The fingerprint of a model dir's weight files (names, sizes and modification times; in object storage as the
    store lists them)."""
    if not storage.is_uri(model_dir):
        return files_fingerprint(path_stats(sorted(Path(model_dir).resolve().glob("model*.safetensors*"))))
    return files_fingerprint(storage.file_stats(model_dir, prefix="model", contains=".safetensors"))
