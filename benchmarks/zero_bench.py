"""ZeRO's memory savings, measured: the same model trained a few steps on 2 workers at ZeRO 0, 1, 2, 3 and 3 with
offload, each worker's peak memory printed next to the ZeRO paper's estimate of its model states.

The estimate (Rajbhandari et al., 2020, §3 and §5) for Ψ parameters on N workers: parameters P·Ψ, gradients G·Ψ and
optimizer states K·Ψ bytes, with stage 1 dividing K by N, stage 2 G and K, stage 3 all three. In mixed precision (bf16
on GPUs) P = G = 2 and K = 12 (fp32 master weights, momentum, variance): 16Ψ in all. In fp32 (on CPU) P = G = 4; the
optimizer states are K = 8 at stage 0 (torch's AdamW: momentum and variance, the parameters being the master
weights) and K = 12 at stages 1-3 (DeepSpeed keeps an fp32 master partition beside them). With offload, the optimizer
states (and at stage 3 the parameters) move to host memory: on a GPU the device holds none of them; on CPU, where
the host is the device, nothing moves.

The measured peak is each worker's over the training steps, counted from when its engine is built (GPU: torch's
peak allocation; CPU: the process's peak resident set, which also holds the Python runtime, the libraries, the data
reader and the activations: compare the differences between stages, not the absolute figures). Run in one go:

    python benchmarks/zero_bench.py [--preset 125m] [--steps 3] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import torch

from ember.config import parse_spec
from ember.data.shards import load_manifest
from ember.model import num_parameters, preset

STAGES = [("ZeRO 0", {"zero_stage": 0}), ("ZeRO 1", {"zero_stage": 1}), ("ZeRO 2", {"zero_stage": 2}),
          ("ZeRO 3", {"zero_stage": 3}),
          ("ZeRO 3 + offload", {"zero_stage": 3, "offload_params": True, "offload_optimizer": True})]
GIB = 1 << 30


def model_states(params: int, stage: int, workers: int, gpu: bool, offload: bool) -> float:
    """The paper's bytes of model states per worker (see the module doc)."""
    p, g = (2, 2) if gpu else (4, 4)
    k = 12 if gpu or stage > 0 else 8
    if offload and gpu:  # optimizer states (and stage 3's parameters) live in host memory
        k, p = 0, (0 if stage == 3 else p)
    if stage >= 1:
        k /= workers
    if stage >= 2:
        g /= workers
    if stage >= 3:
        p /= workers
    return (p + g + k) * params


def tokenize(work: Path, vocab: int, seq_len: int) -> Path:
    from ember.data.pipeline import run_tokenize

    out = work / "data"
    run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": ["builtin:python-docs"]},
                             "tokenizer": {"vocab_size": vocab}, "pack": {"seq_len": seq_len},
                             "output": {"dir": str(out)}}))
    return out


def train(data: Path, run_dir: Path, model: dict, steps: int, stage: dict, gpu: bool) -> dict:
    from ember.train.pretrain import run_pretrain

    run_pretrain(parse_spec({
        "kind": "pretrain", "data": {"dir": str(data)}, "model": model,
        "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": steps, "lr": 1e-4, "log_every": 1,
                  "eval_every": 0, "checkpoint_every": 0},
        "deepspeed": {**stage, "precision": "bf16" if gpu else "fp32"},
        "scaling": {"workers": 2, "cpus_per_worker": 1, "use_gpu": gpu}, "output": {"dir": str(run_dir)}}))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"peak": [max(r["peak_memory_bytes"][i] for r in rows) for i in range(2)],
            "partitions": rows[0]["zero_partitions"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gpu", action="store_true", help="a GPU per worker, bf16 (needs 2 GPUs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(logging_level=logging.WARNING)
    logging.getLogger("ember").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="ember-zero-bench-"))
    data = tokenize(work, min(preset(args.preset).vocab_size, 8192), args.seq_len)
    model = {"preset": args.preset, "max_position_embeddings": args.seq_len}
    params = num_parameters(preset(args.preset, vocab_size=load_manifest(data)["vocab_size"]))
    print(f"machine: {platform.machine()}, torch {torch.__version__}{', GPU' if args.gpu else ', CPU'}; "
          f"model {args.preset}: Ψ = {params / 1e6:.1f}M parameters, {'bf16' if args.gpu else 'fp32'}, "
          f"2 workers, {args.steps} steps of 2 sequences of {args.seq_len}")
    print(f"{'':18} {'peak per worker (GiB)':>24} {'model states, paper (GiB)':>27} {'Δ vs ZeRO 0 measured':>22} "
          f"{'Δ paper':>9} {'params held per worker':>24}")
    base = None
    for name, stage in STAGES:
        got = train(data, work / name.replace(" ", "-").replace("+", "").lower(), model, args.steps, stage, args.gpu)
        estimate = model_states(params, stage["zero_stage"], 2, args.gpu, "offload_optimizer" in stage)
        peak = max(got["peak"])
        base = base or (peak, estimate)
        print(f"{name:18} {' / '.join(f'{p / GIB:.2f}' for p in got['peak']):>24} {estimate / GIB:>27.2f} "
              f"{(peak - base[0]) / GIB:>+22.2f} {(estimate - base[1]) / GIB:>+9.2f} "
              f"{' / '.join(f'{p / 1e6:.1f}M' for p in got['partitions']['params']):>24}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
