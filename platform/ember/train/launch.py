"""A training run's launch on Ray Train.

`pretrain.py` and `finetune.py` build a `RunPlan` (`ember.train.run`; a fine-tune prepares its data first): what to
train (the spec and the network), on what data (a dataset dir and its manifest), from which weights (a base model's
fingerprint, a checkpoint to start from), and where to (the run dir). `launch` checks what Ray Train cannot (batch
arithmetic, resources, a run dir that must not be resumed or holds another run), reuses a finished identical run, and
otherwise runs the trainer (`ember.train.trainer`) on a `TorchTrainer`. The plan reaches every worker as its
`train_loop_config` (`to_config` / `from_config`): the workers read nothing else.

Ray Train restores a run dir's latest checkpoint whatever the plan, so a run dir whose checkpoints are on another
trajectory is refused before anything in it is touched (`refuse_another_run`): a longer run is the one
continuation; the previous `result.json` goes only once the workers have restored. The run dir's files are named by
`ember.runs.run_dir.RunDir`.

The run dir is a location (`ember.storage`): a local path, or a bucket prefix that becomes Ray Train's storage path,
so that checkpoints are uploaded there and a restarted worker group, or a rerun on another cluster, restores from it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading

import yaml

from ember import storage
from ember.config.specs import TrainingJobSpec
from ember.data.shards import check_cache_budget
from ember.errors import EmberError
from ember.identity import identity_of, read_stamp, spec_without, write_stamp
from ember.runs.run_dir import RunDir
from ember.runs.tracking import finish_tracking
from ember.runtime import debugging, ensure_ray, find_ember_error, training_worker_env
from ember.train.ds_config import deepspeed_config
from ember.train.run import HOW_IT_RUNS, RunPlan

log = logging.getLogger("ember")


def finished_run(plan: RunPlan) -> dict | None:
    """The last metrics of a run that finished in the plan's run dir with this same plan and exported its model."""
    stamp = read_stamp(plan.dir.result)
    if stamp is None or stamp["identity"] != plan.identity() or not plan.dir.has_model():
        return None
    return stamp.get("metrics") or {}


def _check_resources(spec: TrainingJobSpec) -> None:
    """Fails at once when the cluster can never hold the workers, now or once its autoscaler has added nodes (Ray
    would otherwise wait for them forever); says so when they wait for the autoscaler (ember.cluster.capacity)."""
    from ember.cluster.capacity import check_fits

    s = spec.scaling
    waiting = check_fits(s.worker_resources(), s.workers, "scaling", "scaling.workers", s.placement_strategy)
    if waiting:
        log.info("%s", waiting)


def refuse_never(spec: TrainingJobSpec, run_dir: str) -> None:
    """`resume: never` on a run dir that holds checkpoints fails before anything is touched."""
    if spec.resume == "never" and RunDir(run_dir).has_checkpoints():
        raise EmberError(f"{storage.display(run_dir)} holds checkpoints of an earlier run and resume is 'never'; set "
                         "resume: auto to continue it, or choose another output.dir")


def refuse_another_run(plan: RunPlan) -> None:
    """A run dir holding checkpoints of another trajectory fails before anything in it is touched: Ray Train
    restores a run dir's latest checkpoint whatever the plan (and prunes the old run's checkpoints by
    keep_checkpoints). The one continuation allowed is a longer run on the same trajectory (train.max_steps or
    max_tokens raised)."""
    shown = storage.display(plan.run_dir)
    if not plan.dir.has_checkpoints():
        return
    trajectory = plan.trajectory()
    stamp = read_stamp(plan.dir.run) or _trajectory_from_spec_yaml(plan.dir, trajectory)
    if stamp["identity"] != identity_of(trajectory):
        differences = "; ".join(_differences(stamp["trajectory"], trajectory)) or "unknown differences"
        raise EmberError(f"{shown} holds a run of another spec ({differences}); choose another output.dir, or delete "
                         "that directory to start over (only a longer train.max_steps continues a run)")
    if plan.total_steps < stamp["total_steps"]:
        raise EmberError(f"{shown} holds a run of {stamp['total_steps']} steps and this spec asks for "
                         f"{plan.total_steps} (train.max_steps or max_tokens): a run is extended, not shortened; "
                         "choose another output.dir for a shorter run")


def _trajectory_from_spec_yaml(run_dir: RunDir, trajectory: dict) -> dict:
    """The stamp of a run dir written before run.json: what its spec.yaml says (the other parts unknown, taken to
    be the plan's)."""
    spec = yaml.safe_load(storage.read_text(run_dir.spec)) if storage.is_file(run_dir.spec) else None
    known = {**trajectory, "spec": spec_without(spec or {}, HOW_IT_RUNS)}
    return {"identity": identity_of(known), "trajectory": known, "total_steps": 0}


def _differences(old: dict, new: dict) -> list[str]:
    """'key: old → new' for each spec key that differs (URIs as displayed), then the other parts that do."""
    def leaves(value, prefix=""):
        if not isinstance(value, dict):
            return {prefix: value}
        return {k: v for key, sub in value.items() for k, v in leaves(sub, f"{prefix}{key}.").items()} or \
            {prefix: value}

    def shown(value) -> str:
        return storage.display(value) if isinstance(value, str) else json.dumps(value)  # a URI without its query

    before, after = leaves(old.get("spec", {})), leaves(new["spec"])
    out = [f"{key.rstrip('.')}: {shown(before.get(key))} → {shown(after.get(key))}"
           for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    named = {"dataset": "the dataset (its manifest.json)", "model": "the network", "eos_ids": "the end tokens",
             "base_weights": "the base's weights"}
    return out + [what for part, what in named.items() if part in old and old[part] != new[part]]


def resume_path(spec: TrainingJobSpec) -> str | None:
    """The checkpoint `resume: PATH` names, checked to be one (None for auto and never)."""
    if spec.resume in ("auto", "never"):
        return None
    start_from = storage.normalize(spec.resume)
    if not storage.is_file(storage.join(start_from, RunDir.CHECKPOINT_STATE)):
        raise EmberError(f"resume: {storage.display(start_from)} is not an Ember checkpoint (no "
                         f"{RunDir.CHECKPOINT_STATE})")
    return start_from


def _fit(trainer):
    """`trainer.fit()`: a worker's EmberError is raised as itself (Ray Train's WorkerGroupError carries it), and
    Ctrl-C means afterwards what it meant before (fit() installs a SIGINT handler that aborts its controller and
    leaves it installed; `ember demo --keep-serving` serves after training)."""
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except Exception as exc:
        found = find_ember_error(exc)
        if found is not None:
            raise found from None
        raise
    finally:
        if previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)


def _torch_trainer(plan: RunPlan):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ember.train.trainer import train_loop_per_worker

    s, run_dir = plan.spec.scaling, plan.run_dir
    # A bucket: Ray Train writes through Ember's S3 client (its endpoint, retries); a local dir: as a path.
    filesystem, parent = storage.resolve(storage.parent(run_dir)) if storage.is_uri(run_dir) else \
        (None, storage.parent(run_dir))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.to_config(),
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                     resources_per_worker=s.worker_resources(),
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(storage_path=parent, storage_filesystem=filesystem, name=storage.name(run_dir),
                             failure_config=FailureConfig(max_failures=plan.spec.failure.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=plan.spec.train.keep_checkpoints),
                             # Ray Train's set-up and per-rank report lines stay in its log files unless debugging.
                             logging_config=LoggingConfig(log_level="DEBUG" if debugging() else "WARNING"),
                             worker_runtime_env={"env_vars": training_worker_env()}),
    )


def mixture_result(plan: RunPlan, metrics: dict) -> dict:
    """result.json's record of a mixture: its sources (name, dir, weight, share, rows, dataset identity), how it
    ends, and the training tokens each source gave."""
    from ember.data.mixture import tokens_by_source

    return {**plan.mixture, "tokens": tokens_by_source(plan.mixture, int(metrics.get("samples", 0)),
                                                       plan.manifest["seq_len"])}


def check_before_running(plan: RunPlan, address: str | None = None) -> None:
    """What must hold before a run starts anything (the engine's batch arithmetic and offload, the node cache's
    budget, resume and the run dir's own trajectory, the cluster's resources); connects to Ray."""
    spec = plan.spec
    deepspeed_config(spec.train, spec.deepspeed, spec.scaling.workers, spec.scaling.use_gpu)
    check_cache_budget(plan.dataset_dirs, plan.block_bytes)
    refuse_never(spec, plan.run_dir)
    refuse_another_run(plan)
    ensure_ray(address)
    _check_resources(spec)  # before the run dir is touched: a job the cluster can never hold leaves nothing behind


def launch(plan: RunPlan, address: str | None = None) -> dict:
    """Runs the plan on Ray Train (or reuses its finished run); returns the last reported metrics."""
    spec, run_dir = plan.spec, plan.run_dir
    shown = storage.display(run_dir)
    # The batch arithmetic and offload checks, before anything starts.
    deepspeed_config(spec.train, spec.deepspeed, spec.scaling.workers, spec.scaling.use_gpu)
    finished = finished_run(plan)
    if finished is not None:
        log.info("%s: %s already holds this run, finished at step %s (same spec): reusing its model %s (delete the "
                 "directory or choose another output.dir to train again)", plan.kind, shown,
                 finished.get("step"), storage.display(plan.dir.model))
        return finished
    restarting = plan.dir.has_checkpoints()
    check_before_running(plan, address)
    storage.make_dirs(run_dir)
    storage.delete(plan.dir.error)  # result.json stays until training starts (the trainer)
    write_stamp(plan.dir.run, identity_of(plan.trajectory()), trajectory=plan.trajectory(),
                total_steps=plan.total_steps)
    storage.write_text(plan.dir.spec, yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
    cfg, s = plan.model, spec.scaling
    log.info("%s: %s, %d steps of %d %s x %d tokens, %d workers, ZeRO %d, %s%s", plan.kind,
             f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}", plan.total_steps, spec.train.global_batch_size,
             "pairs" if plan.kind == "preference" else "sequences", plan.manifest["seq_len"], s.workers,
             spec.deepspeed.zero_stage, spec.deepspeed.precision,
             "; resuming from the latest checkpoint" if restarting and spec.resume == "auto" else "")
    try:
        result = _fit(_torch_trainer(plan))
        metrics = dict(result.metrics or {})
        error = storage.read_json(plan.dir.error)
        if error is not None:
            raise EmberError(error["error"])
    except BaseException:
        finish_tracking(plan, None, "FAILED")
        raise
    write_stamp(plan.dir.result, plan.identity(), total_steps=plan.total_steps, metrics=metrics,
                **({"mixture": mixture_result(plan, metrics)} if plan.mixture else {}))
    finish_tracking(plan, storage.read_json(plan.dir.result), "FINISHED")
    val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    log.info("%s: done at step %s, loss %.4f%s; model: %s", plan.kind, metrics.get("step"),
             metrics.get("loss", float("nan")), val, storage.display(plan.dir.model))
    return metrics
