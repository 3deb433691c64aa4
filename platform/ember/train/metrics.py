"""What a training run measures and where it goes: the metrics row of a log step (throughput, MFU against the GPU's
peak, peak memory, ZeRO partition sizes), the collectives that put every rank's figures together, and `MetricsLog`,
rank 0's sink for the rows (`metrics.jsonl`, TensorBoard events, the tracking runs of `ember.runs.tracking`).

(The Ray metric names that training and serving export are `ember.metrics`'.)
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ember import storage
from ember.model import flops_per_token
from ember.runs.run_dir import RunDir
from ember.train.run import RunPlan

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


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over the ranks (all ranks must call)."""
    return means_over_ranks({"value": value})["value"]


def means_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean of each scalar over the ranks, in one collective (all ranks must call, with the same keys)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist()))


def gather(values: list[int], device) -> list[list[int]]:
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
    gathered = gather([params, master], engine.device)
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


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at a training precision (fp32 runs its matmuls on TF32 tensor cores), or None."""
    for pattern, (half, tf32) in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return (tf32 if precision == "fp32" else half) * 1e12
    return None


def device_peak_flops(use_gpu: bool, precision: str) -> float | None:
    """This worker's GPU's `peak_flops` (None on CPU, where MFU is not reported)."""
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
        files = RunDir(run_dir)
        self.path, self.remote = files.metrics, storage.is_uri(run_dir)
        self.tracker = tracker  # `ember.runs.tracking.Tracker`: each row to MLflow and W&B too
        rows = _jsonl(self.path)
        self.rows = [r for r in rows if r.get("step", 0) <= resumed_step]
        superseded = [{"step": r["step"], "loss": r.get("loss")} for r in rows if r.get("step", 0) > resumed_step]
        if rows:
            storage.write_text(self.path, _to_jsonl(self.rows))
        for row in self.rows if tracker is not None else ():  # what the tracking runs may lack (see tracking.py)
            tracker.log(row)
        if restored is not None:
            storage.write_text(files.restores, _to_jsonl([*_jsonl(files.restores),
                                                          {**restored, "superseded": superseded}]))
        self.board, self.board_dir = None, files.tensorboard
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


class StepMetrics:
    """The metrics row of a log step, over the steps since the previous one: throughput, step time, MFU, every
    rank's peak memory, the ZeRO partition sizes (with the first row only). Built on every rank: the memory and
    partition figures are gathered (collectives)."""

    def __init__(self, plan: RunPlan, engine, device, world: int, rows_per_sample: int = 1):
        spec = plan.spec
        self.global_batch, self.seq_len = spec.train.global_batch_size, plan.manifest["seq_len"]
        self.rows_per_sample = rows_per_sample  # a preference pair is two sequences
        self.device, self.world, self.fp16 = device, world, spec.deepspeed.precision == "fp16"
        self.partitions = zero_partitions(engine, spec.deepspeed.zero_stage)  # collective: at the start, on all ranks
        self.peak = device_peak_flops(spec.scaling.use_gpu, spec.deepspeed.precision)
        self.flops_per_token = flops_per_token(plan.model, self.seq_len)
        self.restart()

    def restart(self) -> None:
        """A new interval starts (after a logged step)."""
        self.start, self.steps = time.perf_counter(), 0

    def stepped(self) -> None:
        self.steps += 1

    def row(self, step: int, samples: int, loss: float, lr: float, grad_norm: float | None,
            skipped_steps: int) -> dict:
        """The row of `step` (all ranks call); `skipped_steps` (fp16's overflowed updates) appear in fp16 runs."""
        seconds = time.perf_counter() - self.start
        tokens_per_s = self.steps * self.global_batch * self.seq_len * self.rows_per_sample / max(seconds, 1e-9)
        row = {"step": step, "samples": samples, "tokens": samples * self.seq_len * self.rows_per_sample, "loss": loss,
               "lr": lr,
               "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "step_time_s": seconds / self.steps}
        if self.partitions:
            row["zero_partitions"], self.partitions = self.partitions, None
        row["peak_memory_bytes"] = [g[0] for g in gather([peak_memory(self.device)], self.device)]
        if self.fp16:
            row["skipped_steps"] = skipped_steps
        if self.peak:
            row["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world)
        return row
