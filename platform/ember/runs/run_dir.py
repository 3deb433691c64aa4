"""The files of a training run dir, by name: `RunDir`, the one place those names are written. The trainer, the
driver, reports and tracking all read them from here; it imports only `ember.storage`.

A run dir holds (besides Ray Train's checkpoints and its `checkpoint_manager_snapshot.json`): `spec.yaml`,
`run.json` (the trajectory its checkpoints are points of, and the run's length), `metrics.jsonl`, `restores.jsonl`,
`error.json` (a run that stopped itself says why), `model/` and, once finished, `result.json`: the run's identity
(see `ember.identity`) and its last metrics. A fine-tune adds `base_weights.json`, `data/` (its tokenized
conversations, unless data.dir names another place) and, with LoRA, `adapter/`; tracking adds `tracking.json`,
TensorBoard `tensorboard/`, `ember report` `report/` and `eval/`. `progress.json` is `ember.runs.progress`'s (dataset
dirs hold one too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ember import storage


@dataclass(frozen=True)
class RunDir:
    """The files of one run dir (a local path or a bucket prefix), by name: the one place those names are written."""

    root: str

    SNAPSHOT: ClassVar[str] = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints
    SPEC: ClassVar[str] = "spec.yaml"  # the spec the run was last launched with
    RUN: ClassVar[str] = "run.json"  # the trajectory the checkpoints are points of (`RunPlan.trajectory`), its length
    METRICS: ClassVar[str] = "metrics.jsonl"  # one row per logged step (`ember.train.metrics.MetricsLog`)
    RESTORES: ClassVar[str] = "restores.jsonl"  # one record per restore of a checkpoint
    ERROR: ClassVar[str] = "error.json"  # a run that stopped itself (non-finite loss) says why; the driver raises it
    RESULT: ClassVar[str] = "result.json"  # written when a run finishes: its identity, length and last metrics
    BASE_WEIGHTS: ClassVar[str] = "base_weights.json"  # a fine-tune's base weights' fingerprint (its checkpoints')
    TRACKING: ClassVar[str] = "tracking.json"  # the tracking runs' ids (no credentials), for a resumed run
    TENSORBOARD: ClassVar[str] = "tensorboard"  # TensorBoard's event files (train.tensorboard)
    MODEL: ClassVar[str] = "model"  # the exported model dir
    ADAPTER: ClassVar[str] = "adapter"  # LoRA's adapters, PEFT format
    DATA: ClassVar[str] = "data"  # a fine-tune's tokenized conversations, unless data.dir names another place
    REPORT: ClassVar[str] = "report"  # `ember report`'s plots and summary
    EVAL: ClassVar[str] = "eval"  # evaluation results shown beside the report's curves
    CHECKPOINT_STATE: ClassVar[str] = "ember_state.json"  # inside each checkpoint: step, samples, world size, spec

    def file(self, name: str) -> str:
        return storage.join(self.root, name)

    snapshot = property(lambda self: self.file(self.SNAPSHOT))
    spec = property(lambda self: self.file(self.SPEC))
    run = property(lambda self: self.file(self.RUN))
    metrics = property(lambda self: self.file(self.METRICS))
    restores = property(lambda self: self.file(self.RESTORES))
    error = property(lambda self: self.file(self.ERROR))
    result = property(lambda self: self.file(self.RESULT))
    base_weights = property(lambda self: self.file(self.BASE_WEIGHTS))
    tracking = property(lambda self: self.file(self.TRACKING))
    tensorboard = property(lambda self: self.file(self.TENSORBOARD))
    model = property(lambda self: self.file(self.MODEL))
    adapter = property(lambda self: self.file(self.ADAPTER))
    data = property(lambda self: self.file(self.DATA))
    report = property(lambda self: self.file(self.REPORT))
    eval = property(lambda self: self.file(self.EVAL))

    def has_checkpoints(self) -> bool:
        return storage.is_file(self.snapshot)

    def has_model(self) -> bool:
        """Whether an export finished (its config.json is written last)."""
        return storage.is_file(storage.join(self.model, "config.json"))
