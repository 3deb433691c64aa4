"""Training throughput: a plain PyTorch loop against Ember on Ray Train + DeepSpeed, same model/batch/optimizer.

(a) baseline: one process, `torch.optim.AdamW`, the same model, batch (gradient accumulation included), schedule
    and data rows, all CPU cores to torch;
(b) Ember, 1 worker with all the CPUs, ZeRO stage 0;
(c) Ember, 2 workers (CPUs split between them), ZeRO stage 2.

Tokens/s exclude start-up: (a) times steps after a warm-up, (b) and (c) average the `tokens_per_s` that the workers
log, leaving out the first interval (engine start, first steps). With `--gpu` each worker gets a GPU, bf16, and the
figures include MFU.

With `--lora`, the same three on the real model, SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`), fine-tuned
with LoRA (rank 16 on all seven projections) on builtin:python-qa's packed conversations, fp32:

(a) plain PyTorch + PEFT: transformers' LlamaForCausalLM from the same model dir, `peft.get_peft_model` with the same
    adapters, AdamW over them, the same rows (each packed conversation kept apart by a 4D attention mask and its own
    positions, as Ember's segments do), masked cross-entropy on the assistant tokens;
(b) Ember `kind: finetune`, method lora, 1 worker, ZeRO 0;  (c) 2 workers, ZeRO 2;
and each process's peak resident memory (Ember's per worker from its metrics rows).

    python benchmarks/train_bench.py [--steps 60] [--repeat 3] [--gpu]
    python benchmarks/train_bench.py --lora [--steps 12] [--repeat 1]
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
import torch.nn.functional as F

from ember.config import parse_spec
from ember.data.shards import ShardReader, load_manifest
from ember.model import Transformer, num_parameters, preset

MODEL = {"preset": "small", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4}
BATCH = {"global_batch_size": 16, "micro_batch_size": 4}


def tokenize(work: Path) -> Path:
    from ember.data.pipeline import run_tokenize

    out = work / "data"
    run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": ["builtin:python-docs"]},
                             "tokenizer": {"vocab_size": 4096}, "pack": {"seq_len": 256},
                             "output": {"dir": str(out)}}))
    return out


def baseline(data: Path, steps: int, warmup: int, device: str) -> float:
    """Tokens/s of a plain single-process loop over the same rows."""
    manifest = load_manifest(data)
    torch.manual_seed(0)
    overrides = {k: v for k, v in MODEL.items() if k != "preset"}
    model = Transformer(preset(MODEL["preset"], vocab_size=manifest["vocab_size"], **overrides)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    micro, accum = BATCH["micro_batch_size"], BATCH["global_batch_size"] // BATCH["micro_batch_size"]
    batches = ShardReader(data, "train", seed=0).batches(micro)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        for _ in range(accum):
            x = torch.from_numpy(next(batches)[0]).to(device)
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * BATCH["global_batch_size"] * manifest["seq_len"] / (time.perf_counter() - t0)


def ember(data: Path, run_dir: Path, steps: int, workers: int, stage: int, cpus: float, gpu: bool) -> tuple:
    from ember.train.pretrain import run_pretrain

    spec = parse_spec({"kind": "pretrain", "data": {"dir": str(data)}, "model": MODEL,
                       "train": {**BATCH, "max_steps": steps, "lr": 1e-3, "log_every": 10, "eval_every": 0,
                                 "checkpoint_every": 0},
                       "deepspeed": {"zero_stage": stage, "precision": "bf16" if gpu else "fp32"},
                       "scaling": {"workers": workers, "cpus_per_worker": cpus, "use_gpu": gpu},
                       "output": {"dir": str(run_dir)}})
    run_pretrain(spec)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    rate = sum(r["tokens_per_s"] for r in rows) / len(rows)
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    return rate, (sum(mfu) / len(mfu) if mfu else None)


LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
LORA_BATCH = {"global_batch_size": 8, "micro_batch_size": 4}
SMOLLM2 = "builtin:smollm2-135m-instruct"


def lora_ember(work: Path, name: str, steps: int, workers: int, stage: int, cpus: float) -> tuple:
    """(tokens/s, each worker's peak resident bytes, the tokenized data dir) of Ember's LoRA fine-tune."""
    from ember.train.finetune import run_finetune

    run_dir = work / name
    spec = parse_spec({"kind": "finetune", "base": SMOLLM2, "method": "lora", "lora": LORA,
                       "data": {"inputs": ["builtin:python-qa"], "seq_len": 256, "dir": str(work / "sft")},
                       "train": {**LORA_BATCH, "max_steps": steps, "lr": 1e-3, "log_every": 2, "eval_every": 0,
                                 "checkpoint_every": 0},
                       "deepspeed": {"zero_stage": stage, "precision": "fp32"},
                       "scaling": {"workers": workers, "cpus_per_worker": cpus}, "output": {"dir": str(run_dir)}})
    run_finetune(spec)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    rows = [r for r in rows if "tokens_per_s" in r]
    peaks = [r["peak_memory_bytes"] for r in rows if "peak_memory_bytes" in r]
    return sum(r["tokens_per_s"] for r in rows) / len(rows), (peaks[-1] if peaks else []), work / "sft"


def packed_inputs(batch: dict) -> tuple:
    """transformers' view of Ember's packed rows: input ids, a 4D mask keeping each conversation to itself, each
    token's position within its conversation, the targets and their mask."""
    ids = torch.from_numpy(batch["input_ids"])
    segments = torch.from_numpy(batch["segments"].astype("int64"))[:, :-1]
    t = segments.shape[1]
    steps = torch.arange(t)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = steps - torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values
    mask = (steps[None, :, None] >= steps[None, None, :]) & (segments[:, :, None] == segments[:, None, :])
    return ids[:, :-1], mask[:, None], positions, ids[:, 1:], torch.from_numpy(batch["loss_mask"])[:, 1:]


def peft_smollm2():
    """SmolLM2 as transformers loads it, with PEFT's LoRA adapters of `LORA` (the baselines of LoRA training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from ember.model import builtin

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(builtin.resolve(SMOLLM2), dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                            target_modules=LORA["target_modules"]))


def lora_baseline(data: Path, steps: int, warmup: int) -> tuple[float, int]:
    """(tokens/s, peak resident bytes) of plain PyTorch + PEFT over the same rows."""
    from ember.train.metrics import peak_memory, reset_peak_memory
    from ember.train.recipes import masked_cross_entropy

    model = peft_smollm2()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95),
                            weight_decay=0.0)
    micro, accum = LORA_BATCH["micro_batch_size"], LORA_BATCH["global_batch_size"] // LORA_BATCH["micro_batch_size"]
    batches = ShardReader(data, "train", seed=0).batches(micro)
    reset_peak_memory(torch.device("cpu"))
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        for _ in range(accum):
            ids, mask, positions, targets, target_mask = packed_inputs(next(batches)[0])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            (masked_cross_entropy(logits, targets, target_mask) / accum).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    rate = steps * LORA_BATCH["global_batch_size"] * 256 / (time.perf_counter() - t0)
    return rate, peak_memory(torch.device("cpu"))


def lora_main(args, cpus: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="ember-lora-bench-"))
    gib = 1 << 30
    print(f"machine: {platform.machine()}, {cpus} CPUs, torch {torch.__version__}")
    print(f"model: SmolLM2-135M-Instruct ({SMOLLM2}), LoRA rank {LORA['rank']} on {len(LORA['target_modules'])} "
          f"projections, rows of 256 packed conversations, global batch {LORA_BATCH['global_batch_size']} (micro "
          f"{LORA_BATCH['micro_batch_size']}), AdamW, fp32, {args.steps} steps")
    rounds = []
    for i in range(max(1, args.repeat)):
        b, peaks_b, data = lora_ember(work, f"lora-b{i}", args.steps, 1, 0, cpus)
        a, peak_a = lora_baseline(data, args.steps, 2)
        rounds.append((a, b, peak_a, peaks_b))
        print(f"  round {i + 1}: a {a:,.0f} tokens/s, b {b:,.0f} tokens/s, b/a {b / a:.3f}")
    a, b, peak_a, peaks_b = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]
    c, peaks_c, _ = lora_ember(work, "lora-c", args.steps, 2, 2, max(1, cpus // 2))
    print(f"(a) PyTorch + PEFT, 1 process:   {a:,.0f} tokens/s   peak {peak_a / gib:.2f} GiB")
    print(f"(b) Ember LoRA, 1 worker, ZeRO 0: {b:,.0f} tokens/s   b/a = {b / a:.3f}   (target >= 0.9)   peak "
          + ", ".join(f"{p / gib:.2f}" for p in peaks_b) + " GiB")
    print(f"(c) Ember LoRA, 2 workers, ZeRO 2: {c:,.0f} tokens/s   c/a = {c / a:.2f}   peak per worker "
          + ", ".join(f"{p / gib:.2f}" for p in peaks_c) + " GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora", action="store_true", help="LoRA on the real SmolLM2 against PyTorch + PEFT")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 (needs 2 GPUs for (c))")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of (a) and (b), median printed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(logging_level=logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    logging.getLogger("ember").setLevel(logging.WARNING)
    if args.lora:
        lora_main(args, cpus)
        ray.shutdown()
        return 0
    work = Path(tempfile.mkdtemp(prefix="ember-train-bench-"))
    data = tokenize(work)
    manifest = load_manifest(data)
    cfg = preset(MODEL["preset"], vocab_size=manifest["vocab_size"],
                 **{k: v for k, v in MODEL.items() if k != "preset"})
    print(f"machine: {platform.machine()}, {cpus} CPUs{', GPU: ' + torch.cuda.get_device_name() if args.gpu else ''}, "
          f"torch {torch.__version__}")
    print(f"model: {num_parameters(cfg) / 1e6:.1f}M parameters, seq {manifest['seq_len']}, global batch "
          f"{BATCH['global_batch_size']} (micro {BATCH['micro_batch_size']}), AdamW, {args.steps} steps")
    rounds = []  # (a, b, MFU of b), interleaved so that drift in the machine's speed falls on both
    for i in range(max(1, args.repeat)):
        a = baseline(data, args.steps, 5, "cuda" if args.gpu else "cpu")
        b, mfu_b = ember(data, work / f"run-b{i}", args.steps, 1, 0, cpus, args.gpu)
        rounds.append((a, b, mfu_b))
        print(f"  round {i + 1}: a {a:,.0f} tokens/s, b {b:,.0f} tokens/s, b/a {b / a:.3f}")
    a, b, mfu_b = sorted(rounds, key=lambda r: r[1] / r[0])[len(rounds) // 2]  # the median round by b/a
    two = not args.gpu or torch.cuda.device_count() >= 2
    c, mfu_c = ember(data, work / "run-c", args.steps, 2, 2, max(1, cpus // 2), args.gpu) if two else (None, None)
    print(f"(a) plain PyTorch loop, 1 process:        {a:,.0f} tokens/s")
    print(f"(b) Ember, 1 worker, ZeRO 0:               {b:,.0f} tokens/s   b/a = {b / a:.3f}   (median of "
          f"{len(rounds)} interleaved rounds; target >= 0.975)"
          + (f"   MFU {mfu_b:.1%}" if mfu_b else ""))
    if c is None:
        print("(c) Ember, 2 workers, ZeRO 2:              skipped (needs 2 GPUs)")
    else:
        print(f"(c) Ember, 2 workers, ZeRO 2:              {c:,.0f} tokens/s   c/a = {c / a:.2f}"
              + (f"   MFU {mfu_c:.1%}" if mfu_c else ""))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
