"""Experiment tracking: a run's parameters, metrics and outputs in MLflow and Weights & Biases (`train.tracking`).

Rank 0 holds the one `Tracker` of a training run; `MetricsLog` hands it each row it writes to metrics.jsonl (the same
record: one statement of what a run reports), so MLflow and W&B show every metric Ember reports at its step. The
tracking runs' ids are kept in RUN_DIR/tracking.json: a resumed run continues the same tracking runs. At the start
of a resumed attempt, `MetricsLog` hands the tracker the rows the run dir kept (up to the restored checkpoint);
each sink skips the steps its run already holds (MLflow's history, W&B's step), so a step the earlier attempt could
not deliver is sent now, and the steps it did deliver (an exact resume repeats them with the same values) are not
logged twice. Credentials come only from the environment (`MLFLOW_TRACKING_TOKEN`, `MLFLOW_TRACKING_USERNAME` /
`PASSWORD`, `WANDB_API_KEY`, which the clients read themselves); nothing here writes them anywhere.

MLflow is spoken to through its own client (`mlflow.tracking.MlflowClient`) rather than Ray's `setup_mlflow`: that
helper always starts a new run (ray/air/integrations/mlflow.py, `mlflow_util.start_run(run_name=...)`), and a
resumed Ember run must continue the one it started.

A tracking server that cannot be reached is a warning and an untracked run, or an error before any worker starts
with `tracking.required: true` (`check_reachable`, on the driver).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ember import storage
from ember.errors import EmberError
from ember.identity import spec_without
from ember.runs.run_dir import RunDir

log = logging.getLogger("ember.train")

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


def flatten(value, prefix: str = "") -> dict[str, str]:
    """A spec (nested dicts and lists) as MLflow parameters: dotted keys, values as text (`train.lr`: `0.001`)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        out[prefix] = json.dumps(value)[:MAX_PARAM_CHARS]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}.{i}"))
    else:
        out[prefix] = ("" if value is None else str(value))[:MAX_PARAM_CHARS]
    return out


def check_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why an MLflow tracking server at `uri` cannot be used, or None when it answers. Local stores (a path, `file:`,
    `sqlite:`) need no server."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"{uri}/health answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{uri}/health answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {uri} ({reason})"


class Tracker:
    """The tracking of one run on rank 0: a sink per backend the spec names, each told the parameters at the start,
    `log(row)` for every metrics row and `close()` at the end (the driver records MLflow's end,
    `finish_tracking`). A backend that fails costs one warning and the rest of its tracking, never the training."""

    def __init__(self, plan):
        tracking, self.run_dir = plan.spec.train.tracking, plan.run_dir
        name, params = plan.spec.name or storage.name(plan.run_dir), tracking_params(plan)
        self.sinks = []
        for backend, spec, sink in (("MLflow", tracking.mlflow, MlflowSink), ("W&B", tracking.wandb, WandbSink)):
            if spec is None:
                continue
            try:
                self.sinks.append(sink(spec, plan.run_dir, name, params))
            except Exception as exc:  # noqa: BLE001 (any client or server failure: the run trains on untracked)
                log.warning("%s tracking is off for this run: %s", backend, _first_line(exc))

    def log(self, row: dict) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(row)
            except Exception as exc:  # noqa: BLE001 (a tracker's failure stops its tracking, never the run)
                self.sinks.remove(sink)
                log.warning("%s tracking stopped: %s", sink.backend, _first_line(exc))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 (the run is done; only its tracking record is short)
                log.warning("%s tracking could not close its run: %s", sink.backend, _first_line(exc))
        self.sinks = []


def _saved(run_dir: str) -> dict:
    path = RunDir(run_dir).tracking
    return storage.read_json(path) if storage.is_file(path) else {}


def _save(run_dir: str, backend: str, record: dict) -> None:
    storage.write_json(RunDir(run_dir).tracking, {**_saved(run_dir), backend: record})


class MlflowSink:
    """The run in MLflow: created with the parameters, or the run dir's own run continued; metrics in batches."""

    backend = "MLflow"

    def __init__(self, spec, run_dir: str, name: str, params: dict[str, str]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        self.logged_through = 0  # the last step the MLflow run already holds (an earlier attempt's)
        run_id = (_saved(run_dir).get("mlflow") or {}).get("run_id")
        if run_id:  # the run this run dir started: continue it
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, "loss")
            self.logged_through = max((m.step for m in history), default=0)
            return
        experiment = self.client.get_experiment_by_name(spec.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(spec.experiment)
        run = self.client.create_run(experiment_id, run_name=spec.run_name or name,
                                     tags={"ember.run_dir": storage.display(run_dir)})
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        _save(run_dir, "mlflow", {"tracking_uri": spec.tracking_uri, "experiment_id": experiment_id,
                                  "run_id": self.run_id})

    def log(self, row: dict) -> None:
        """One metrics row at its step; a step the MLflow run already holds is left as it is."""
        if row.get("step", 0) <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"]) for k, v in _scalars(row)])

    def close(self) -> None:
        """Nothing on rank 0: the driver adds the artifacts and ends the run (`finish_tracking`)."""


class WandbSink:
    """The run in Weights & Biases, through Ray's `setup_wandb` (on rank 0 only: Ember calls it there): offline mode
    writes the run under `dir` and sends nothing. The run's id is kept for a resumed run to continue it. Online, W&B
    says which step the run holds, and the rows up to it are not sent again. Offline, each attempt writes one
    offline run of that id, holding every step the run has done (a killed attempt loses what W&B had not flushed of
    its file yet: `wandb sync` of the latest attempt gives the whole run, and W&B keeps each step once when the
    earlier ones are synced too)."""

    backend = "W&B"

    def __init__(self, spec, run_dir: str, name: str, params: dict[str, str]):
        import os

        from ray.air.integrations.wandb import setup_wandb

        os.environ["WANDB_MODE"] = spec.mode  # Ray's key lookup reads the mode from the environment
        os.environ.setdefault("WANDB_SILENT", "true")  # no run summary in the training log
        run_id = (_saved(run_dir).get("wandb") or {}).get("id") or _new_id()
        directory = spec.dir or (run_dir if not storage.is_uri(run_dir) else None)
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = setup_wandb(config=params, rank_zero_only=False, trial_id=run_id, trial_name=spec.run_name or name,
                               project=spec.project, entity=spec.entity, mode=spec.mode, dir=directory,
                               resume="allow")
        # The last step the W&B run holds (a resumed online run: the one before its next step).
        self.logged_through = max(0, self.run.starting_step - 1) if spec.mode == "online" and self.run.resumed else 0
        _save(run_dir, "wandb", {"project": spec.project, "entity": spec.entity, "id": run_id, "mode": spec.mode})
        self.model = storage.display(RunDir(run_dir).model)

    def log(self, row: dict) -> None:
        if row["step"] > self.logged_through:
            self.run.log(dict(_scalars(row)), step=row["step"])

    def close(self) -> None:
        self.run.summary["ember.model"] = self.model
        self.run.finish()


def _scalars(row: dict) -> list[tuple[str, float]]:
    """A metrics row's finite numbers, its step aside."""
    return [(k, float(v)) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)]


def _new_id() -> str:
    import secrets

    return secrets.token_hex(4)


def tracking_params(plan) -> dict[str, str]:
    """What MLflow shows as the run's parameters: the spec flattened (where it is logged aside), the dataset's
    identity and tokenizer hash, and the network's config."""
    spec = spec_without(plan.spec, ("train.tracking",))
    return {**flatten(spec), "data.identity": plan.manifest["identity"],
            "data.tokenizer_sha256": (plan.manifest.get("tokenizer") or {}).get("sha256", ""),
            **flatten(plan.model.to_dict(), "model_config")}


def start_tracking(plan) -> Tracker | None:
    """Rank 0's tracker for a run whose spec asks for one (new tracking runs, or the run dir's own continued)."""
    tracking = plan.spec.train.tracking
    return Tracker(plan) if tracking.mlflow is not None or tracking.wandb is not None else None


def settle_tracking(tracking, where: str = "train.tracking") -> None:
    """On the driver, before any worker starts: a tracking server that does not answer is an error with
    `tracking.required`, else one warning and the tracking is taken out of the spec (`where` is its key there) the
    workers get."""
    if tracking.mlflow is None:
        return
    why = check_reachable(tracking.mlflow.tracking_uri)
    if why is None:
        return
    if tracking.required:
        raise EmberError(f"{where}.mlflow.tracking_uri: {why}; the run needs it (tracking.required is on)")
    log.warning("MLflow: %s; the run goes on untracked (set %s.required: true to stop instead)", why, where)
    tracking.mlflow = None


def log_evaluation(spec, results: dict) -> None:
    """An evaluation as one MLflow run: the models and data as parameters, each figure as a metric named
    `MODEL.SECTION.FIGURE` (`finetuned.conversations.token_f1`), and the results file as an artifact."""
    mlflow_spec = spec.tracking.mlflow
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_spec.tracking_uri)
        experiment = client.get_experiment_by_name(mlflow_spec.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(mlflow_spec.experiment)
        run = client.create_run(experiment_id, run_name=mlflow_spec.run_name or spec.name or "evaluate",
                                tags={"ember.kind": "evaluate"})
        data = json.loads(spec.model_dump_json(include={"models", "data", "generation"}))
        now = _millis()
        figures = [Metric(key, float(value), now, 0) for key, value in _numbers(results).items()]
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(data).items()][:100],
                         metrics=figures[:1000])
        with tempfile.TemporaryDirectory(prefix="ember-tracking-") as tmp:
            path = Path(tmp, storage.name(spec.output.file))
            path.write_text(json.dumps(results, indent=2) + "\n")
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        log.info("evaluate: logged to MLflow run %s (experiment %s)", run.info.run_id, mlflow_spec.experiment)
    except Exception as exc:  # noqa: BLE001 (the results are written; only their tracking record is missing)
        log.warning("MLflow could not record the evaluation: %s", _first_line(exc))


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """The finite numbers of nested results, by dotted path."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_numbers(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: value}
    return {}


def finish_tracking(plan, result: dict | None, status: str) -> None:
    """On the driver, at the run's end: result.json and the exported model dir as the MLflow run's artifacts (the
    model's location as the tag `ember.model` in any case), and its status. A failure here is a warning: the run
    itself is done."""
    mlflow_spec = plan.spec.train.tracking.mlflow
    saved_path = plan.dir.tracking
    if mlflow_spec is None or not storage.is_file(saved_path):
        return
    try:
        from mlflow.tracking import MlflowClient

        run_id = storage.read_json(saved_path)["mlflow"]["run_id"]
        client = MlflowClient(tracking_uri=mlflow_spec.tracking_uri)
        model_dir = plan.dir.model
        if result is not None:
            with tempfile.TemporaryDirectory(prefix="ember-tracking-") as tmp:
                path = Path(tmp, RunDir.RESULT)
                path.write_text(json.dumps(result, indent=2) + "\n")
                client.log_artifact(run_id, str(path))
            client.set_tag(run_id, "ember.model", storage.display(model_dir))
            if mlflow_spec.log_model:
                client.log_artifacts(run_id, str(storage.local_dir(model_dir)), artifact_path="model")
        client.set_terminated(run_id, status=status)
    except Exception as exc:  # noqa: BLE001 (the run is done; only its tracking record is short)
        log.warning("MLflow could not record the run's end: %s", _first_line(exc))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _millis() -> int:
    import time

    return int(time.time() * 1000)



