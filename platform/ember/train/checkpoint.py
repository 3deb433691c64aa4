"""A worker's checkpoints: saving one (each rank's DeepSpeed shard, and rank 0's data position and spec, reported to
Ray Train), and finding and opening the one to continue from: the run's own latest (after a restart) first, else the
one `resume: PATH` names. Its files are unpickled by torch's weights-only unpickler (`ember.train.unpickling`) unless
the spec says `trust_checkpoint`.

A checkpoint is restorable on any worker count: partitioned ZeRO states saved by another count are converted to
DeepSpeed's universal checkpoint format first, once per node (its first rank to take the node lock converts into the
node's cache dir, the others wait and load the same files, and the converter removes them once every rank has
loaded); `restores.jsonl` records which ranks converted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from ember import storage
from ember.runs.run_dir import RunDir
from ember.train.unpickling import weights_only_loading

log = logging.getLogger("ember")

DS_TAG = "deepspeed"  # DeepSpeed's checkpoint sub-directory inside each Ray Train checkpoint


def save_checkpoint(engine, state: dict, rank: int, metrics: dict) -> None:
    """Reports the metrics with a checkpoint: each rank's DeepSpeed shard, and rank 0's `state` (step, samples
    consumed, world size, spec) beside it."""
    directory = tempfile.mkdtemp(prefix="ember-ckpt-")
    engine.save_checkpoint(directory, tag=DS_TAG)
    if rank == 0:
        Path(directory, RunDir.CHECKPOINT_STATE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Restoring:
    """A checkpoint opened to load: where DeepSpeed finds it, and Ember's state saved with it."""

    path: str  # the checkpoint's own location, as Ray Train names it
    source: str  # "latest" (the run's own) or "resume_path"
    directory: Path
    tag: str  # DeepSpeed's tag: DS_TAG, or "universal" when re-cut for another worker count
    state: dict  # the checkpoint's ember_state.json
    converted: bool  # whether this rank converted it to the universal format


@contextlib.contextmanager
def restoring(start_from: str | None, trust: bool, rank: int, world: int, ds_config: dict) -> Iterator[
        Restoring | None]:
    """The checkpoint to continue from, opened for the engine to be built and load it inside this context (None:
    none). A re-cut one sets `load_universal` in `ds_config`, which the engine must be built with."""
    own = ray.train.get_checkpoint()
    checkpoint = own
    if checkpoint is None and start_from:
        filesystem, path = storage.resolve(start_from)  # a local path or a bucket's
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is None:
        yield None
        return
    with contextlib.ExitStack() as stack:  # its files (and a universal conversion's) unpickled safely
        stack.enter_context(weights_only_loading(storage.display(str(checkpoint.path)), trust))
        directory = Path(stack.enter_context(checkpoint.as_directory()))
        state = json.loads((directory / RunDir.CHECKPOINT_STATE).read_text())
        tag, converted = DS_TAG, False
        if state.get("world_size", world) != world and _optimizer_shards(directory / DS_TAG):
            ds_config["checkpoint"] = {"load_universal": True}
            directory, converted = _universal_once_per_node(directory, str(checkpoint.path), rank, stack)
            tag = "universal"
        yield Restoring(str(checkpoint.path), "latest" if own is not None else "resume_path", directory, tag, state,
                        converted)


def restore_record(found: Restoring, rank: int, world: int, device) -> dict:
    """What a restore did, for restores.jsonl (all ranks call: which ranks converted is gathered); rank 0 logs it."""
    state = found.state
    if rank == 0:
        how = f", re-partitioned from {state['world_size']} workers to {world}" if found.tag != DS_TAG else ""
        log.info("resumed at step %d (%d samples consumed) from %s%s", state["step"], state["samples"], found.path,
                 how)
    record = {"step": state["step"], "samples": state["samples"], "checkpoint": found.path, "source": found.source,
              "world_size": world, "checkpoint_world_size": state.get("world_size", world), "time": time.time()}
    if found.tag != DS_TAG:  # re-partitioned: which ranks converted the checkpoint (one per node)
        flags = torch.zeros(world, dtype=torch.long, device=device)
        flags[rank] = int(found.converted)
        if dist.is_initialized():
            dist.all_reduce(flags)
        record["converted_by_ranks"] = [r for r in range(world) if flags[r]]
    return record


def _universal_once_per_node(directory: Path, checkpoint_path: str, rank: int, stack) -> tuple[Path, bool]:
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
            done.write_text(json.dumps({"rank": rank, "checkpoint": checkpoint_path}))
            converted = True

    def remove_after_every_rank_loaded():
        if dist.is_initialized():
            dist.barrier()
        if converted:
            shutil.rmtree(root, ignore_errors=True)

    stack.callback(remove_after_every_rank_loaded)
    return root, converted


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
