"""The Hugging Face model-dir format, and writing it: tensor names (the family's, from and to Ember's fused layout),
each family's config.json, safetensors shards, and the atomic write of a whole model dir. Reading one is
`ember.model.hf`'s; this module sits below it and below the GGUF importer, which writes model dirs through it.

A model dir in object storage is written whole (`storage.publish_dir`): uploaded beside it, copied into place with
`config.json` last, and only then are the previous model's files the new one lacks removed, so a model there stays
loadable while its successor uploads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember import storage
from ember.model.llama import ModelConfig, Transformer, fused_slices

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
HF_FAMILY = {
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
        **HF_FAMILY[cfg.model_type], **fields,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
    }


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
