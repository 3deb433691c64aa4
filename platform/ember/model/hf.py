"""Model directories in Hugging Face format, read and written without `transformers`, for the families Ember runs:
Llama, Qwen2 / Qwen2.5, Qwen3 and Mistral (`ember.model.llama.FAMILIES`; an exported dir is in its family's own
format, so `transformers` and vLLM load it as that family).

A model dir holds ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), ``model.safetensors`` (or shards
plus ``model.safetensors.index.json``), ``generation_config.json`` and the tokenizer files. Weights are read only from
safetensors, never from pickles. What Ember cannot run exactly (another model type, MLP or output biases, Qwen's
per-layer sliding windows, other RoPE scalings) is refused with the field and value named, as are missing,
unexpected and misshapen tensors.

A model dir is a location (`ember.storage`): a bucket prefix is read through the node cache (`local_model_dir`) and
written whole (`storage.publish_dir`): uploaded beside it, copied into place with `config.json` last, and only then
are the previous model's files the new one lacks removed, so a model there stays loadable while its successor
uploads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ember import storage
from ember.errors import EmberError
from ember.identity import files_fingerprint, path_stats
from ember.model import builtin
from ember.model.llama import FAMILIES, ROPE_TYPES, ModelConfig, Transformer, fused_slices, rope_frequencies

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _fused_weights(cfg: ModelConfig) -> dict[str, dict[str, slice]]:
    """Ember's fused tensors (name inside a block) → {HF tensor name inside a block: rows}, in stacking order: the
    weights, and the q/k/v biases of a family that has them."""
    out = {}
    for path, rows in fused_slices(cfg).items():
        parent = path.split(".")[0]  # self_attn or mlp: the same in both layouts
        out[f"{path}.weight"] = {f"{parent}.{name}.weight": r for name, r in rows.items()}
        if cfg.qkv_bias and parent == "self_attn":
            out[f"{path}.bias"] = {f"{parent}.{name}.bias": r for name, r in rows.items()}
    return out


def to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    """Ember's state dict → the family's HF tensor names (fused projections split; the tied head left out)."""
    fused = _fused_weights(cfg)
    out = {}
    for name, tensor in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        parts = name.split(".", 2)  # e.g. ["layers", "3", "self_attn.qkv_proj.weight"]
        if parts[0] == "layers" and parts[2] in fused:
            for hf_name, rows in fused[parts[2]].items():
                out[f"model.layers.{parts[1]}.{hf_name}"] = tensor[rows]
        else:
            out[name if name.startswith("lm_head.") else f"model.{name}"] = tensor
    return out


def from_hf_state(tensors: dict, cfg: ModelConfig) -> dict:
    """The family's HF tensors → Ember's state dict (fused projections joined)."""
    out = {}
    for name, tensor in tensors.items():
        out[name[len("model."):] if name.startswith("model.") else name] = tensor
    for layer in range(cfg.num_hidden_layers):
        for fused, parts in _fused_weights(cfg).items():
            pieces = [out.pop(f"layers.{layer}.{part}") for part in parts]  # stacking order: rows follow each other
            out[f"layers.{layer}.{fused}"] = torch.cat(pieces)
    return out


# Each family's config.json beyond the shared fields: its class, and the keys its readers expect.
_HF_FAMILY = {
    "llama": dict(architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False, pretraining_tp=1),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, sliding_window=None),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], attention_bias=False, use_sliding_window=False,
                  sliding_window=None),
    "mistral": dict(architectures=["MistralForCausalLM"]),
}
_EMBER_ONLY = ("qkv_bias", "qk_norm")  # implied by the family: not config.json keys


def hf_config(cfg: ModelConfig, *, dtype: torch.dtype, bos_token_id: int | None, eos_token_id) -> dict:
    """The config.json of a model dir, in the family's own format (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...)
    with legacy rope keys, which every reader of the family knows."""
    fields = {k: v for k, v in cfg.to_dict().items() if k not in _EMBER_ONLY}
    if cfg.model_type != "mistral":
        fields.pop("sliding_window")
    if cfg.model_type in ("qwen2", "qwen3"):  # as Qwen's own configs: every layer full attention
        fields.update(max_window_layers=cfg.num_hidden_layers, layer_types=["full_attention"] * cfg.num_hidden_layers)
    return {
        "model_type": cfg.model_type, "hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True,
        **_HF_FAMILY[cfg.model_type], **fields,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }


def config_from_hf(data: dict, where: str = "config.json") -> ModelConfig:
    """A ModelConfig from a config.json of a supported family (`FAMILIES`); anything Ember would not reproduce
    exactly is an error naming it."""
    def bad(field: str, value, why: str):
        raise EmberError(f"{where}: {field} = {value!r}: {why}")

    family = data.get("model_type")
    if family not in FAMILIES:
        bad("model_type", family, f"not supported (Ember runs {', '.join(repr(f) for f in FAMILIES)})")
    expected_arch = _HF_FAMILY[family]["architectures"][0]
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
    window = data.get("sliding_window") if family == "mistral" else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        bad("sliding_window", window, "must be a positive integer or null")
    for key in _REQUIRED:
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            bad(key, data.get(key), "missing or not an integer")
    rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    theta = rope.pop("rope_theta", None) or data.get("rope_theta", 10000.0)
    field = "rope_parameters" if data.get("rope_parameters") else "rope_scaling"
    if rope_type not in ROPE_TYPES:
        bad(f"{field}.rope_type", rope_type, f"not supported (supported: {', '.join(ROPE_TYPES)})")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rope]
        if missing:
            bad(field, data.get(field), f"llama3 scaling needs {', '.join(missing)}")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
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


def save_model(model: Transformer, model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int = 2 << 30, bos_token_id: int | None = None,
               eos_token_id=None) -> Path:
    """Writes a model dir in its family's format (atomically: a crash leaves the previous dir, or none, never half
    of one; in object storage, a dir is complete once its config.json, uploaded last, is there). `tokenizer_dir`
    may be a URI too."""
    return save_weights(model.state_dict(), model.config, model_dir, tokenizer_dir=tokenizer_dir,
                        dtype=dtype or next(model.parameters()).dtype, max_shard_bytes=max_shard_bytes,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def save_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, model_dir: str | os.PathLike, *,
                 tokenizer_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = 2 << 30, bos_token_id: int | None = None, eos_token_id=None,
                 files: dict[str, str] | None = None) -> Path:
    """`save_model` from a state dict in Ember's names (`Transformer.state_dict()`, or ZeRO-3's gathered one): no
    model object is needed, so an export from partitioned weights builds none. `files` (name → text) are written
    into the dir too (an import's tokenizer and lineage)."""
    if storage.is_uri(model_dir):
        with tempfile.TemporaryDirectory(prefix="ember-model-") as local:
            save_weights(state, cfg, Path(local) / "model", tokenizer_dir=tokenizer_dir, dtype=dtype,
                         max_shard_bytes=max_shard_bytes, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         files=files)
            storage.publish_dir(Path(local) / "model", model_dir, marker="config.json")
        return model_dir
    model_dir = Path(model_dir)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf_state(state, cfg).items()}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{model_dir.name}-", dir=model_dir.parent))
    try:
        _write_weights(tensors, staging, max_shard_bytes)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                try:
                    (staging / name).write_bytes(storage.read_bytes(storage.join(tokenizer_dir, name)))
                except FileNotFoundError:
                    continue
        for name, text in (files or {}).items():
            (staging / name).write_text(text)
        (staging / "config.json").write_text(json.dumps(
            hf_config(cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id), indent=2) + "\n")
        generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if model_dir.exists():
            old = model_dir.with_name(f".old-{model_dir.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(model_dir, old)
            os.replace(staging, model_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_dir


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")


def stop_token_ids(model_dir: str | os.PathLike, tokenizer) -> set[int]:
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
