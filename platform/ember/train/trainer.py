"""The trainer that Ray Train runs on every worker: one class with named steps, the same for every job kind.

`train_loop_per_worker(config)` rebuilds the run plan from its `config` (see `ember.train.launch`) and runs a
`Trainer` with the plan's recipe (`ember.train.recipes`: the model, the loss and what the export adds):

    restore → (train_step → [evaluate] → record → [checkpoint]) until the last step → export

Each worker builds the model, wraps it in a DeepSpeed engine configured from the spec, reads its slice of the shards
(rank r takes global samples r, r + W, ...), and trains. A checkpoint is DeepSpeed's (each rank's shard) plus
`ember_state.json` (step, samples consumed) in one Ray Train checkpoint; restoring one continues the same global
sample order, also with another worker count (partitioned ZeRO states are converted to DeepSpeed's universal
checkpoint format first, once per node: its first rank converts, the others wait and load the same files;
`restores.jsonl` records which ranks converted); its files are unpickled by torch's weights-only unpickler
(`ember.train.unpickling`) unless the spec says `trust_checkpoint`. Rank 0 writes `metrics.jsonl`, the progress line
and the Ray metrics, and exports the model.

The run dir is a location (`ember.storage`): in object storage, Ray Train uploads the checkpoints there (the run's
`storage_path`), rank 0 publishes `metrics.jsonl` whole at each row and uploads TensorBoard's events at each
checkpoint and at the end, and the export is uploaded with its `config.json` last.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import re
import shutil
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ember import storage
from ember.config.specs import TrainSpec
from ember.data.shards import ShardReader
from ember.metrics import TrainMetrics
from ember.model import flops_per_token, save_model, save_weights
from ember.runs.progress import write_progress
from ember.runs.tracking import start_tracking
from ember.runtime import debugging, quiet_libraries, use_environment_ninja
from ember.train.ds_config import bucket_sizes, deepspeed_config, trainer_clips
from ember.train.launch import ERROR_FILE, RESTORES_FILE, RESULT_FILE, STATE_FILE, RunPlan
from ember.train.recipes import RECIPES, lm_loss, training_dtype
from ember.train.unpickling import weights_only_loading

log = logging.getLogger("ember")

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint sub-directory inside each Ray Train checkpoint
# Dense peak TFLOP/s per GPU, for MFU, from NVIDIA's datasheets: (bf16 / fp16 tensor cores, TF32 tensor cores).
# Matched against torch.cuda.get_device_name() in this order, whole words only ("L4" is not "L40S", an H100 PCIe is
# not an SXM); a GPU not listed gets no MFU figure rather than a wrong one.
PEAK_TFLOPS = (
    (r"\bH200\b", (989.0, 494.5)),
    (r"\bH100\b.*\bPCIe\b", (756.0, 378.0)),
    (r"\bH100\b.*\bNVL\b", (835.0, 417.5)),
    (r"\bH100\b", (989.0, 494.5)),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bA100\b", (312.0, 156.0)),  # SXM and PCIe alike
    (r"\bL40S\b", (362.0, 183.0)),
    (r"\bL4\b", (121.0, 60.0)),
    (r"\bA10\b", (125.0, 62.5)),  # not the A10G (AWS g5): NVIDIA publishes no tensor-core peak for it
)


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


@torch.no_grad()
def evaluate(engine, reader: ShardReader, micro_batch: int, batches: int, device) -> float:
    """Mean loss over the first `batches` micro batches of val/ per rank (the same ones every time)."""
    engine.eval()
    it = reader.batches(micro_batch, start=0)
    losses = [lm_loss(engine, to_device(next(it)[0], device)) for _ in range(batches)]
    engine.train()
    return _mean_over_ranks(torch.stack(losses).mean())


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at a training precision (fp32 runs its matmuls on TF32 tensor cores), or None."""
    for pattern, (half, tf32) in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (tf32 if precision == "fp32" else half) * 1e12
    return None


def _peak_flops(use_gpu: bool, precision: str) -> float | None:
    if not use_gpu or not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(), precision)


def _jsonl(location: str) -> list[dict]:
    """The rows of a JSON Lines file; a torn last line (a write cut short by a crash) is left out, as the rows
    after a restored step are."""
    try:
        text = storage.read_text(location)
    except FileNotFoundError:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        return rows + [json.loads(line) for line in lines[-1:]]
    except ValueError:
        return rows


def _to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


class MetricsLog:
    """Rank 0's metrics.jsonl (and TensorBoard events, by option): on resume, rows after the restored step are
    dropped so no step appears twice. Each restore appends one record to restores.jsonl: the step and samples it
    restored, from which checkpoint (`source`: `latest`, the run's own latest, after a failed worker or when the run
    dir is run again; `resume_path`, the one `resume: PATH` names), and the steps of the dropped rows with their
    losses, which the redone steps must repeat. In object storage (which has no append) the whole file is published
    again at each row, and the events are written locally and uploaded by `sync`."""

    def __init__(self, run_dir: str, resumed_step: int, tensorboard: bool = False, restored: dict | None = None,
                 tracker=None):
        self.path, self.remote = storage.join(run_dir, "metrics.jsonl"), storage.is_uri(run_dir)
        self.tracker = tracker  # `ember.runs.tracking.Tracker`: each row to MLflow and W&B too
        rows = _jsonl(self.path)
        self.rows = [r for r in rows if r.get("step", 0) <= resumed_step]
        superseded = [{"step": r["step"], "loss": r.get("loss")} for r in rows if r.get("step", 0) > resumed_step]
        if rows:
            storage.write_text(self.path, _to_jsonl(self.rows))
        for row in self.rows if tracker is not None else ():  # what the tracking runs may lack (see tracking.py)
            tracker.log(row)
        if restored is not None:
            restores = storage.join(run_dir, RESTORES_FILE)
            storage.write_text(restores, _to_jsonl([*_jsonl(restores), {**restored, "superseded": superseded}]))
        self.board, self.board_dir = None, storage.join(run_dir, "tensorboard")
        self.unsynced = False  # events written locally since the last upload (object storage)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.local_board = tempfile.mkdtemp(prefix="ember-tensorboard-") if self.remote else self.board_dir
            if self.remote:  # the earlier attempts' events, for purge_step to cut
                for rel, _ in storage.list_files(self.board_dir):
                    Path(self.local_board, rel).parent.mkdir(parents=True, exist_ok=True)
                    Path(self.local_board, rel).write_bytes(storage.read_bytes(storage.join(self.board_dir, rel)))
            # purge_step drops events a crashed attempt wrote past the checkpoint this run resumes from.
            self.board = SummaryWriter(self.local_board, purge_step=resumed_step + 1)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.tracker is not None:
            self.tracker.log(row)
        if self.remote:
            storage.write_text(self.path, _to_jsonl(self.rows))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, row["step"])
            self.board.flush()
            self.unsynced = self.remote

    def sync(self) -> None:
        """Uploads the TensorBoard events written so far (object storage only)."""
        if self.unsynced:
            self.board.flush()
            storage.upload_dir(self.local_board, self.board_dir)
            self.unsynced = False

    def close(self) -> None:
        """At the end of the run (finished, or stopped): the events not yet uploaded go up (a finished run's last
        step was checkpointed and synced, so none), and their local copy is removed (object storage only); the
        tracking runs rank 0 holds are closed."""
        self.sync()
        if self.tracker is not None:
            self.tracker.close()
        if self.board is not None:
            self.board.close()
            if self.remote:
                shutil.rmtree(self.local_board, ignore_errors=True)


def _gather(values: list[int], device) -> list[list[int]]:
    """Each rank's `values`, in rank order (all ranks must call)."""
    if not dist.is_initialized():
        return [list(values)]
    local = torch.tensor(values, dtype=torch.long, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [[int(x) for x in t] for t in gathered]


def zero_partitions(engine, stage: int) -> dict:
    """Elements of parameters and of fp32 optimizer master weights held by each rank (all ranks must call)."""
    params = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in engine.module.parameters())
    if stage in (1, 2):
        master = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    elif stage == 3:
        master = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
    else:
        master = sum(p.numel() for p in engine.module.parameters())
    gathered = _gather([params, master], engine.device)
    return {"params": [g[0] for g in gathered], "optimizer": [g[1] for g in gathered]}


def reset_peak_memory(device) -> None:
    """Starts `peak_memory` afresh (after the engine is built: its set-up copies are not the training's memory): on
    a GPU torch's peak statistics; on CPU the kernel's resident high-water mark (`5` to /proc/self/clear_refs), after
    glibc has returned the freed memory it keeps (`malloc_trim`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the set-up's freed memory back to the system, out of the count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux (glibc), or not allowed: the peak then counts from the process's start
        pass


def peak_memory(device) -> int:
    """This rank's peak memory in bytes since `reset_peak_memory`: the GPU memory torch allocated on a GPU, else the
    process's peak resident set (VmHWM: its own, where ru_maxrss would carry a forking parent's over exec)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _optimizer_shards(ds_dir: Path) -> list[Path]:
    """The per-rank optimizer state files of a DeepSpeed checkpoint (none when the optimizer state is not partitioned,
    as with ZeRO 0 in fp32: it then sits whole in the model-states file and loads into any worker count)."""
    return sorted(ds_dir.glob("*optim_states.pt"))


def to_universal(ds_dir: Path, out_dir: Path) -> Path:
    """Converts the DeepSpeed checkpoint in `ds_dir` (one file per rank) to DeepSpeed's universal format (one file per
    parameter and optimizer state, independent of the worker count) under `out_dir/universal`; returns that dir."""
    from deepspeed.checkpoint import ds_to_universal  # the converter pulls in DeepSpeed's whole checkpoint stack

    target = out_dir / "universal"
    args = Namespace(input_folder=str(ds_dir), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress bars
        ds_to_universal.main(args)
    return target




def _not_finite(loss: float, grad_norm: float | None) -> tuple[str, float] | None:
    if not math.isfinite(loss):
        return "training loss", loss
    if grad_norm is not None and not math.isfinite(grad_norm):
        return "gradient norm", grad_norm
    return None


@dataclass
class Overflows:
    """fp16's dynamic loss scaling skips an optimizer step whose scaled gradients overflowed (DeepSpeed halves the
    scale and reports an infinite gradient norm): normal early in a run, so such a step is counted, not fatal;
    more than `limit` of them in a row is (the scale has run out, or the gradients themselves are not finite)."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def observe(self, skipped: bool) -> bool:
        """Counts a step; True when the run must stop."""
        if not skipped:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        return self.in_a_row > self.limit


class Trainer:
    """One worker's part of a run, in named steps (see the module docstring). Reads only its plan."""

    def __init__(self, plan: RunPlan):
        self.plan, self.spec, self.recipe = plan, plan.spec, RECIPES[plan.kind]
        self.run_dir = plan.run_dir
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.step, self.samples = 0, 0
        self.overflows = Overflows(self.spec.train.max_overflow_steps)
        self.ds_config = deepspeed_config(self.spec.train, self.spec.deepspeed, self.world,
                                          self.spec.scaling.use_gpu)

    # ------------------------------------------------------------ restore

    def restore(self) -> dict | None:
        """Builds the model and its DeepSpeed engine, loading the checkpoint to continue from: the run's own latest
        (after a restart) first, else the one `resume: PATH` names. Returns what was restored, or None."""
        import deepspeed  # in the workers only: the driver imports this module to hand Ray Train the loop

        tr = self.spec.train
        torch.manual_seed(tr.seed)  # the same initial weights on every rank
        model, trainable = self.recipe.build(self.plan, self.device)
        model.config.gradient_checkpointing = self.spec.deepspeed.activation_checkpointing
        self.ds_config["zero_optimization"].update(bucket_sizes(
            self.spec.deepspeed, model.config.hidden_size, sum(p.numel() for p in model.layers[0].parameters())))
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": tr.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # norms: no decay
        own = ray.train.get_checkpoint()
        checkpoint = own
        if checkpoint is None and self.plan.start_from:
            filesystem, path = storage.resolve(self.plan.start_from)  # a local path or a bucket's
            checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
        with contextlib.ExitStack() as stack:
            if checkpoint is not None:  # its files (and a universal conversion's) unpickled safely: see unpickling.py
                stack.enter_context(weights_only_loading(storage.display(str(checkpoint.path)),
                                                         self.spec.trust_checkpoint))
            load = self._checkpoint_to_load(checkpoint, stack) if checkpoint is not None else None
            # DeepSpeed prints its op builds ("... op built successfully"); --debug shows them.
            with contextlib.nullcontext() if debugging() else contextlib.redirect_stdout(io.StringIO()):
                self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                            config=self.ds_config, dist_init_required=False)
            if load is None:
                return None
            load_dir, tag, state = load
            self.engine.load_checkpoint(str(load_dir), tag=tag)
        self.step, self.samples = state["step"], state["samples"]
        if self.rank == 0:
            how = f", re-partitioned from {state['world_size']} workers to {self.world}" if tag != DS_TAG else ""
            log.info("resumed at step %d (%d samples consumed) from %s%s", self.step, self.samples, checkpoint.path,
                     how)
        record = {"step": self.step, "samples": self.samples, "checkpoint": str(checkpoint.path),
                  "source": "latest" if own is not None else "resume_path", "world_size": self.world,
                  "checkpoint_world_size": state.get("world_size", self.world), "time": time.time()}
        if tag != DS_TAG:  # re-partitioned: which ranks converted the checkpoint (one per node)
            flags = torch.zeros(self.world, dtype=torch.long, device=self.device)
            flags[self.rank] = int(self.converted)
            if dist.is_initialized():
                dist.all_reduce(flags)
            record["converted_by_ranks"] = [r for r in range(self.world) if flags[r]]
        return record

    def _checkpoint_to_load(self, checkpoint, stack) -> tuple[Path, str, dict]:
        """(directory, DeepSpeed tag, Ember state) to load; ZeRO partitions of another worker count are re-cut
        through DeepSpeed's universal checkpoint first."""
        directory = Path(stack.enter_context(checkpoint.as_directory()))
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("world_size", self.world) == self.world or not _optimizer_shards(directory / DS_TAG):
            return directory, DS_TAG, state
        self.ds_config["checkpoint"] = {"load_universal": True}
        load_dir, self.converted = self._universal_once_per_node(directory, str(checkpoint.path), stack)
        return load_dir, "universal", state

    def _universal_once_per_node(self, directory: Path, checkpoint_path: str, stack) -> tuple[Path, bool]:
        """The checkpoint in DeepSpeed's universal format, converted once per node: the node's first rank to take
        the lock converts it into the node's cache dir, the node's other ranks wait and load the same files. Once
        every rank has loaded (a barrier), the converter removes them. Returns (the dir, whether this rank
        converted)."""
        from filelock import FileLock

        root = storage.cache_dir() / "universal" / hashlib.sha256(checkpoint_path.encode()).hexdigest()[:24]
        root.parent.mkdir(parents=True, exist_ok=True)
        done = root / "converted.json"
        converted = False
        with FileLock(str(root) + ".lock"):
            if not done.is_file():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir()
                to_universal(directory / DS_TAG, root)
                done.write_text(json.dumps({"rank": self.rank, "checkpoint": checkpoint_path}))
                converted = True

        def remove_after_every_rank_loaded():
            if dist.is_initialized():
                dist.barrier()
            if converted:
                shutil.rmtree(root, ignore_errors=True)

        stack.callback(remove_after_every_rank_loaded)
        return root, converted

    # ------------------------------------------------------------ train step

    def train_step(self, batches) -> tuple[float, float | None, float, bool]:
        """One optimizer step (gradient accumulation inside): (mean loss over ranks, grad norm, learning rate, whether
        fp16's loss scaling skipped the update for an overflow)."""
        self.step += 1
        lr = lr_at(self.step, self.spec.train, self.plan.total_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        losses, skipped_before, grad_norm = [], self.engine.skipped_steps, None
        micro_steps = self.ds_config["gradient_accumulation_steps"]
        for micro in range(micro_steps):
            batch, self.samples = next(batches)
            loss = self.recipe.loss(self.engine, to_device(batch, self.device))
            self.engine.backward(loss)  # at the last micro-batch: the gradients averaged over ranks
            if micro == micro_steps - 1 and trainer_clips(self.spec.deepspeed):
                grad_norm = self.clip_gradients()
            self.engine.step()
            losses.append(loss.detach())
        grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        skipped = self.spec.deepspeed.precision == "fp16" and self.engine.skipped_steps > skipped_before
        return _mean_over_ranks(torch.stack(losses).mean()), float(grad_norm) if grad_norm is not None else None, lr, \
            skipped

    def clip_gradients(self) -> torch.Tensor:
        """The norm of the whole gradient, and the gradient clipped to train.grad_clip (see `trainer_clips`)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.spec.train.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.engine.module.parameters(), self.spec.train.grad_clip, norm)
        return norm

    def stop_if_not_finite(self, loss: float, grad_norm: float | None, skipped: bool) -> bool:
        """Every rank sees the same all-reduced figures (and the same loss-scale overflow), so all stop here together,
        without a retry; the driver raises the error rank 0 writes. The last good checkpoint stays. An fp16 step
        skipped for an overflow is counted and logged, not fatal, up to train.max_overflow_steps in a row."""
        bad = _not_finite(loss, None if skipped else grad_norm)
        too_many = self.overflows.observe(skipped)
        if skipped and not too_many and not bad and self.rank == 0:
            scale = getattr(self.engine.optimizer, "loss_scale", None) or getattr(self.engine.optimizer, "cur_scale", 0)
            log.info("step %d: fp16 gradients overflowed, update skipped, loss scale now %g (%d in a row, %d in all)",
                     self.step, scale, self.overflows.in_a_row, self.overflows.total)
        if too_many:
            bad = ("fp16 loss scale", f"overflowing for {self.overflows.in_a_row} steps in a row (more than "
                                      f"train.max_overflow_steps: {self.spec.train.max_overflow_steps})")
        if bad and self.rank == 0:
            storage.write_json(storage.join(self.run_dir, ERROR_FILE), {"step": self.step, "error": (
                f"the {bad[0]} is {bad[1]} at step {self.step}; stopped there. The last good checkpoint is kept in "
                "the run dir (lower train.lr, raise train.warmup_steps, or check the data)")})
        return bad is not None

    # ------------------------------------------------------------ evaluate, record, checkpoint

    def evaluate(self, reader: ShardReader) -> dict:
        tr = self.spec.train
        val_loss = evaluate(self.engine, reader, tr.micro_batch_size, tr.eval_batches, self.device)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def record(self, metrics: dict, metrics_log: MetricsLog, gauges) -> None:
        """Rank 0: the metrics row, the Ray metrics, the progress line and the progress record."""
        metrics_log.write(metrics)
        gauges.record({"loss": metrics["loss"], "val_loss": metrics.get("val_loss"), "learning_rate": metrics["lr"],
                       "grad_norm": metrics["grad_norm"], "tokens_per_second": metrics["tokens_per_s"],
                       "mfu": metrics.get("mfu"), "step": self.step, "step_time_seconds": metrics["step_time_s"]})
        val = f", val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})" if "val_loss" in metrics else ""
        log.info("step %d/%d  loss %.4f%s  lr %.2e  grad norm %.3f  %s tokens/s", self.step, self.plan.total_steps,
                 metrics["loss"], val, metrics["lr"], metrics["grad_norm"] or 0.0, f"{metrics['tokens_per_s']:,.0f}")
        write_progress(self.run_dir, {"kind": "train", "step": self.step, "total_steps": self.plan.total_steps,
                                      "loss": metrics["loss"], "tokens_per_s": metrics["tokens_per_s"],
                                      "val_loss": metrics.get("val_loss")})

    def checkpoint(self, metrics: dict) -> None:
        """Reports the metrics with a checkpoint: each rank's DeepSpeed shard, and rank 0's data position and spec."""
        directory = tempfile.mkdtemp(prefix="ember-ckpt-")
        self.engine.save_checkpoint(directory, tag=DS_TAG)
        if self.rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps({
                "step": self.step, "samples": self.samples, "world_size": self.world,
                "spec": json.loads(self.spec.model_dump_json())}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------ export

    def export(self) -> None:
        """Writes the trained model as a model dir of its family (all ranks call), in the training precision (bf16
        by default on GPUs). ZeRO 3: the shards are gathered to rank 0 in 16 bits and written as they are, with no
        model built for them, except LoRA's, whose adapters are merged on a model first."""
        out = storage.join(self.run_dir, "model")
        dtype = training_dtype(self.spec)
        eos = list(self.plan.eos_ids) if len(self.plan.eos_ids) > 1 else self.plan.eos_ids[0]
        model = state = None
        if self.spec.deepspeed.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective: rank 0 receives the full state
            if self.rank == 0 and not self.recipe.exports_from_state(self.plan):
                torch.manual_seed(0)
                model = self.recipe.skeleton(self.plan)
                model.load_state_dict(state, strict=False)
                state = None
        else:
            model = self.engine.module
        if self.rank == 0:
            if model is not None:
                self.recipe.before_export(model, self.plan, out)
                model.config.gradient_checkpointing = False
                save_model(model, out, tokenizer_dir=self.plan.data_dir, dtype=dtype, eos_token_id=eos,
                           bos_token_id=self.plan.bos_id)
            else:
                save_weights(state, self.plan.model, out, tokenizer_dir=self.plan.data_dir, dtype=dtype,
                             eos_token_id=eos, bos_token_id=self.plan.bos_id)
            log.info("model exported to %s", storage.display(out))
        if dist.is_initialized():
            dist.barrier()

    # ------------------------------------------------------------ the run

    def run(self) -> None:
        plan, tr, rank = self.plan, self.spec.train, self.rank
        seq_len, total = plan.manifest["seq_len"], plan.total_steps
        # The data first: a dataset that cannot be read fails before the engine is built.
        reader = ShardReader(plan.data_dir, "train", seed=tr.seed, rank=rank, world_size=self.world)
        val_reader = (ShardReader(plan.data_dir, "val", seed=tr.seed, rank=rank, world_size=self.world)
                      if plan.manifest["splits"]["val"]["rows"] else None)
        restored = self.restore()
        if rank == 0:  # training starts: the result of the run this one continues no longer describes the run dir
            storage.delete(storage.join(self.run_dir, RESULT_FILE))
        reset_peak_memory(self.device)
        batches = reader.batches(tr.micro_batch_size, start=self.samples)
        tracker = start_tracking(plan) if rank == 0 else None
        metrics_log = MetricsLog(self.run_dir, self.step, tr.tensorboard, restored, tracker) if rank == 0 else None
        gauges = TrainMetrics(self.spec.name or storage.name(self.run_dir)) if rank == 0 else None
        partitions = zero_partitions(self.engine, self.spec.deepspeed.zero_stage)  # with the first metrics row
        peak = _peak_flops(self.spec.scaling.use_gpu, self.spec.deepspeed.precision)
        flops_token = flops_per_token(plan.model, seq_len)
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < total:
            loss, grad_norm, lr, skipped = self.train_step(batches)
            interval_steps += 1
            if self.stop_if_not_finite(loss, grad_norm, skipped):
                if rank == 0:
                    metrics_log.close()
                return
            step = self.step
            log_now = step % tr.log_every == 0 or step == total
            eval_now = val_reader is not None and ((tr.eval_every and step % tr.eval_every == 0) or step == total)
            save_now = (tr.checkpoint_every and step % tr.checkpoint_every == 0) or step == total
            if not (log_now or eval_now or save_now):
                continue
            seconds = time.perf_counter() - interval_start
            tokens_per_s = interval_steps * tr.global_batch_size * seq_len / max(seconds, 1e-9)
            metrics = {"step": step, "samples": self.samples, "tokens": self.samples * seq_len, "loss": loss,
                       "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                       "step_time_s": seconds / interval_steps}
            if partitions:
                metrics["zero_partitions"], partitions = partitions, None
            metrics["peak_memory_bytes"] = [g[0] for g in _gather([peak_memory(self.device)], self.device)]
            if self.spec.deepspeed.precision == "fp16":
                metrics["skipped_steps"] = self.overflows.total
            if peak:
                metrics["mfu"] = flops_token * tokens_per_s / (peak * self.world)
            if eval_now:
                metrics.update(self.evaluate(val_reader))
            if rank == 0:
                self.record(metrics, metrics_log, gauges)
            if save_now:
                self.checkpoint(metrics)
                if rank == 0:
                    metrics_log.sync()
            else:
                ray.train.report(metrics)
            interval_start, interval_steps = time.perf_counter(), 0
        self.export()
        if rank == 0:
            metrics_log.close()


def train_loop_per_worker(config: dict) -> None:
    quiet_libraries()
    use_environment_ninja()
    if torch.cuda.is_available():  # fp32 matmuls on TF32 tensor cores (what the MFU peak of fp32 assumes)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    Trainer(RunPlan.from_config(config)).run()
