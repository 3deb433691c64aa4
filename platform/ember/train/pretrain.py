"""`kind: pretrain`: checks the spec against the dataset and the cluster, then runs Ray Train's TorchTrainer.

Everything that can be wrong before training (dataset, vocabulary, batch arithmetic, resources the cluster can never
give, a run dir that should not be resumed) fails here with one clear message, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import threading
from pathlib import Path

import yaml

from ember.config.specs import PretrainSpec, TrainingJobSpec
from ember.data.shards import load_manifest
from ember.errors import EmberError
from ember.model import ModelConfig, preset
from ember.model.hf import config_from_hf, read_json
from ember.runtime import ensure_ray, find_ember_error
from ember.train.ds_config import deepspeed_config
from ember.train.loop import ERROR_FILE, STATE_FILE, train_loop_per_worker

log = logging.getLogger("ember")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in the run dir


def model_config(spec: PretrainSpec, manifest: dict) -> ModelConfig:
    """The network to train: `init_from`'s config, or the preset with overrides and the dataset's vocabulary."""
    m = spec.model
    if m.init_from:
        path = Path(m.init_from)
        cfg = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    else:
        overrides = {k: v for k, v in m.model_dump(exclude={"preset", "init_from"}).items() if v is not None}
        try:
            cfg = preset(m.preset or "tiny", vocab_size=manifest["vocab_size"], **overrides)
        except KeyError as exc:
            raise EmberError(f"model.preset: {exc.args[0]}") from None
        except ValueError as exc:
            raise EmberError(f"model: {exc}") from None
    if manifest["vocab_size"] > cfg.vocab_size:
        raise EmberError(f"the dataset's tokenizer has {manifest['vocab_size']} tokens but the model's vocabulary "
                         f"holds {cfg.vocab_size} (model.init_from {m.init_from})")
    if manifest["seq_len"] > cfg.max_position_embeddings:
        raise EmberError(f"the dataset's rows are {manifest['seq_len']} tokens long but the model's context is "
                         f"{cfg.max_position_embeddings} (set model.max_position_embeddings or re-tokenize)")
    return cfg


def total_steps(spec: TrainingJobSpec, manifest: dict) -> int:
    t = spec.train
    return t.max_steps or max(1, math.ceil(t.max_tokens / (t.global_batch_size * manifest["seq_len"])))


def _check_resources(spec: TrainingJobSpec) -> None:
    """Fails at once when the cluster can never hold the workers (Ray would otherwise wait for them forever)."""
    import ray

    s = spec.scaling
    total = ray.cluster_resources()
    need = {"CPU": s.cpus_per_worker * s.workers, **{k: v * s.workers for k, v in s.resources_per_worker.items()}}
    if s.use_gpu:
        need["GPU"] = float(s.workers)
    for resource, amount in need.items():
        if total.get(resource, 0) < amount:
            raise EmberError(f"scaling asks for {amount:g} {resource} in all ({s.workers} workers) but the Ray cluster "
                             f"has {total.get(resource, 0):g}; lower scaling.workers or add nodes")


def run_pretrain(spec: PretrainSpec, address: str | None = None) -> dict:
    """Trains on Ray Train with DeepSpeed; returns the last reported metrics. The model is exported to run_dir/model."""
    manifest = load_manifest(spec.data.dir)
    if manifest.get("kind") != "pretrain":
        raise EmberError(f"{spec.data.dir} is a {manifest.get('kind')!r} dataset; pretraining reads 'pretrain' "
                         "datasets")
    if not manifest["splits"]["train"]["rows"]:
        raise EmberError(f"{spec.data.dir} has no training rows")
    cfg = model_config(spec, manifest)
    spec = spec.model_copy(deep=True)  # workers run elsewhere: hand them absolute paths
    spec.data.dir = str(Path(spec.data.dir).expanduser().resolve())
    if spec.model.init_from:
        spec.model.init_from = str(Path(spec.model.init_from).expanduser().resolve())
    return launch(spec, cfg, manifest, spec.data.dir, address)


RESULT_FILE = "result.json"  # written when a run finishes: its spec, length and last metrics


def _identity(spec: TrainingJobSpec, manifest: dict, extra: dict | None) -> dict:
    """What makes two runs the same run: the spec (without how to resume), the dataset's manifest (a dataset rebuilt
    in the same dir is other data) and what the caller adds."""
    data = json.loads(spec.model_dump_json())
    data.pop("resume", None)
    dataset = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
    return {"spec": data, "dataset": dataset, "extra": json.loads(json.dumps(extra or {}, default=str))}


def finished_run(run_dir: Path, spec: TrainingJobSpec, manifest: dict, extra: dict | None) -> dict | None:
    """The last metrics of a run that finished in run_dir with this same spec and data and exported its model."""
    try:
        result = json.loads((run_dir / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if result.get("identity") != _identity(spec, manifest, extra) or not (run_dir / "model" / "config.json").is_file():
        return None
    return result.get("metrics") or {}


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


def launch(spec: TrainingJobSpec, cfg: ModelConfig, manifest: dict, data_dir: str, address: str | None,
           extra: dict | None = None) -> dict:
    """Runs the training loop of a pretrain or finetune spec on Ray Train; returns the last reported metrics."""
    steps = total_steps(spec, manifest)
    deepspeed_config(spec.train, spec.deepspeed, spec.scaling.workers)  # batch arithmetic and offload checks
    run_dir = Path(spec.output.dir).expanduser().resolve()
    spec = spec.model_copy(deep=True)
    spec.output.dir = str(run_dir)
    finished = finished_run(run_dir, spec, manifest, extra)
    if finished is not None:
        log.info("%s: %s already holds this run, finished at step %s (same spec): reusing its model %s (delete the "
                 "directory or choose another output.dir to train again)", spec.kind, run_dir,
                 finished.get("step"), run_dir / "model")
        return finished
    restarting = (run_dir / SNAPSHOT).is_file()
    start_from = None
    if spec.resume == "never" and restarting:
        raise EmberError(f"{run_dir} holds checkpoints of an earlier run and resume is 'never'; set resume: auto to "
                         "continue it, or choose another output.dir")
    if spec.resume not in ("auto", "never"):
        start_from = Path(spec.resume).expanduser().resolve()
        if not (start_from / STATE_FILE).is_file():
            raise EmberError(f"resume: {start_from} is not an Ember checkpoint (no ember_state.json)")
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(address)
    _check_resources(spec)
    s = spec.scaling
    log.info("%s: %s, %d steps of %d sequences x %d tokens, %d workers, ZeRO %d, %s%s", spec.kind,
             f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}", steps,
             spec.train.global_batch_size, manifest["seq_len"], s.workers, spec.deepspeed.zero_stage,
             spec.deepspeed.precision, "; resuming from the latest checkpoint" if restarting and spec.resume == "auto"
             else "")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": json.loads(spec.model_dump_json()), "model_config": cfg.to_dict(),
                           "run_dir": str(run_dir), "total_steps": steps, "data_dir": data_dir,
                           "start_from": str(start_from) if start_from else None, **(extra or {})},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker,
                                                           **({"GPU": 1} if s.use_gpu else {})},
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(storage_path=str(run_dir.parent), name=run_dir.name,
                             failure_config=FailureConfig(max_failures=spec.failure.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints)),
    )
    result = _fit(trainer)
    metrics = dict(result.metrics or {})
    if (run_dir / ERROR_FILE).is_file():
        raise EmberError(json.loads((run_dir / ERROR_FILE).read_text())["error"])
    (run_dir / RESULT_FILE).write_text(json.dumps({"identity": _identity(spec, manifest, extra), "total_steps": steps,
                                                   "metrics": metrics}, indent=1, default=str))
    val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
    log.info("%s: done at step %s, loss %.4f%s; model: %s", spec.kind, metrics.get("step"),
             metrics.get("loss", float("nan")), val, run_dir / "model")
    return metrics
