"""The per-worker training loop that Ray Train runs on every worker. It reads only its `config` argument.

Each worker builds the model from `ember.model`, wraps it in a DeepSpeed engine configured from the spec, reads its
slice of the shards (rank r takes global samples r, r + W, ...), and trains. A checkpoint is DeepSpeed's (each rank's
shard) plus `ember_state.json` (step, samples consumed) in one Ray Train checkpoint; restoring one continues the same
global sample order, also with another worker count (partitioned ZeRO states are converted to DeepSpeed's universal
checkpoint format first). Rank 0 writes `metrics.jsonl`, the progress line and the Ray metrics, and exports the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ember.config.specs import SPEC_KINDS, TrainSpec
from ember.data.shards import ShardReader, load_manifest
from ember.model import ModelConfig, Transformer, flops_per_token, load_model, resize_vocab, save_model
from ember.runtime import quiet_libraries
from ember.train.ds_config import deepspeed_config

log = logging.getLogger("ember")

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint sub-directory inside each Ray Train checkpoint
STATE_FILE = "ember_state.json"
ERROR_FILE = "error.json"  # a run that stopped itself (non-finite loss) says why here; the driver raises it
RESTORES_FILE = "restores.jsonl"  # one record per restore of a checkpoint (see MetricsLog)
# Dense bf16 peak FLOP/s per device, for MFU; a device not listed gets no MFU figure.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def lr_at(step: int, train: TrainSpec, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `decay_steps` (default: the last
    step); `step` is 1-based."""
    if step <= train.warmup_steps:
        return train.lr * step / max(1, train.warmup_steps)
    horizon = train.decay_steps or total_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, horizon - train.warmup_steps))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value)


def to_device(batch, device):
    """A reader batch (an array, or a dict of arrays for fine-tuning data) as tensors on `device`."""
    if isinstance(batch, dict):
        return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
    return torch.from_numpy(batch).to(device)


def lm_loss(model, batch) -> torch.Tensor:
    """Next-token cross-entropy. For fine-tuning rows, only over targets whose loss_mask is 1, with each packed
    conversation attending only to itself (segments)."""
    if not isinstance(batch, dict):
        logits = model(batch[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    ids = batch["input_ids"]
    logits = model(ids[:, :-1], segments=batch["segments"][:, :-1])
    return masked_cross_entropy(logits, ids[:, 1:], batch["loss_mask"][:, 1:])


def masked_cross_entropy(logits, targets, mask) -> torch.Tensor:
    """Mean cross-entropy over the targets whose mask is non-zero; the others' labels are never read."""
    targets = targets.masked_fill(mask == 0, -100)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


@torch.no_grad()
def evaluate(engine, reader: ShardReader, micro_batch: int, batches: int, device) -> float:
    """Mean loss over the first `batches` micro batches of val/ per rank (the same ones every time)."""
    engine.eval()
    it = reader.batches(micro_batch, start=0)
    losses = [lm_loss(engine, to_device(next(it)[0], device)) for _ in range(batches)]
    engine.train()
    return _mean_over_ranks(torch.stack(losses).mean())


def _peak_flops(use_gpu: bool) -> float | None:
    if not use_gpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class MetricsLog:
    """Rank 0's metrics.jsonl (and TensorBoard events, by option): on resume, rows after the restored step are
    dropped so no step appears twice. Each restore appends one record to restores.jsonl: the step and samples it
    restored, from which checkpoint (`source`: `latest`, the run's own latest, after a failed worker or when the run
    dir is run again; `resume_path`, the one `resume: PATH` names), and the steps of the dropped rows with their
    losses, which the redone steps must repeat."""

    def __init__(self, path: Path, resumed_step: int, tensorboard: bool = False, restored: dict | None = None):
        self.path = path
        superseded = []
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resumed_step]
            superseded = [{"step": r["step"], "loss": r.get("loss")} for r in rows if r.get("step", 0) > resumed_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if restored is not None:
            with open(path.with_name(RESTORES_FILE), "a") as f:
                f.write(json.dumps({**restored, "superseded": superseded}) + "\n")
        self.board = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed attempt wrote past the checkpoint this run resumes from.
            self.board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, row["step"])
            self.board.flush()


def zero_partitions(engine, stage: int) -> dict:
    """Elements of parameters and of fp32 optimizer master weights held by each rank (all ranks must call)."""
    params = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in engine.module.parameters())
    if stage in (1, 2):
        master = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    elif stage == 3:
        master = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
    else:
        master = sum(p.numel() for p in engine.module.parameters())
    local = torch.tensor([params, master], dtype=torch.long, device=engine.device)
    if not dist.is_initialized():
        return {"params": [params], "optimizer": [master]}
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return {"params": [int(t[0]) for t in gathered], "optimizer": [int(t[1]) for t in gathered]}


def _save_checkpoint(engine, step: int, samples: int, spec: dict, rank: int, world: int) -> str:
    """Each rank writes its DeepSpeed shard into a local temp dir; rank 0 adds the data position and the spec."""
    directory = tempfile.mkdtemp(prefix="ember-ckpt-")
    engine.save_checkpoint(directory, tag=DS_TAG)
    if rank == 0:
        Path(directory, STATE_FILE).write_text(json.dumps({"step": step, "samples": samples, "world_size": world,
                                                           "spec": spec}))
    return directory


def _optimizer_shards(ds_dir: Path) -> list[Path]:
    """The per-rank optimizer state files of a DeepSpeed checkpoint (none when the optimizer state is not partitioned,
    as with ZeRO 0 in fp32: it then sits whole in the model-states file and loads into any worker count)."""
    return sorted(ds_dir.glob("*optim_states.pt"))


def to_universal(ds_dir: Path, out_dir: Path) -> Path:
    """Converts the DeepSpeed checkpoint in `ds_dir` (one file per rank) to DeepSpeed's universal format (one file per
    parameter and optimizer state, independent of the worker count) under `out_dir/universal`; returns that dir."""
    import io
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    target = out_dir / "universal"
    args = Namespace(input_folder=str(ds_dir), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress bars
        ds_to_universal.main(args)
    return target


def build_model(spec, cfg: ModelConfig, vocab_size: int) -> tuple[Transformer, list]:
    """The model a worker trains, and its trainable parameters: pretraining builds `cfg` (or loads
    model.init_from); fine-tuning loads the base, grows its vocabulary to the dataset's tokenizer, and with LoRA
    freezes it under adapters."""
    if spec.kind == "pretrain":
        model = load_model(spec.model.init_from) if spec.model.init_from else Transformer(cfg)
        return model, list(model.parameters())
    model = load_model(spec.base)
    resize_vocab(model, max(vocab_size, model.config.vocab_size))
    if spec.method == "lora":
        from ember.train.lora import apply_lora

        return model, apply_lora(model, spec.lora)
    return model, list(model.parameters())


def _export(engine, spec, cfg: ModelConfig, out: Path, tokenizer_dir: str, eos_ids, rank: int, vocab_size: int) -> None:
    """Writes the trained model as a Llama-format model dir (ZeRO-3 shards gathered first; all ranks must call).
    With LoRA, the adapters are also saved on their own (PEFT format, `adapter/` beside the model) and merged into
    the exported weights."""
    if spec.deepspeed.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: rank 0 receives the full state dict
        if rank == 0:
            torch.manual_seed(0)
            model = Transformer(cfg) if spec.kind == "pretrain" else build_model(spec, cfg, vocab_size)[0]
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    else:
        model = engine.module
    if rank != 0:
        return
    if spec.kind == "finetune" and spec.method == "lora":
        from ember.train.lora import adapter_state, merge_lora, save_adapter

        save_adapter(adapter_state(model), spec.lora, spec.base, out.parent / "adapter")
        merge_lora(model)
    model.config.gradient_checkpointing = False
    save_model(model, out, tokenizer_dir=tokenizer_dir, dtype=torch.float32, eos_token_id=eos_ids)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    quiet_libraries()
    spec = SPEC_KINDS[config["spec"]["kind"]].model_validate(config["spec"])
    cfg = ModelConfig(**config["model_config"])
    data_dir = config["data_dir"]
    run_dir = Path(config["run_dir"])
    total_steps = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    manifest = load_manifest(data_dir)
    seq_len, tr = manifest["seq_len"], spec.train

    torch.manual_seed(tr.seed)  # the same initial weights on every rank
    model, trainable = build_model(spec, cfg, manifest["vocab_size"])
    model.config.gradient_checkpointing = spec.deepspeed.activation_checkpointing
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]  # norms: no weight decay
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    ds_config = deepspeed_config(tr, spec.deepspeed, world)
    step, samples = 0, 0
    # The run's own latest checkpoint (after a restart) comes first; otherwise the one `resume: PATH` names.
    own = ray.train.get_checkpoint()
    checkpoint = own or (ray.train.Checkpoint(config["start_from"]) if config.get("start_from") else None)
    restored = None
    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            directory = Path(stack.enter_context(checkpoint.as_directory()))
            state = json.loads((directory / STATE_FILE).read_text())
            step, samples = state["step"], state["samples"]
            load_dir, tag = directory, DS_TAG
            if state.get("world_size", world) != world and _optimizer_shards(directory / DS_TAG):
                # ZeRO partitions of another worker count: re-cut them through DeepSpeed's universal checkpoint.
                ds_config["checkpoint"] = {"load_universal": True}
                load_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-universal-")))
                tag = to_universal(directory / DS_TAG, load_dir).name
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                               dist_init_required=False)
        if checkpoint is not None:
            engine.load_checkpoint(str(load_dir), tag=tag)
            if rank == 0:
                how = f", re-partitioned from {state['world_size']} workers to {world}" if tag != DS_TAG else ""
                log.info("resumed at step %d (%d samples consumed) from %s%s", step, samples, checkpoint.path, how)
            restored = {"step": step, "samples": samples, "checkpoint": str(checkpoint.path),
                        "source": "latest" if own is not None else "resume_path", "world_size": world,
                        "checkpoint_world_size": state.get("world_size", world), "time": time.time()}
    accum = ds_config["gradient_accumulation_steps"]

    train_reader = ShardReader(data_dir, "train", seed=tr.seed, rank=rank, world_size=world)
    val_reader = (ShardReader(data_dir, "val", seed=tr.seed, rank=rank, world_size=world)
                  if manifest["splits"]["val"]["rows"] else None)
    batches = train_reader.batches(tr.micro_batch_size, start=samples)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", step, tr.tensorboard, restored) if rank == 0 else None
    if rank == 0:
        from ember.metrics import TrainMetrics

        gauges = TrainMetrics(spec.name or run_dir.name)
    partitions = zero_partitions(engine, spec.deepspeed.zero_stage)  # reported with the first metrics row
    peak = _peak_flops(spec.scaling.use_gpu)
    flops_token = flops_per_token(cfg, seq_len)
    interval_start, interval_steps = time.perf_counter(), 0
    tokens_per_step = tr.global_batch_size * seq_len

    while step < total_steps:
        step += 1
        lr = lr_at(step, tr, total_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for _ in range(accum):
            batch, samples = next(batches)
            loss = lm_loss(engine, to_device(batch, device))
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())
        loss = _mean_over_ranks(torch.stack(losses).mean())
        interval_steps += 1
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        bad = ("training loss", loss) if not math.isfinite(loss) else (
            ("gradient norm", grad_norm) if grad_norm is not None and not math.isfinite(grad_norm) else None)
        if bad:  # every rank sees the same all-reduced figures, so all stop here together, without a retry
            if rank == 0:
                (run_dir / ERROR_FILE).write_text(json.dumps({"step": step, "error": (
                    f"the {bad[0]} is {bad[1]} at step {step}; stopped there. The last good checkpoint is kept in the "
                    "run dir (lower train.lr, raise train.warmup_steps, or check the data)")}))
            return
        log_now = step % tr.log_every == 0 or step == total_steps
        eval_now = val_reader is not None and ((tr.eval_every and step % tr.eval_every == 0) or step == total_steps)
        save_now = (tr.checkpoint_every and step % tr.checkpoint_every == 0) or step == total_steps
        if not (log_now or eval_now or save_now):
            continue
        seconds = time.perf_counter() - interval_start
        tokens_per_s = interval_steps * tokens_per_step / max(seconds, 1e-9)
        metrics = {"step": step, "samples": samples, "tokens": samples * seq_len, "loss": loss, "lr": lr,
                   "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_s, "step_time_s": seconds / interval_steps}
        if partitions:
            metrics["zero_partitions"], partitions = partitions, None
        if peak:
            metrics["mfu"] = flops_token * tokens_per_s / (peak * world)
        if eval_now:
            metrics["val_loss"] = evaluate(engine, val_reader, tr.micro_batch_size, tr.eval_batches, device)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        if rank == 0:
            metrics_log.write(metrics)
            gauges.record({"loss": loss, "val_loss": metrics.get("val_loss"), "learning_rate": lr,
                           "grad_norm": metrics["grad_norm"], "tokens_per_second": tokens_per_s,
                           "mfu": metrics.get("mfu"), "step": step, "step_time_seconds": metrics["step_time_s"]})
            val = f", val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})" if eval_now else ""
            log.info("step %d/%d  loss %.4f%s  lr %.2e  grad norm %.3f  %s tokens/s", step, total_steps, loss, val,
                     lr, metrics["grad_norm"] or 0.0, f"{tokens_per_s:,.0f}")
        if save_now:
            directory = _save_checkpoint(engine, step, samples, config["spec"], rank, world)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            shutil.rmtree(directory, ignore_errors=True)
        else:
            ray.train.report(metrics)
        interval_start, interval_steps = time.perf_counter(), 0

    _export(engine, spec, cfg, run_dir / "model", data_dir, config.get("eos_ids", manifest["eos_id"]), rank,
            manifest["vocab_size"])
    if rank == 0:
        log.info("model exported to %s", run_dir / "model")
    if dist.is_initialized():
        dist.barrier()
