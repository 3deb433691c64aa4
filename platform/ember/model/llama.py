"""The Llama-architecture decoder-only Transformer that Ember trains and serves, with a KV cache for decoding.

Token embedding → N × [RMSNorm → grouped-query attention with rotary positions → residual, RMSNorm → SwiGLU MLP →
residual] → RMSNorm → output projection (optionally tied to the embedding). Names follow Hugging Face's
`LlamaForCausalLM` (less its `model.` prefix) except two fused projections, as vLLM fuses them: `qkv_proj` holds
q_proj, k_proj, v_proj stacked by rows, `gate_up_proj` holds gate_proj, up_proj. `fused_slices` is the one statement
of that layout: the model splits by it, `hf.py` splits and joins by it, LoRA (`ember.train.lora`) adapts row blocks
by it.

Shapes: B batch, T new tokens, S tokens attended to (cache), C hidden size, H query heads, K key/value heads,
D head dim, V vocabulary. This file imports neither Ray nor DeepSpeed.

Attention is `F.scaled_dot_product_attention` for causal rows. Rows that need a mask (packed segments, ragged KV
cache lengths) get FlexAttention with a block mask on CUDA, a fused kernel that skips the blocks the mask empties
instead of reading a dense B·T·S mask (which rules out flash attention there); on CPU, SDPA's flash kernel takes
the dense mask. `Transformer.attention` chooses ("auto", "sdpa" or "flex"); both give the same outputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

ROPE_TYPES = ("default", "llama3")
# Each family's fixed differences from Llama; "sliding_window": True where a window may be set.
FAMILIES: dict[str, dict] = {
    "llama": dict(qkv_bias=False, qk_norm=False),
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=False, qk_norm=True),
    "mistral": dict(qkv_bias=False, qk_norm=False, sliding_window=True),
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688  # SwiGLU width: about 8/3 × hidden, as Llama does
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # fewer than the query heads = grouped-query attention
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads; some Llama sizes set it apart from the hidden size
    max_position_embeddings: int = 2048  # the longest context the model is used at (KV cache and prompt limit)
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", "factor", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # share the embedding matrix with the output projection
    initializer_range: float = 0.02
    # What the open families change in Llama's layout (`FAMILIES`), as data:
    model_type: str = "llama"  # the Hugging Face family a model dir of this config is written as
    qkv_bias: bool = False  # a bias on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before the rotary embedding (Qwen3)
    sliding_window: int | None = None  # each query sees at most this many positions, itself included (Mistral)
    gradient_checkpointing: bool = field(default=False, compare=False)  # recompute activations in backward

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        problems = []
        family = FAMILIES.get(self.model_type)
        if family is None:
            problems.append(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}")
        else:
            problems += [f"{key} = {getattr(self, key)!r} is not what {self.model_type} models have ({want!r})"
                         for key, want in family.items() if key != "sliding_window" and getattr(self, key) != want]
            if self.sliding_window is not None and not family.get("sliding_window"):
                problems.append(f"sliding_window: {self.model_type} models attend to the whole context here")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or self.sliding_window < 1):
            problems.append(f"sliding_window ({self.sliding_window!r}) must be a positive number of positions")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_scaling.rope_type {rope_type!r} is not supported "
                            f"(supported: {', '.join(ROPE_TYPES)})")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "gradient_checkpointing"}


# Presets as data. Vocabulary size comes from the tokenizer unless a preset is used as is; the large shapes follow
# Llama 3.x (1B and 3B: Llama 3.2; 8B: Llama 3.1), the small ones are scaled-down relatives.
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True),
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=True),
    "350m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                 tie_word_embeddings=True),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
               rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True),
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
               rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
               rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with fields overridden (for example the tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


def num_parameters(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Parameter count; `embeddings=False` leaves out the input embedding (and a tied output projection)."""
    c, d = cfg.hidden_size, cfg.head_dim
    attn = c * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    attn += (cfg.qkv_bias * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d) + cfg.qk_norm * 2 * d
    mlp = 3 * c * cfg.intermediate_size
    body = cfg.num_hidden_layers * (attn + mlp + 2 * c) + c
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * c
    emb = cfg.vocab_size * c
    return body + head + (emb if embeddings else 0)


def fused_slices(cfg: ModelConfig) -> dict[str, dict[str, slice]]:
    """The layout of the fused projections: each fused weight, by its path in a block, → the Hugging Face Llama
    projections it stacks by rows, in stacking order, each with the rows (out_features) it occupies."""
    q, kv, i = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    return {"self_attn.qkv_proj": _stacked(q_proj=q, k_proj=kv, v_proj=kv),
            "mlp.gate_up_proj": _stacked(gate_proj=i, up_proj=i)}


def _stacked(**rows: int) -> dict[str, slice]:
    """Consecutive row ranges of the given sizes, in the order given."""
    out, start = {}, 0
    for name, size in rows.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def _sizes(rows: dict[str, slice]) -> list[int]:
    return [s.stop - s.start for s in rows.values()]


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 × matmul parameters + attention scores (PaLM, appendix B)."""
    matmul_params = num_parameters(cfg, embeddings=False) + (cfg.vocab_size * cfg.hidden_size
                                                             if cfg.tie_word_embeddings else 0)
    return 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # the statistic in fp32 whatever the compute dtype, as Llama does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with Llama 3.1's long-context scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", "default") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate(x, cos, sin):
    """Applies rotary embeddings (the half-split layout of HF Llama checkpoints). x (B, H, T, D), cos/sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values of every layer for a batch of sequences that may each hold a different number of tokens.

    Row b holds `lengths[b]` tokens; new tokens go to the positions after them. Padding written past a row's true
    length is never attended to (queries only see positions ≤ their own) and is overwritten by the next step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def write(self, layer: int, k, v, positions, span: int):
        """Stores k, v (B, K, T, D) at `positions` (B, T); returns this layer's first `span` positions."""
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        self.k[layer].scatter_(2, index, k)
        self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :span], self.v[layer, :, :, :span]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.h, self.kv, self.d = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # q, k and v projections in one matrix (rows: q, then k, then v): one larger matmul instead of three.
        self.qkv_sizes = _sizes(fused_slices(cfg)["self_attn.qkv_proj"])  # [H·D, K·D, K·D]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, positions, mask, span: int):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q, k = q.view(b, t, self.h, self.d), k.view(b, t, self.kv, self.d)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, K, T, D)
        v = v.view(b, t, self.kv, self.d).transpose(1, 2)
        q, k = rotate(q, cos, sin).to(v.dtype), rotate(k, cos, sin).to(v.dtype)
        if cache is not None:
            k, v = cache.write(self.layer, k, v, positions, span)  # (B, K, S, D)
        y = attend(q, k, v, mask, gqa=self.kv != self.h)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.h * self.d))


ATTENTION_KERNELS = ("auto", "sdpa", "flex")
_compiled_flex = None


def attend(q, k, v, mask, gqa: bool):
    """Attention of q (B, H, T, D) over k, v (B, K, S, D): causal without a mask, else under `mask`, a dense boolean
    (B, 1, T, S) for SDPA or a FlexAttention `BlockMask`. FlexAttention is compiled into its fused kernel on CUDA
    (once per process); on CPU, where Ember only takes it when asked, it is torch's unfused reference."""
    global _compiled_flex
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)


def uses_flex(kernel: str, device: torch.device, head_dim: int) -> bool:
    """Whether masked attention goes through FlexAttention: when asked, or by default on CUDA for the head sizes
    its kernel takes (a power of two, at least 16)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}")
    if kernel != "auto":
        return kernel == "flex"
    return device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_sizes = _sizes(fused_slices(cfg)["mlp.gate_up_proj"])  # rows: gate, then up
        self.gate_up_proj = nn.Linear(cfg.hidden_size, sum(self.gate_up_sizes), bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, positions, mask, span):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, mask, span)
        return x + self.mlp(self.post_attention_layernorm(x))


def _causal(row, head, i, j):
    return j <= i


class Transformer(nn.Module):
    attention = "auto"  # the kernel for masked attention: "auto" (FlexAttention on CUDA, SDPA on CPU), "sdpa", "flex"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(self._init)

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _attention_plan(self, tokens, cache: KVCache | None, segments):
        """Each token's position (B, T), the keys' span S, and the attention mask (None: plain causal): packed
        sequences restart their positions and see only themselves, cached rows continue from `cache.lengths`, and a
        sliding window leaves out keys further back than it."""
        b, t = tokens.shape
        device = tokens.device
        steps = torch.arange(t, device=device)
        allowed = mask = None  # allowed(row, head, query, key): whether the query attends to the key; None: causal
        if cache is None and segments is not None:
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values  # each token's start
            positions, span = steps - first, t

            def allowed(row, head, i, j):  # query i sees key j: earlier or itself, in its own sequence
                return (j <= i) & (segments[row, i] == segments[row, j])
        elif cache is None:
            positions, span = steps.expand(b, t), t
        else:
            positions = cache.lengths[:, None] + steps  # (B, T)
            span = int(positions.max()) + 1
            if span > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} positions; this step needs {span}")

            def allowed(row, head, i, j):  # new token i sees the cached and new positions up to its own
                return j <= positions[row, i]
        window = self.config.sliding_window
        if window is not None and window < span:  # the window leaves out keys some query would see
            inner = allowed or _causal

            def allowed(row, head, i, j):  # and no further back than the window (a cached row's query is at its
                query = positions[row, i] if cache is not None else i  # position; a row's index is comparable)
                return inner(row, head, i, j) & (query - j < window)
        rows = b if cache is not None or segments is not None else 1  # else one mask serves every row
        if allowed is not None and uses_flex(self.attention, device, self.config.head_dim):
            mask = create_block_mask(allowed, rows, None, t, span, device=device)
        elif allowed is not None:  # the same function over every (row, query, key) at once
            row = torch.arange(rows, device=device)[:, None, None, None]
            mask = allowed(row, 0, steps[:, None], torch.arange(span, device=device)[None, :])  # (B or 1, 1, T, S)
        return positions, span, mask

    def forward(self, tokens, cache: KVCache | None = None, num_new=None, last_only: bool = False, segments=None):
        """Logits (B, T, V), or (B, V) at each row's last new token with `last_only`.

        Without a cache: a causal forward over `tokens` (B, T) from position 0 (training). `segments` (B, T), for
        rows that pack several sequences, numbers the sequence each token belongs to: positions restart at 0 with
        each sequence and attention stays inside it, so a packed row computes what its sequences would alone.
        With a cache: the tokens continue each row from `cache.lengths`; `num_new` (B,) says how many of the T are
        real per row (the rest is right padding), and the cache advances by it.
        """
        b, t = tokens.shape
        device = tokens.device
        positions, span, mask = self._attention_plan(tokens, cache, segments)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2), in fp32 as HF does
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(tokens)  # (B, T, C)
        for block in self.layers:
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, cache, positions, mask, span, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, positions, mask, span)
        x = self.norm(x)
        if cache is not None:
            cache.lengths += num_new if num_new is not None else t
        if last_only:
            last = (num_new - 1) if num_new is not None else torch.full((b,), t - 1, device=device)
            x = x[torch.arange(b, device=device), last]  # (B, C)
        return self.lm_head(x).float()


def build_model(cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A randomly initialised model, built on the meta device and materialised once, on `device` and in `dtype` (the
    training precision): a GPU worker's weights never exist in host memory, and a 16-bit run never holds an fp32
    copy of the model. The weights are exactly `Transformer(cfg).to(dtype)`'s under the same seed: each module's own
    initialisation runs again in construction order, then the model's, in fp32 one module at a time."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gave the two modules separate tensors
        model.lm_head.weight = model.embed_tokens.weight
    leaves = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding, RMSNorm))]
    with torch.no_grad():
        for module in leaves:
            _in_fp32(module, module.reset_parameters if not isinstance(module, RMSNorm)
                     else lambda m=module: m.weight.fill_(1.0))
        for module in leaves:
            _in_fp32(module, lambda m=module: model._init(m))
        model.inv_freq = rope_frequencies(cfg).to(device)
    return model


def _in_fp32(module: nn.Module, init) -> None:
    """Runs `init` (which fills `module`'s own parameters) on fp32 stand-ins, then stores the result in the module's
    parameters in their dtype: the values fp32 initialisation then a cast give, with one module in fp32 at a time."""
    own = dict(module.named_parameters(recurse=False))
    if all(p.dtype == torch.float32 for p in own.values()):
        init()
        return
    for name, p in own.items():
        setattr(module, name, nn.Parameter(p.float()))  # what `init` leaves alone keeps its value
    init()
    for name, p in own.items():
        p.copy_(getattr(module, name))
        setattr(module, name, p)


@torch.no_grad()
def resize_vocab(model: Transformer, vocab_size: int) -> None:
    """Grows the embedding and output matrices to `vocab_size` rows (added tokens); new rows start at the mean of the
    old ones, so a new token's logit starts near the average instead of dominating."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
    if vocab_size == old:
        return
    emb = model.embed_tokens.weight
    grown = torch.cat([emb, emb.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    model.embed_tokens = nn.Embedding.from_pretrained(grown.clone(), freeze=False)
    if model.config.tie_word_embeddings:
        model.lm_head = nn.Linear(emb.shape[1], vocab_size, bias=False)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        head = model.lm_head.weight
        model.lm_head = nn.Linear(head.shape[1], vocab_size, bias=False, device=head.device, dtype=head.dtype)
        model.lm_head.weight.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)]))
    model.config.vocab_size = vocab_size
