"""Preference tuning (DPO) throughput and memory on the real model, SmolLM2-135M-Instruct, with LoRA (rank 16 on all
seven projections), on builtin:python-prefs's held-out pairs (326 pairs in rows of 192 tokens, chosen and rejected:
few enough for the full run's reference pass to take minutes on 2 cores), fp32:

(a) plain PyTorch + PEFT, 1 process: transformers' LlamaForCausalLM from the same model dir, `peft.get_peft_model`
    with the same adapters, AdamW over them, the same pair rows; the reference is the base with PEFT's adapters
    disabled (`disable_adapter()`, no gradient), the loss DPO's (sigmoid, beta 0.1), as TRL computes it;
(b) Ember `kind: preference`, method lora, 1 worker with all the CPUs, ZeRO 0: the same loss on the same rows;
(c) Ember, method full, 1 worker, ZeRO 0: every weight trains, against reference log-probabilities computed once
    before training (a Ray Data pass), so the worker never holds a second model.

Tokens/s count both sides of every pair and exclude start-up ((a) times steps after a warm-up, (b) and (c) average
the `tokens_per_s` the worker logs, leaving out the first interval). Peak memory: each process's peak resident set
((b) and (c) from the worker's metrics rows).

    python benchmarks/preference_bench.py [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from ember.config import parse_spec
from ember.data.shards import ShardReader
from train_bench import LORA, SMOLLM2, peft_smollm2  # the same adapters and baseline model as LoRA fine-tuning

BATCH = {"global_batch_size": 8, "micro_batch_size": 2}
SEQ_LEN = 192
GIB = 1 << 30


def ember(work: Path, name: str, method: str, steps: int, cpus: float) -> tuple[float, int, Path]:
    """(tokens/s, the worker's peak resident bytes, the tokenized pairs' dir) of an Ember preference run."""
    from ember.train.preference import run_preference

    run_dir = work / name
    spec = parse_spec({"kind": "preference", "base": SMOLLM2, "method": method, "lora": LORA,
                       "data": {"inputs": ["builtin:python-prefs:test"], "seq_len": SEQ_LEN, "val_fraction": 0.0,
                                "dir": str(work / "prefs")},
                       "train": {**BATCH, "max_steps": steps, "lr": 5e-4, "log_every": 1, "eval_every": 0,
                                 "checkpoint_every": 0},
                       "deepspeed": {"zero_stage": 0, "precision": "fp32"},
                       "scaling": {"workers": 1, "cpus_per_worker": cpus}, "output": {"dir": str(run_dir)}})
    run_preference(spec)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    peaks = [r["peak_memory_bytes"][0] for r in rows if "peak_memory_bytes" in r]
    return sum(r["tokens_per_s"] for r in rows) / len(rows), max(peaks), work / "prefs"


def baseline(data: Path, steps: int, warmup: int) -> tuple[float, int, int]:
    """(tokens/s, peak resident bytes, the model's weights in bytes) of plain PyTorch + PEFT over the same pair
    rows."""
    from ember.config.specs import PreferenceLossSpec
    from ember.train.metrics import peak_memory, reset_peak_memory
    from ember.train.preference_loss import pair_logps, preference_loss

    model = peft_smollm2()
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.0)
    cfg = PreferenceLossSpec()

    def logits(ids):
        return model(input_ids=ids).logits

    micro, accum = BATCH["micro_batch_size"], BATCH["global_batch_size"] // BATCH["micro_batch_size"]
    batches = ShardReader(data, "train", seed=0).batches(micro)
    reset_peak_memory(torch.device("cpu"))
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        for _ in range(accum):
            batch = {k: torch.from_numpy(v) for k, v in next(batches)[0].items()}
            with torch.no_grad(), model.disable_adapter():
                reference = pair_logps(logits, batch)
            loss, _ = preference_loss(cfg, pair_logps(logits, batch), reference)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    rate = steps * BATCH["global_batch_size"] * SEQ_LEN * 2 / (time.perf_counter() - t0)
    return rate, peak_memory(torch.device("cpu")), weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(logging_level=logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    logging.getLogger("ember").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="ember-preference-bench-"))
    print(f"machine: {platform.machine()}, {cpus} CPUs, torch {torch.__version__}")
    print(f"model: SmolLM2-135M-Instruct ({SMOLLM2}), DPO (beta 0.1), pairs of 2 x {SEQ_LEN} tokens, global batch "
          f"{BATCH['global_batch_size']} pairs (micro {BATCH['micro_batch_size']}), AdamW, fp32, {args.steps} steps")
    b, peak_b, data = ember(work, "lora", "lora", args.steps, cpus)
    a, peak_a, weights = baseline(data, args.steps, 1)
    c, peak_c, _ = ember(work, "full", "full", args.steps, cpus)
    print(f"(a) PyTorch + PEFT, LoRA, 1 process:  {a:,.0f} tokens/s   peak {peak_a / GIB:.2f} GiB")
    print(f"(b) Ember LoRA, 1 worker, ZeRO 0:     {b:,.0f} tokens/s   b/a = {b / a:.3f}   (target >= 0.9)   peak "
          f"{peak_b / GIB:.2f} GiB")
    print(f"(c) Ember full, 1 worker, ZeRO 0:     {c:,.0f} tokens/s   peak {peak_c / GIB:.2f} GiB = LoRA's + "
          f"{(peak_c - peak_b) / GIB:.2f} GiB (every weight's gradient and AdamW moments, less LoRA's reference "
          f"forward); the model's weights are {weights / GIB:.2f} GiB: a reference model held beside it would add that")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
