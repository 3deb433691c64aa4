"""A training run as data: `RunPlan`, what one run is and what makes two runs the same. Imports neither torch nor
Ray: the driver reads it without loading the training stack.

Every run-dir file name is `ember.runs.run_dir.RunDir`'s (reports and tracking read the same files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.config.specs import SPEC_KINDS, TrainingJobSpec
from ember.data.shards import DEFAULT_BLOCK_BYTES
from ember.identity import identity_of, spec_without
from ember.runs.run_dir import RunDir

if TYPE_CHECKING:
    from ember.model import ModelConfig

log = logging.getLogger("ember")

# Spec keys that are not what a run is: how to resume, how far to trust a checkpoint, where it is logged, whether a
# fine-tune's data.dir may be replaced. A finished run is reused whatever they say.
NOT_THE_RUN = ("resume", "trust_checkpoint", "train.tracking", "data.overwrite")
# And those that say how a run goes, not what it trains: a run dir's checkpoints continue under other values (its
# length only grows: see `ember.train.launch.refuse_another_run`).
HOW_IT_RUNS = (*NOT_THE_RUN, "name", "output", "scaling", "failure", "train.max_steps", "train.max_tokens",
               "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
               "train.keep_checkpoints", "train.tensorboard", "data.exhausted")


@dataclass(frozen=True)
class RunPlan:
    """One training run, complete: what the driver checked and every worker needs."""

    spec: TrainingJobSpec  # with absolute paths: workers run elsewhere
    model: ModelConfig  # the network to build (fine-tuning: the base's, vocabulary grown to the dataset's)
    data_dir: str
    manifest: dict  # the dataset's manifest.json
    run_dir: str
    total_steps: int
    eos_ids: tuple[int, ...]  # the end tokens the exported generation_config.json names
    base_weights: str | None = None  # fingerprint of the base model's weights (fine-tuning)
    start_from: str | None = None  # the checkpoint `resume: PATH` names
    bos_id: int | None = None  # the base's beginning-of-text token (config.json's bos_token_id), kept in the export
    mixture: dict | None = None  # data.mix's record (`ember.data.mixture.plan_mixture`); data_dir is its first source
    reference: str | None = None  # a full preference fine-tune's reference figures (`ember.train.reference`)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def dataset_dirs(self) -> list[str]:
        """The dataset dirs the run reads: data_dir, or each of the mixture's."""
        return [s["dir"] for s in self.mixture["sources"]] if self.mixture else [self.data_dir]

    @property
    def block_bytes(self) -> int:
        """The shuffle block of the run's readers (`ember.data.shards.ShardReader`)."""
        return getattr(self.spec.data, "shuffle_block_bytes", None) or DEFAULT_BLOCK_BYTES

    def identity(self) -> str:
        """What makes two runs the same run: the spec (without `NOT_THE_RUN`), the dataset (a dataset rebuilt in the
        same dir is other data), the network and the base's weights."""
        return identity_of({"spec": spec_without(self.spec, NOT_THE_RUN), "dataset": self.manifest,
                            "model": self.model.to_dict(), "eos_ids": list(self.eos_ids),
                            "base_weights": self.base_weights, **self._mixed()})

    def trajectory(self) -> dict:
        """What the run's checkpoints are points of: the identity's parts without the run's length and without how
        it runs (`HOW_IT_RUNS`). A run dir's checkpoints are continued only by a plan of the same trajectory."""
        return {"spec": spec_without(self.spec, HOW_IT_RUNS),
                "dataset": identity_of(self.manifest), "model": self.model.to_dict(), "eos_ids": list(self.eos_ids),
                "base_weights": self.base_weights, **self._mixed(trajectory=True), **self._order()}

    def _mixed(self, trajectory: bool = False) -> dict:
        """The mixture's datasets (their identities, weights, how it ends), for a run that mixes (absent otherwise,
        as in runs made before mixtures). A trajectory's has neither their dirs (a fine-tune's are in its run dir,
        which may move) nor how it ends (a run stopped where a source ran out continues with `recycle`)."""
        if not self.mixture:
            return {}
        if not trajectory:
            return {"mixture": self.mixture}
        sources = [{k: v for k, v in s.items() if k != "dir"} for s in self.mixture["sources"]]
        return {"mixture": {"sources": sources, "window": self.mixture.get("window")}}

    def _order(self) -> dict:
        """The sample order, where it is read a shuffle block at a time (a split larger than one block, see
        `ember.data.shards.ShardReader`): absent otherwise, as in runs made before blocks, whose order is the same."""
        split = self.manifest["splits"]["train"]["shards"]
        if self.mixture is None and sum(int(s.get("bytes") or 0) for s in split) <= self.block_bytes:
            return {}
        return {"order": {"shuffle_block_bytes": self.block_bytes}}

    def to_config(self) -> dict:
        """The plan as JSON-able data: the `train_loop_config` of every worker."""
        fields = dataclasses.asdict(self)
        return {**fields, "spec": json.loads(self.spec.model_dump_json()), "model": self.model.to_dict()}

    @classmethod
    def from_config(cls, config: dict) -> RunPlan:
        from ember.model import ModelConfig  # the model package loads torch: workers only

        spec = SPEC_KINDS[config["spec"]["kind"]].model_validate(config["spec"])
        return cls(**{**config, "spec": spec, "model": ModelConfig(**config["model"]),
                      "eos_ids": tuple(config["eos_ids"])})


def total_steps(spec: TrainingJobSpec, manifest: dict, mixture: dict | None = None) -> int:
    """The run's optimizer steps: train.max_steps, or max_tokens in steps; a mixture that stops when a source runs
    out ends at the last whole step before that."""
    t = spec.train
    rows = 2 if manifest.get("kind") == "preference" else 1  # a pair's two sides, as its metrics rows count tokens
    steps = t.max_steps or max(1, math.ceil(t.max_tokens / (t.global_batch_size * manifest["seq_len"] * rows)))
    if mixture and mixture["samples"] is not None and mixture["samples"] // t.global_batch_size < steps:
        log.info("data.mix: source %r runs out after %d samples: the run stops at step %d of the %d asked for "
                 "(data.exhausted: stop; recycle reuses its rows)", mixture["runs_out"], mixture["samples"],
                 mixture["samples"] // t.global_batch_size, steps)
        steps = mixture["samples"] // t.global_batch_size
    return steps

