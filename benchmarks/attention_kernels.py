"""Which fused attention kernel torch gives each of the call shapes Ember's model makes, on this machine's device.

Ember's attention is one `F.scaled_dot_product_attention` call (`ember.model.llama`) in three shapes: causal training
rows (no mask), packed fine-tuning rows (a block-diagonal mask) and decoding with the KV cache (a mask over ragged
cache lengths); grouped-query attention throughout (`enable_gqa`). For each shape this tries each of torch's SDPA
backends alone and prints the ones that run, in the order torch tries them: the first is what the call gets. A
masked shape that gets only MATH materialises the full B·H·T·S scores. On CUDA the masked shapes go through
FlexAttention with a block mask instead (`Transformer.attention = "auto"`); for those this also times SDPA's dense
mask against compiled FlexAttention (milliseconds a call, after a warm-up).

    python benchmarks/attention_kernels.py [--cpu]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KNOWN = {b.value: b for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                               SDPBackend.CUDNN_ATTENTION)}


def backends() -> list[SDPBackend]:
    """torch's SDPA backends in the order it tries them (its own priority list)."""
    return [KNOWN[i] for i in torch._C._get_sdp_priority_order() if i in KNOWN]


def shapes(device: str, dtype: torch.dtype, seq: int = 2048, heads: int = 16, kv: int = 4, dim: int = 64):
    """(name, q, k, v, mask, is_causal) for each call shape, at a training/serving size."""
    def qkv(b, t, s):
        return (torch.randn(b, heads, t, dim, device=device, dtype=dtype),
                torch.randn(b, kv, s, dim, device=device, dtype=dtype),
                torch.randn(b, kv, s, dim, device=device, dtype=dtype))

    yield ("training rows (causal, no mask)", *qkv(4, seq, seq), None, True)
    segment = torch.arange(seq, device=device) // (seq // 4)  # 4 packed conversations per row
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    yield ("packed rows (block-diagonal mask)", *qkv(4, seq, seq), (same & causal)[None, None].expand(4, 1, -1, -1),
           False)
    lengths = torch.tensor([17, 900, 2047, 300], device=device)  # ragged cache lengths
    ragged = torch.arange(seq, device=device)[None, :] < lengths[:, None]
    yield ("decode with KV cache (ragged mask)", *qkv(4, 1, seq), ragged[:, None, None, :], False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="probe the CPU kernels (the default needs CUDA)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA: torch sees no GPU (probe the CPU kernels with --cpu)", file=sys.stderr)
        return 1
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"attention kernels on {name}, torch {torch.__version__}, {dtype}:")
    for label, q, k, v, mask, causal in shapes(device, dtype):
        runs = []
        for backend in backends():
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
                runs.append(backend.name)
            except RuntimeError:
                pass
        print(f"  {label:<38} gets {runs[0] if runs else 'nothing'}   (runs: {', '.join(runs) or 'none'})")
        if mask is not None and device == "cuda":
            dense_ms, flex_ms = time_masked(q, k, v, mask)
            print(f"  {'':<38} Ember takes FLEX: dense-mask SDPA {dense_ms:.2f} ms, FlexAttention {flex_ms:.2f} ms "
                  f"({dense_ms / flex_ms:.2f}x)")
    return 0


def time_masked(q, k, v, mask) -> tuple[float, float]:
    """Milliseconds a call of SDPA with the dense mask and of compiled FlexAttention with the same mask as blocks."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dense = mask.expand(q.shape[0], 1, q.shape[2], k.shape[2])
    block = create_block_mask(lambda b, h, i, j: dense[b, 0, i, j], q.shape[0], None, q.shape[2], k.shape[2],
                              device=q.device)
    flex = torch.compile(flex_attention)
    calls = {"dense": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
             "flex": lambda: flex(q, k, v, block_mask=block, enable_gqa=True)}
    times = []
    for call in calls.values():
        for _ in range(3):
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return times[0], times[1]


if __name__ == "__main__":
    sys.exit(main())
