"""LoRA for Ember's Transformer, saved in PEFT's format for the family's layout (Llama, Qwen2, Qwen3 and Mistral
share the projection names).

Ember fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; an adapter on, say, ``q_proj`` is an adapter
on the q rows of the fused matrix. `LoraLinear` wraps one linear layer and keeps one (A, B) pair per targeted row
block, so an adapter is exactly PEFT's adapter for that Llama module: update = (alpha / r) · B · A on those rows.
(`peft` itself would adapt the fused matrix as one, which has no Llama-format equivalent; hence this small module.)
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ember import storage
from ember.config.specs import LoraSpec
from ember.model import ModelConfig, Transformer, fused_slices


def _blocks(parent_name: str, name: str, layer: nn.Linear, cfg: ModelConfig) -> list[tuple[str, slice]]:
    """(Llama name, rows) of each block of a linear layer's output: a fused projection's blocks as the model
    stacks them, any other layer as one block."""
    rows = fused_slices(cfg).get(f"{parent_name}.{name}")
    return list(rows.items()) if rows else [(name, slice(0, layer.out_features))]


class LoraLinear(nn.Module):
    """A frozen linear layer plus low-rank adapters on some of its row blocks."""

    def __init__(self, base: nn.Linear, blocks: list[tuple[str, slice]], targets: set[str], rank: int,
                 alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.blocks = blocks
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # off: the layer is its base (`adapters_disabled`)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, rows in blocks:
            if name in targets:
                a = torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT: B = 0, so training starts at the base
                self.lora_A[name] = nn.Parameter(a)
                b = torch.zeros(rows.stop - rows.start, rank, dtype=a.dtype, device=a.device)
                self.lora_B[name] = nn.Parameter(b)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        h = self.dropout(x)
        parts = []
        for name, rows in self.blocks:
            if name in self.lora_A:
                parts.append(F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scale)
            else:
                parts.append(y.new_zeros(*y.shape[:-1], rows.stop - rows.start))
        return y + (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0])

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapters added into its weight."""
        w = self.base.weight.detach().clone()
        for name, rows in self.blocks:
            if name in self.lora_A:
                w[rows] += (self.lora_B[name].float() @ self.lora_A[name].float()).to(w.dtype) * self.scale
        bias = self.base.bias
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        layer.weight.copy_(w)
        if bias is not None:  # Qwen2's q/k/v biases: LoRA leaves them as they are (PEFT's bias="none")
            layer.bias.copy_(bias)
        return layer


def _linears(model: Transformer):
    """(layer index, parent name, parent module, name, child) of every projection; the parent names (self_attn,
    mlp) are Llama's too."""
    for i, block in enumerate(model.layers):
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(block, parent_name)
            for name, child in list(parent.named_children()):
                yield i, parent_name, parent, name, child


def apply_lora(model: Transformer, spec: LoraSpec) -> list[nn.Parameter]:
    """Freezes every weight and wraps the targeted projections; returns the adapter parameters (the only ones that
    train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(spec.target_modules)
    for _, parent_name, parent, name, child in _linears(model):
        if not isinstance(child, nn.Linear):
            continue
        blocks = _blocks(parent_name, name, child, model.config)
        if targets & {b[0] for b in blocks}:
            setattr(parent, name, LoraLinear(child, blocks, targets, spec.rank, spec.alpha, spec.dropout))
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within it, the model is its base: every LoraLinear skips its adapters (preference tuning's reference with
    LoRA, as PEFT's `disable_adapter`, with no second copy of the model)."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(model: Transformer) -> Transformer:
    """Replaces every LoraLinear by its merged linear layer (in place); returns the model."""
    for _, _, parent, name, child in _linears(model):
        if isinstance(child, LoraLinear):
            setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names for a Llama model
    (base_model.model.model.layers.N.self_attn.q_proj.lora_A...)."""
    state = {}
    for i, parent_name, _, _, child in _linears(model):
        if not isinstance(child, LoraLinear):
            continue
        for name in child.lora_A:
            prefix = f"base_model.model.model.layers.{i}.{parent_name}.{name}"
            state[f"{prefix}.lora_A.weight"] = child.lora_A[name].detach().float().contiguous().cpu()
            state[f"{prefix}.lora_B.weight"] = child.lora_B[name].detach().float().contiguous().cpu()
    return state


def save_adapter(state: dict[str, torch.Tensor], spec: LoraSpec, base_dir: str, out: str | Path) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (PEFT's LoRA format) into `out` (a directory, or a
    bucket prefix: written locally, then uploaded, the config last)."""
    if storage.is_uri(out):
        with tempfile.TemporaryDirectory(prefix="ember-adapter-") as local:
            save_adapter(state, spec, base_dir, Path(local))
            storage.publish_dir(Path(local), out, marker="adapter_config.json")
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": storage.display(base_dir),
              "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
              "target_modules": sorted(spec.target_modules), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
              "alpha_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
