"""`kind: pretrain` on Ray Train with DeepSpeed (gloo on CPU): exact resume, recovery from a killed worker, ZeRO
sharding, export, and the errors a spec can hit before any worker starts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from conftest import (
    OPS_AT_START,
    free_port,
    kill_a_worker_once_checkpointed,
    merged,
    rebuilt_deepspeed_ops,
    sentences,
    train_worker_pids,
)
from ember import storage
from ember.config import parse_spec
from ember.errors import EmberError
from ember.model import load_model
from ember.train.pretrain import run_pretrain

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, ray_session) -> Path:
    """A small tokenized corpus: seq_len 32, vocab 320."""
    from ember.data.pipeline import run_tokenize

    root = tmp_path_factory.mktemp("pretrain-data")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(3000, seed=42)))
    run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": [str(root / "corpus.jsonl")]},
                             "tokenizer": {"vocab_size": 320}, "pack": {"seq_len": 32, "val_fraction": 0.05},
                             "output": {"dir": str(root / "ds")}}))
    return root / "ds"


def spec(dataset: Path, run_dir: Path, **sections) -> dict:
    data = {"kind": "pretrain", "data": {"dir": str(dataset)},
            "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                      "num_key_value_heads": 2},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 8, "lr": 3e-3, "min_lr": 3e-4,
                      "warmup_steps": 2, "log_every": 1, "eval_every": 4, "eval_batches": 2, "checkpoint_every": 4},
            "deepspeed": {"zero_stage": 2}, "scaling": {"workers": 2}, "output": {"dir": str(run_dir)}}
    return merged(data, **sections)


def train(*args, **kw) -> dict:
    return run_pretrain(parse_spec(spec(*args, **kw)))


def rows(run_dir: Path | str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]


def checkpoint_states(run_dir: str) -> dict[int, dict]:
    """Step -> ember_state.json of each checkpoint Ray Train keeps in a run dir (a path or a URI)."""
    states = [storage.read_json(storage.join(run_dir, name, "ember_state.json"))
              for name in storage.list_names(run_dir) if name.startswith("checkpoint_2")]
    return {state["step"]: state for state in states}


@pytest.fixture(scope="session")
def reference_run(dataset, tmp_path_factory) -> Path:
    """8 uninterrupted steps, ZeRO 2, 2 workers; metrics also to TensorBoard."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    train(dataset, run_dir, train={"decay_steps": 8, "tensorboard": True})
    return run_dir


def test_a_run_logs_metrics_checkpoints_and_exports_a_model(reference_run):
    metrics = rows(reference_run)
    assert [r["step"] for r in metrics] == list(range(1, 9))
    assert [r["samples"] for r in metrics] == [8 * s for s in range(1, 9)]
    assert all(r["tokens"] == r["samples"] * 32 and r["tokens_per_s"] > 0 for r in metrics)
    assert "val_loss" in metrics[3] and "val_ppl" in metrics[7] and "val_loss" not in metrics[4]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[1]["lr"] == pytest.approx(3e-3) and metrics[-1]["lr"] == pytest.approx(3e-4)
    checkpoints = sorted(reference_run.glob("checkpoint_2*"))
    assert len(checkpoints) == 2
    state = json.loads((checkpoints[-1] / "ember_state.json").read_text())
    assert state["step"] == 8 and state["samples"] == 64 and state["spec"]["kind"] == "pretrain"
    shards = sorted(p.name for p in (checkpoints[-1] / "deepspeed").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards  # each rank's optimizer shard
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    model = load_model(reference_run / "model")
    assert model.config.hidden_size == 32 and (reference_run / "model" / "tokenizer.json").is_file()


def test_a_finished_run_is_reused_and_reported(dataset, reference_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ember.runs.report import write_report

    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()}
    metrics = train(dataset, reference_run, train={"decay_steps": 8, "tensorboard": True})  # the same spec again
    assert metrics["step"] == 8 and metrics["loss"] == rows(reference_run)[-1]["loss"]
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*") if p.is_file()} == before, "nothing retrained"

    # TensorBoard events hold what metrics.jsonl holds.
    events = EventAccumulator(str(reference_run / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows(reference_run)]
    assert [e.step for e in events.Scalars("train/val_loss")] == [4, 8]

    summary = write_report(reference_run)
    assert "steps: 8 of 8, 2,048 tokens seen" in summary and "validation loss:" in summary
    for name in ("loss.png", "learning_rate.png", "tokens_per_second.png"):
        png = (reference_run / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (reference_run / "report" / "summary.txt").read_text().startswith(f"run: {reference_run}")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(EmberError, match=r"metrics.jsonl:2: not JSON"):
        write_report(broken)
    with pytest.raises(EmberError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_a_resumed_run_repeats_the_same_losses_and_samples(dataset, reference_run, tmp_path):
    """The reference run's step-4 checkpoint resumed in another run dir (`resume: PATH`, the same 2 workers) repeats
    its steps 5-8 exactly. (A run dir run again continues its own latest checkpoint: the killed-worker test here and
    the demo test, which trains on from its last step.)"""
    run_dir = tmp_path / "resumed"
    train(dataset, run_dir, train={"decay_steps": 8}, resume=str(at_step(reference_run, 4)))
    reference, resumed = rows(reference_run)[4:], rows(run_dir)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["samples"] for r in resumed] == [r["samples"] for r in reference]
    for a, b in zip(reference, resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    [restore] = [json.loads(line) for line in (run_dir / "restores.jsonl").read_text().splitlines()]
    assert restore["source"] == "resume_path" and restore["step"] == 4 and restore["superseded"] == []


def test_zero_3_shards_parameters_and_zero_1_2_shard_optimizer_state(dataset, reference_run, tmp_path):
    n_params = sum(p.numel() for p in load_model(reference_run / "model").parameters())
    zero2 = rows(reference_run)[0]["zero_partitions"]
    assert zero2["params"] == [n_params, n_params]
    assert all(abs(o - n_params / 2) <= 2 for o in zero2["optimizer"])  # half the master weights each
    # Stage 3 with parameters and optimizer states offloaded to CPU memory (DeepSpeed's CPU Adam).
    train(dataset, tmp_path / "z3", deepspeed={"zero_stage": 3, "offload_params": True, "offload_optimizer": True},
          train={"decay_steps": 8})
    zero3 = rows(tmp_path / "z3")[0]["zero_partitions"]
    assert all(abs(p - n_params / 2) <= 64 for p in zero3["params"]) and sum(zero3["params"]) >= n_params
    # DeepSpeed's CPU Adam on the offloaded fp32 master weights does the arithmetic of ZeRO 2's Adam, up to the
    # order of the sums: the same losses step by step.
    for a, b in zip(rows(reference_run), rows(tmp_path / "z3"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    assert_grad_norms(rows(tmp_path / "z3"), rows(reference_run))
    exported = load_model(tmp_path / "z3" / "model")  # ZeRO-3 shards gathered into a whole model
    assert sum(p.numel() for p in exported.parameters()) == n_params
    # Its parameter and optimizer partitions re-cut for one worker continue the same losses.
    train(dataset, tmp_path / "z3-one", deepspeed={"zero_stage": 3, "offload_params": True, "offload_optimizer": True},
          train={"decay_steps": 8}, scaling={"workers": 1}, resume=str(at_step(tmp_path / "z3", 4)))
    for a, b in zip(rows(tmp_path / "z3")[4:], rows(tmp_path / "z3-one"), strict=True):
        assert a["step"] == b["step"] and a["samples"] == b["samples"] and abs(a["loss"] - b["loss"]) < 5e-4


def test_zero_buckets_are_scaled_to_the_model_unless_the_spec_sets_them(tmp_path):
    """DeepSpeed's own bucket sizes (5e8 elements, 1e9 live parameters) exceed models under a few billion
    parameters; Ember's defaults follow the model, and DeepSpeed's config model reads them under these names."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from ember.train.ds_config import bucket_sizes, deepspeed_config

    def zero(stage: int, **keys) -> DeepSpeedZeroConfig:
        s = parse_spec(spec(tmp_path, tmp_path / "run", deepspeed={"zero_stage": stage, **keys}))
        section = deepspeed_config(s.train, s.deepspeed, 2, use_gpu=False)["zero_optimization"]
        section.update(bucket_sizes(s.deepspeed, hidden_size=768, layer_params=7_000_000))
        return DeepSpeedZeroConfig(**section)

    assert bucket_sizes(parse_spec(spec(tmp_path, tmp_path / "run", deepspeed={"zero_stage": 0})).deepspeed,
                        768, 7_000_000) == {}
    two = zero(2)
    assert (two.reduce_bucket_size, two.allgather_bucket_size) == (768 ** 2, 768 ** 2)
    three = zero(3)
    assert (three.reduce_bucket_size, three.prefetch_bucket_size, three.param_persistence_threshold,
            three.max_live_parameters, three.max_reuse_distance) == (768 ** 2, int(0.9 * 768 ** 2), 7680,
                                                                     14_000_000, 7_000_000)
    chosen = zero(3, reduce_bucket_size=5000, stage3_param_persistence_threshold=0, stage3_max_live_parameters=10**9,
                  stage3_max_reuse_distance=0)
    assert (chosen.reduce_bucket_size, chosen.param_persistence_threshold, chosen.max_live_parameters,
            chosen.max_reuse_distance) == (5000, 0, 10**9, 0)
    with pytest.raises(Exception, match="reduce_bucket_size"):
        parse_spec(spec(tmp_path, tmp_path / "run", deepspeed={"reduce_bucket_size": 0}))


def first_step_grad_norm(dataset: Path) -> float:
    """The gradient norm of the spec's first step in plain PyTorch: its initial weights (the seed's), the first
    global batch (samples 0-7 of the global order: the mean of equal-length rows' mean losses is the mean over all),
    one backward and `torch.nn.utils.clip_grad_norm_`'s total norm."""
    from ember.data.shards import ShardReader
    from ember.model import build_model
    from ember.train.pretrain import plan_pretrain
    from ember.train.recipes import next_token_loss

    plan = plan_pretrain(parse_spec(spec(dataset, dataset.parent / "unused")))
    torch.manual_seed(plan.spec.train.seed)
    model = build_model(plan.model, "cpu", torch.float32)
    reader = ShardReader(dataset, "train", seed=plan.spec.train.seed)
    batch = torch.as_tensor(np.stack([reader.row(reader.sample_row(k)) for k in range(8)]), dtype=torch.long)
    next_token_loss(model, batch).backward()
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), plan.spec.train.grad_clip))


def assert_grad_norms(run: list[dict], reference: list[dict]) -> None:
    """Each step's logged gradient norm is the reference run's (the same arithmetic, up to the order of sums)."""
    for a, b in zip(reference, run, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a["step"], a["grad_norm"], b["grad_norm"])


def test_zero_stage_0_trains_to_the_losses_of_stage_2(dataset, reference_run, tmp_path):
    """Stage 0 (plain data parallelism) does the arithmetic of stage 2 up to the order of the sums. (Stage 1 is shown
    in the killed-worker run.) The gradient norm each stage logs is torch's `clip_grad_norm_` of the same step
    (stage 0's engine keeps none: the loop measures it there)."""
    train(dataset, tmp_path / "z0", deepspeed={"zero_stage": 0}, train={"decay_steps": 8})
    for a, b in zip(rows(reference_run), rows(tmp_path / "z0"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    expected = first_step_grad_norm(dataset)
    assert expected > 0 and rows(reference_run)[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert rows(tmp_path / "z0")[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert_grad_norms(rows(tmp_path / "z0"), rows(reference_run))


def test_a_killed_worker_restarts_from_the_latest_checkpoint(dataset, reference_run, s3_server, mlflow_server,
                                                             tmp_path, tmp_path_factory, ray_session):
    """SIGKILL one training worker (found through Ray's state API) once Ray Train has taken in a checkpoint past the
    start: Ray Train restarts the workers, they restore its latest checkpoint (recorded in restores.jsonl), redo the
    steps the killed attempt had logged with the same losses, and finish. ZeRO 1 with activation recomputation: its
    first 8 steps are also the reference run's (ZeRO 2) up to the order of the sums. The run dir is a bucket prefix:
    the checkpoints the new workers restore are the ones Ray Train uploaded there. The run is tracked in a real
    MLflow server: one MLflow run across the restart, each step's metrics once, the spec and the dataset as params,
    the model and result.json as artifacts. And in W&B's offline mode: each attempt writes an offline run of the one
    run id, and between them each step is logged once."""
    bucket, endpoint, _ = s3_server
    run_dir = f"s3://{bucket}/pretrain/killed-{tmp_path.name}?endpoint_override={endpoint}&scheme=http"
    killed = {}
    wandb_dir = tmp_path_factory.mktemp("wandb-killed")

    def registered_steps() -> list[int]:
        """The checkpoints Ray Train's controller has taken in (its snapshot in the run dir)."""
        snapshot = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json")) or {}
        return [c["metrics"]["step"] for c in snapshot.get("checkpoint_results", [])]

    killer = threading.Thread(target=kill_a_worker_once_checkpointed,
                              args=(run_dir, train_worker_pids, killed, 8, 24), daemon=True)
    killer.start()
    result = train(dataset, run_dir, train={"max_steps": 24, "decay_steps": 8, "checkpoint_every": 4,
                                            "keep_checkpoints": 3, "eval_every": 0,
                                            "tracking": {"mlflow": {"tracking_uri": mlflow_server,
                                                                    "experiment": "killed"},
                                                         "wandb": {"project": "ember-test", "mode": "offline",
                                                                   "dir": str(wandb_dir)}}},
                   deepspeed={"zero_stage": 1, "activation_checkpointing": True}, failure={"max_failures": 2})
    killer.join()
    assert killed and killed["registered"] < killed["at"] < 24, killed  # (the thread gives up after 300 s)
    assert killed["nice"] == 0  # Ray starts workers at nice 15; Ember's training workers at 0 (training_worker_env)
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, 25))  # every step once: rows after the restore point redone
    assert [r["samples"] for r in metrics] == [8 * s for s in range(1, 25)]
    [restore] = [json.loads(line) for line in storage.read_text(storage.join(run_dir, "restores.jsonl")).splitlines()]
    assert restore["source"] == "latest" and killed["registered"] <= restore["step"] < killed["at"]
    assert restore["samples"] == 8 * restore["step"]
    superseded = [r["step"] for r in restore["superseded"]]  # what the killed attempt had logged past the restore
    assert superseded == list(range(restore["step"] + 1, restore["step"] + 1 + len(superseded)))
    assert superseded and superseded[-1] >= killed["at"]
    redone = {r["step"]: r["loss"] for r in metrics}
    for before in restore["superseded"]:
        assert abs(before["loss"] - redone[before["step"]]) < 1e-5, before  # the same steps again
    for a, b in zip(rows(reference_run), metrics[:8]):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    assert_grad_norms(metrics[:8], rows(reference_run))  # ZeRO 1's norms
    # Checkpoints every 4 steps; train.keep_checkpoints: 3 keeps the newest three, across the restart.
    kept = sorted(checkpoint_states(run_dir))
    assert kept[-3:] == [16, 20, 24] and sorted(registered_steps()) == [16, 20, 24]
    assert not list(tmp_path.iterdir())  # nothing of the run on local disk

    assert result["step"] == 24
    assert_one_mlflow_run_across_the_restart(mlflow_server, run_dir, dataset, redone)
    assert_one_wandb_run_id_across_the_restart(wandb_dir, run_dir, redone)


def assert_one_mlflow_run_across_the_restart(mlflow_server: str, run_dir: str, dataset, redone: dict) -> None:
    """MLflow, through its REST API: one run, through the restart; each step logged once, with the losses of
    the steps as redone; the spec and dataset as params; the model and result.json as artifacts."""
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "killed"}).json()
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment"]["experiment_id"]]})
    [run] = runs.json()["runs"]
    assert run["info"]["status"] == "FINISHED"
    assert storage.read_json(storage.join(run_dir, "tracking.json"))["mlflow"]["run_id"] == run["info"]["run_id"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    manifest = storage.read_json(storage.join(dataset, "manifest.json"))
    assert params["train.max_steps"] == "24" and params["deepspeed.zero_stage"] == "1"
    assert params["data.identity"] == manifest["identity"]
    assert params["data.tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    history = requests.get(f"{api}/metrics/get-history", params={"run_id": run["info"]["run_id"],
                                                                 "metric_key": "loss", "max_results": 1000})
    logged = sorted((m["step"], m["value"]) for m in history.json()["metrics"])
    assert [step for step, _ in logged] == list(range(1, 25))  # each step once, across the restart
    assert all(abs(value - redone[step]) < 1e-6 for step, value in logged)
    artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"]}).json()
    assert {"model", "result.json"} <= {f["path"] for f in artifacts["files"]}
    model_files = requests.get(f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"], "path": "model"})
    assert "model/config.json" in {f["path"] for f in model_files.json()["files"]}


def assert_one_wandb_run_id_across_the_restart(wandb_dir, run_dir: str, redone: dict) -> None:
    """W&B: an offline run per attempt, all of the one id. The latest holds every step once (the rows the run
    dir kept, then the rest); the killed one a prefix of them (what W&B had flushed of its file before the
    kill)."""
    run_id = storage.read_json(storage.join(run_dir, "tracking.json"))["wandb"]["id"]
    attempts = sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(attempts) == 2 == len(list((wandb_dir / "wandb").glob("offline-run-*")))
    def history(path) -> list[dict]:
        return [{(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]

    first, latest = map(history, attempts)
    assert [h["_step"] for h in latest] == list(range(1, 25))
    assert [h["_step"] for h in first] == list(range(1, len(first) + 1))
    assert all(h["loss"] == pytest.approx(redone[h["_step"]]) for h in first + latest)


def test_an_unreachable_tracking_server_is_a_warning_or_with_required_an_error(dataset, tmp_path, caplog):
    """Planned on the driver, before any worker: the run trains untracked after one warning naming the server, or,
    with `tracking.required`, stops with an error naming it."""
    from ember.train.pretrain import plan_pretrain

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracked = {"tracking": {"mlflow": {"tracking_uri": uri}}}
    with caplog.at_level("WARNING", logger="ember"):
        plan = plan_pretrain(parse_spec(spec(dataset, tmp_path / "r", train=tracked)))
    assert plan.spec.train.tracking.mlflow is None  # the workers do not try again
    [warning] = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert f"cannot reach {uri}" in warning and "goes on untracked" in warning
    with pytest.raises(EmberError, match=rf"train\.tracking\.mlflow\.tracking_uri: cannot reach {uri}.*"
                                         r"tracking\.required"):
        plan_pretrain(parse_spec(spec(dataset, tmp_path / "r", train={"tracking": {**tracked["tracking"],
                                                                                   "required": True}})))
    with pytest.raises(EmberError, match="credentials .* do not belong in a spec.*MLFLOW_TRACKING_USERNAME"):
        parse_spec(spec(dataset, tmp_path / "r", train={"tracking": {"mlflow": {
            "tracking_uri": "http://user:secret@127.0.0.1:5000"}}}))


def test_errors_before_any_worker_starts(dataset, tmp_path):
    with pytest.raises(EmberError, match="not a dataset directory"):
        train(tmp_path / "nowhere", tmp_path / "r")
    with pytest.raises(EmberError, match=r"global_batch_size \(10\) must be a multiple of .* \(2 × 2 = 4\)"):
        train(dataset, tmp_path / "r", train={"global_batch_size": 10})
    with pytest.raises(EmberError, match=r"scaling asks for 8 CPU in all \(8 × \{CPU 1\}\) but the Ray cluster has 2 "
                                         "and no autoscaler to add nodes; lower scaling.workers"):
        train(dataset, tmp_path / "r", scaling={"workers": 8}, train={"global_batch_size": 16})
    with pytest.raises(EmberError, match="the dataset's tokenizer has 320 tokens but the model's vocabulary holds 100"):
        small = tmp_path / "small-model"
        from ember.model import Transformer, preset, save_model

        save_model(Transformer(preset("tiny", vocab_size=100)), small)
        train(dataset, tmp_path / "r", model={"init_from": str(small)})
    with pytest.raises(EmberError, match="rows are 32 tokens long but the model's context is 16"):
        train(dataset, tmp_path / "r", model={"max_position_embeddings": 16})
    with pytest.raises(EmberError, match="set exactly one of train.max_steps and train.max_tokens"):
        parse_spec(spec(dataset, tmp_path / "r", train={"max_tokens": 1000}))


def test_an_ember_error_inside_a_worker_reaches_the_driver_as_itself(dataset, tmp_path):
    """A shard the manifest lists is gone: the workers' ShardReader raises EmberError, and the driver raises that same
    error, found among the objects Ray Train's WorkerGroupError carries (not parsed from its text)."""
    import shutil

    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    gone = sorted((broken / "train").glob("*.arrow"))[0]
    gone.unlink()
    with pytest.raises(EmberError) as caught:
        train(broken, tmp_path / "r", failure={"max_failures": 0})
    assert str(caught.value) == f"shard listed in the manifest is missing: {gone}"


def test_a_non_finite_loss_stops_the_run_naming_the_step(dataset, tmp_path):
    with pytest.raises(EmberError, match=r"the (training loss|gradient norm) is (nan|inf) at step \d+; stopped there"):
        train(dataset, tmp_path / "nan", train={"lr": 1e30, "min_lr": 1e29, "warmup_steps": 0, "grad_clip": 0,
                                                "max_steps": 6, "checkpoint_every": 1})
    # The run says where it stopped (error.json is data); every step before it was checkpointed and stays, the
    # latest one at the step before, with its DeepSpeed state.
    failed_at = json.loads((tmp_path / "nan" / "error.json").read_text())["step"]
    kept = sorted(json.loads((p / "ember_state.json").read_text())["step"]
                  for p in (tmp_path / "nan").glob("checkpoint_2*"))
    assert failed_at >= 2 and kept and kept[-1] == failed_at - 1
    assert (at_step(tmp_path / "nan", kept[-1]) / "deepspeed").is_dir()


def at_step(run_dir: Path, step: int) -> Path:
    return next(p for p in run_dir.glob("checkpoint_2*")
                if json.loads((p / "ember_state.json").read_text())["step"] == step)


class CachePeak:
    """The most bytes a node cache held of the files under one location while the block ran (sampled every 50 ms
    in a thread; the cache's records name what each file is a copy of)."""

    def __init__(self, cache: Path, under: str):
        self.cache, self.under, self.bytes, self.done = cache, under, 0, threading.Event()

    def watch(self) -> None:
        while not self.done.is_set():
            total = 0
            for record in self.cache.glob("files/*/*.arrow.json"):
                try:
                    if self.under in json.loads(record.read_text())["location"]:
                        total += record.with_name(record.name[: -len(".json")]).stat().st_size
                except (FileNotFoundError, ValueError):  # evicted, or being written, while listed
                    pass
            self.bytes = max(self.bytes, total)
            self.done.wait(0.05)

    def __enter__(self):
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def test_a_killed_worker_mid_mixture_resumes_to_the_same_per_source_counts(dataset, s3_server, tmp_path,
                                                                           monkeypatch):
    """Two datasets in a bucket (the same tokenizer, small shards), mixed 3:1 and streamed through a node cache
    whose budget is smaller than either: SIGKILL a worker once a checkpoint is in; the restarted workers restore
    it and redo the killed attempt's steps with the same losses, every step's tokens per source are the mixture's
    at its sample count, the cache never went over its budget, and result.json records the mixture."""
    from ember.data.mixture import Mixture
    from ember.data.pipeline import run_tokenize

    bucket, endpoint, _ = s3_server
    uri = f"s3://{bucket}/mixture-{tmp_path.name}/{{}}?endpoint_override={endpoint}&scheme=http"
    for name, seed in (("web", 3), ("code", 4)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in sentences(1500, seed=seed)))
        run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": [str(tmp_path / f"{name}.jsonl")],
                                                                "unit_bytes": 16384},
                                 "tokenizer": {"path": str(dataset / "tokenizer.json")},
                                 "pack": {"seq_len": 32, "val_fraction": 0.05, "shard_bytes": 4096},
                                 "output": {"dir": uri.format(name)}}))
    sizes = [storage.read_json(storage.join(uri.format(n), "manifest.json"))["splits"]["train"] for n in ("web",
                                                                                                     "code")]
    budget = 24 * 4096
    assert all(sum(s["bytes"] for s in split["shards"]) > budget for split in sizes)  # each larger than the cache
    monkeypatch.setenv("EMBER_CACHE_BYTES", str(budget))  # the driver's budget reaches the workers
    run_dir = tmp_path / "run"
    killed = {}

    killer = threading.Thread(target=kill_a_worker_once_checkpointed,
                              args=(str(run_dir), train_worker_pids, killed, 4, 12), daemon=True)
    killer.start()
    mix = [{"dir": uri.format("web"), "weight": 3}, {"dir": uri.format("code"), "weight": 1}]
    with CachePeak(storage.cache_dir(), f"mixture-{tmp_path.name}/") as peak:
        result = train(dataset, run_dir, data={"dir": None, "mix": mix, "shuffle_block_bytes": 3 * 4096},
                       train={"max_steps": 12, "checkpoint_every": 4, "eval_every": 6}, failure={"max_failures": 1})
    killer.join()
    assert killed and killed["registered"] < killed["at"] < 12, killed
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, 13))
    [restore] = [json.loads(line) for line in (run_dir / "restores.jsonl").read_text().splitlines()]
    redone = {r["step"]: r["loss"] for r in metrics}
    assert restore["superseded"] and all(abs(b["loss"] - redone[b["step"]]) < 1e-5 for b in restore["superseded"])
    for r in metrics:
        web, code = Mixture([3, 1]).counts(r["samples"])
        assert (r["tokens/web"], r["tokens/code"]) == (32 * web, 32 * code)
    stamp = json.loads((run_dir / "result.json").read_text())
    assert [s["name"] for s in stamp["mixture"]["sources"]] == ["web", "code"]
    assert stamp["mixture"]["tokens"] == {"web": metrics[-1]["tokens/web"], "code": metrics[-1]["tokens/code"]}
    assert stamp["mixture"]["exhausted"] == "stop" and result["step"] == 12
    assert json.loads((run_dir / "progress.json").read_text())["source_tokens"] == stamp["mixture"]["tokens"]
    assert 0 < peak.bytes <= budget


def test_a_checkpoint_of_2_workers_resumes_on_1_worker_in_the_same_global_order(dataset, reference_run, s3_server,
                                                                                  tmp_path):
    """ZeRO-2 optimizer shards of 2 ranks are re-cut for 1 rank (DeepSpeed's universal checkpoint); the one worker
    takes the global samples the two would have taken, so the losses follow the uninterrupted 2-worker run. Its run
    dir is a bucket prefix: Ray Train uploads the checkpoints there, rank 0 the metrics and the model, and the
    finished run is recognised there and reused; `ember report` reads it from there and writes the report beside it."""
    from ember.runs.report import write_report

    bucket, endpoint, client = s3_server
    run_dir = f"s3://{bucket}/pretrain/one-worker-{tmp_path.name}?endpoint_override={endpoint}&scheme=http"
    one_worker = {"train": {"decay_steps": 8}, "scaling": {"workers": 1}, "resume": str(at_step(reference_run, 4))}
    train(dataset, run_dir, **one_worker)
    reference, resumed = rows(reference_run)[4:], rows(run_dir)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [r["samples"] for r in resumed] == [r["samples"] for r in reference]
    for a, b in zip(reference, resumed):  # the same arithmetic up to the order of the gradient sums
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
    states = checkpoint_states(run_dir)
    assert states[8]["world_size"] == 1
    keys = {o["Key"].split("/", 2)[2] for o in client.list_objects_v2(
        Bucket=bucket, Prefix=f"pretrain/one-worker-{tmp_path.name}/")["Contents"]}
    assert {"spec.yaml", "result.json", "restores.jsonl", "progress.json", "model/config.json",
            "model/model.safetensors", "model/tokenizer.json"} <= keys
    assert load_model(storage.join(run_dir, "model")).config.num_hidden_layers == 2
    before = storage.list_files(run_dir)
    assert train(dataset, run_dir, **one_worker)["step"] == 8 and storage.list_files(run_dir) == before  # reused
    summary = write_report(run_dir)
    assert summary.startswith(f"run: {storage.display(run_dir)} (pretrain)") and "steps: 8 of 8" in summary
    assert storage.read_bytes(storage.join(run_dir, "report", "loss.png"))[:4] == b"\x89PNG"
    assert not list(tmp_path.iterdir())  # nothing of the run was written locally
    [restore] = [json.loads(x) for x in storage.read_text(storage.join(run_dir, "restores.jsonl")).splitlines()]
    assert restore["source"] == "resume_path" and restore["converted_by_ranks"] == [0]

    # And back: the 1-worker checkpoint re-cut for 2 workers on this one node is converted once (by whichever rank
    # took the node's lock first; the other waited and loaded the same files), and the converted files are gone
    # once both ranks have loaded them.
    two = tmp_path / "two-workers"
    train(dataset, two, train={"max_steps": 9, "decay_steps": 8}, resume=storage.join(run_dir, next(
        n for n in storage.list_names(run_dir) if n.startswith("checkpoint_2"))))
    [restore] = [json.loads(x) for x in (two / "restores.jsonl").read_text().splitlines()]
    assert restore["checkpoint_world_size"] == 1 and restore["world_size"] == 2 and restore["step"] == 8
    assert len(restore["converted_by_ranks"]) == 1
    assert [r["step"] for r in rows(two)] == [9] and rows(two)[0]["samples"] == 72
    assert not list((storage.cache_dir() / "universal").glob("*/converted.json"))


def test_evaluate_gives_the_perplexity_of_a_model_on_a_dataset(dataset, reference_run, tmp_path):
    from ember.eval.evaluate import run_evaluate

    spec = {"kind": "evaluate", "models": {"trained": str(reference_run / "model")},
            "data": {"dir": str(dataset), "split": "val", "batches": 2, "batch_size": 2},
            "output": {"file": str(tmp_path / "eval.json")}}
    results = run_evaluate(parse_spec(spec))
    figures = results["trained"]["dataset"]
    assert figures["rows"] == 4 and figures["target_tokens"] == 4 * 32
    assert figures["perplexity"] == pytest.approx(2.718281828 ** figures["loss"], rel=1e-6)
    # transformers' own Llama on the same rows (the val split's first 4, in file order) gives the same loss; and on
    # the 8 rows the training run's last evaluation read (its seeded order, 2 ranks × 2 batches × 2), the run's
    # val_loss: the exported model is the one training evaluated.
    from transformers import LlamaForCausalLM

    from ember.data.shards import ShardReader

    hf = LlamaForCausalLM.from_pretrained(reference_run / "model").eval()
    reader = ShardReader(dataset, "val", seed=0)

    def hf_loss(indices) -> float:
        ids = torch.from_numpy(np.stack([reader.row(i) for i in indices]).astype("int64"))
        with torch.no_grad():
            return float(hf(input_ids=ids, labels=ids).loss)

    assert abs(figures["loss"] - hf_loss(range(4))) < 1e-5
    assert abs(rows(reference_run)[-1]["val_loss"] - hf_loss([reader.sample_row(k) for k in range(8)])) < 1e-5

    # The same spec, models and data again: the results are reused, not recomputed; another spec recomputes.
    written = (tmp_path / "eval.json").stat().st_mtime_ns
    assert run_evaluate(parse_spec(spec)) == results and (tmp_path / "eval.json").stat().st_mtime_ns == written
    spec["data"]["batches"] = 1
    assert run_evaluate(parse_spec(spec))["trained"]["dataset"]["rows"] == 2


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): LevelDB-log framing (32 KiB blocks, 7-byte record headers:
    CRC, length, type) after a 7-byte ':W&B' file header, each record a `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, records, pending, offset = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += 32768 - offset % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL, or the LAST piece of a record split across blocks
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_continued_pretraining_of_a_qwen3_model_starts_from_its_weights_and_exports_qwen3(dataset, tmp_path):
    """`model.init_from` a Qwen3 dir saved by transformers (q/k norms, an explicit head_dim), trained 2 steps at a
    learning rate too small to move a weight measurably: the export is a Qwen3 dir that transformers loads as
    Qwen3ForCausalLM, with the base's logits (its weights, norms included, were the ones trained) and Ember's. The
    run is tracked in W&B's offline mode: its run file holds the spec as config and each metrics row at its step;
    nothing is sent (no API key exists here)."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    base = tmp_path / "qwen3"
    torch.manual_seed(5)
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=None,
                                      eos_token_id=None)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    hf.save_pretrained(base)
    wandb_dir = tmp_path / "wandb-runs"
    train(dataset, tmp_path / "r", model={"init_from": str(base)}, scaling={"workers": 1},
          train={"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-9, "min_lr": 0,
                 "warmup_steps": 0, "eval_every": 2, "checkpoint_every": 2,
                 "tracking": {"wandb": {"project": "ember-test", "mode": "offline", "dir": str(wandb_dir)}}})
    metrics = rows(tmp_path / "r")
    assert [r["step"] for r in metrics] == [1, 2]

    run_id = json.loads((tmp_path / "r" / "tracking.json").read_text())["wandb"]["id"]
    [run_file] = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = wandb_records(run_file)
    def items(updates) -> dict:
        return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for logged, row in zip(history, metrics):
        assert logged["loss"] == pytest.approx(row["loss"]) and logged["lr"] == pytest.approx(row["lr"])
    assert "val_loss" in history[1]
    [config] = [items(r.run.config.update) for r in records if r.WhichOneof("record_type") == "run"]
    assert config["train.max_steps"] == "2" and config["model_config.model_type"] == "qwen3"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "model").eval()
    assert type(exported) is Qwen3ForCausalLM and exported.config.head_dim == 16
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        theirs = exported(ids).logits
        assert torch.allclose(theirs, hf(ids).logits, atol=1e-3)
        assert torch.allclose(theirs, load_model(tmp_path / "r" / "model")(ids), atol=1e-4)


def test_resume_honours_never_and_checks_the_path(dataset, reference_run):
    with pytest.raises(EmberError, match="holds checkpoints of an earlier run and resume is 'never'"):
        train(dataset, reference_run, resume="never")
    with pytest.raises(EmberError, match="is not an Ember checkpoint"):
        train(dataset, reference_run.parent / "elsewhere", resume=str(reference_run))


def test_a_run_dir_is_continued_only_by_a_longer_run_of_its_spec(dataset, reference_run, tmp_path):
    """Ray Train restores a run dir's latest checkpoint whatever the spec asks, so a run dir holding checkpoints of
    another spec (lr, seed, shape, dataset) is refused before anything in it is touched; a longer train.max_steps
    continues it, and a shorter one is refused. result.json goes only once training has started: a continuation
    whose workers fail to restore keeps it. (A copy of the reference run, so other tests keep theirs.)"""
    import shutil

    run, other_data = tmp_path / "run", tmp_path / "ds"
    shutil.copytree(reference_run, run)
    shutil.copytree(dataset, other_data)
    same = {"decay_steps": 8, "tensorboard": True}
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for change, named in [({"train": {**same, "lr": 1e-3}}, r"train\.lr: 0\.003 → 0\.001"),
                          ({"train": {**same, "seed": 1}}, r"train\.seed: 0 → 1"),
                          ({"train": same, "model": {"hidden_size": 64}}, r"model\.hidden_size: 32 → 64"),
                          ({"train": same, "data": {"dir": str(other_data)}}, rf"data\.dir: .* → {other_data}")]:
        with pytest.raises(EmberError, match=rf"^{run} holds a run of another spec \({named}.*\); choose another "
                                             r"output\.dir"):
            train(dataset, run, **change)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "the run dir was touched"

    states = at_step(run, 8) / "deepspeed" / "mp_rank_00_model_states.pt"
    good, result = states.read_bytes(), (run / "result.json").read_text()
    states.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # whatever DeepSpeed raises for a broken file
        train(dataset, run, train={**same, "max_steps": 10})
    assert (run / "result.json").read_text() == result  # no training started: the finished result stays
    states.write_bytes(good)
    assert train(dataset, run, train={**same, "max_steps": 10})["step"] == 10
    assert [r["step"] for r in rows(run)] == list(range(1, 11))
    restores = [json.loads(line) for line in (run / "restores.jsonl").read_text().splitlines()]
    assert restores[-1]["source"] == "latest" and restores[-1]["step"] == 8
    assert json.loads((run / "result.json").read_text())["total_steps"] == 10
    with pytest.raises(EmberError, match=r"holds a run of 10 steps .* 8 .*not shortened"):
        train(dataset, run, train=same)


class RunsCode:
    """Unpickled, it writes a marker file: what a crafted checkpoint file could do on every worker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_checkpoint_that_would_run_code_when_unpickled_is_refused(dataset, reference_run, tmp_path):
    """DeepSpeed unpickles checkpoint files: Ember's workers load them with torch's weights-only unpickler and
    DeepSpeed's own state classes, so a checkpoint file holding anything else is refused, naming trust_checkpoint,
    and its code never runs: loaded as it is (2 workers) or through the universal conversion (1 worker)."""
    import shutil

    crafted, marker = tmp_path / "crafted", tmp_path / "code-ran"
    shutil.copytree(at_step(reference_run, 4), crafted)
    states = crafted / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "ds_version": RunsCode(marker)}, states)
    for workers in (2, 1):
        with pytest.raises(EmberError, match=rf"^checkpoint {crafted} holds objects other than tensors .*\(exec\): "
                                             r"unpickling them could run code.*trust_checkpoint: true"):
            train(dataset, tmp_path / f"run-{workers}", train={"decay_steps": 8}, scaling={"workers": workers},
                  resume=str(crafted))
        assert not marker.exists(), f"the checkpoint's code ran ({workers} workers)"


@pytest.mark.gpu
def test_the_demo_spec_trains_on_one_gpu_with_bf16_and_reports_mfu(dataset, tmp_path):
    from conftest import REPO
    from ember.config import load_spec

    demo = load_spec(REPO / "jobs" / "pretrain-demo.yaml", [
        f"data.dir={dataset}", f"output.dir={tmp_path / 'gpu'}", "scaling.workers=1", "scaling.use_gpu=true",
        "deepspeed.precision=bf16", "train.max_steps=40", "train.micro_batch_size=16", "train.log_every=10"])
    run_pretrain(demo)
    metrics = rows(tmp_path / "gpu")
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all("mfu" in r and 0 < r["mfu"] < 1 for r in metrics)


@pytest.mark.gpu
def test_an_fp16_run_goes_through_loss_scale_overflows(dataset, tmp_path):
    """Starting at a loss scale of 2^32, the first steps' scaled fp16 gradients overflow: DeepSpeed skips them and
    halves the scale; the run counts them and trains on."""
    train(dataset, tmp_path / "fp16", scaling={"workers": 1, "use_gpu": True},
          deepspeed={"precision": "fp16", "fp16_initial_scale_power": 32},
          train={"max_steps": 30, "decay_steps": 30, "log_every": 1, "checkpoint_every": 0})
    metrics = rows(tmp_path / "fp16")
    assert [r["step"] for r in metrics] == list(range(1, 31))
    assert 10 <= metrics[-1]["skipped_steps"] <= 20 and metrics[-1]["loss"] < metrics[0]["loss"]


def test_no_training_run_rebuilt_the_prebuilt_deepspeed_ops(dataset, reference_run):
    """The ops `make install` built are the ones every training run of this module loaded (test_demo checks the same
    after the cluster's jobs and the demo's runs)."""
    if not OPS_AT_START:
        pytest.skip("no DeepSpeed op was built before the suite started (make install builds them)")
    assert not rebuilt_deepspeed_ops()
