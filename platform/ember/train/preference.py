"""`kind: preference`: preference tuning (DPO, IPO, SimPO, ORPO) on chosen/rejected pairs, full or LoRA.

The steps of `kind: finetune` (`ember.train.finetune`) with pairs for conversations: the base is checked, the pairs
tokenized with its chat template (`ember.data.pairs`, on the unit executor) and its weights stamped; the plan is a
fine-tune's. A full fine-tune with a loss that has a reference (dpo, ipo) then scores every pair under the base once
(`ember.train.reference`, a Ray Data pass, reused by reruns); the run itself is the shared trainer with the
preference recipe (`ember.train.recipes.PreferenceTuning`), its rewards in every metrics row.
"""

from __future__ import annotations

import dataclasses

from ember.config.specs import PreferenceSpec
from ember.data.pairs import prepare_pair_dataset
from ember.train.finetune import plan_finetune, prepare_finetune_data
from ember.train.launch import check_before_running, finished_run, launch
from ember.train.reference import ensure_reference
from ember.train.run import RunPlan


def plan_preference(spec: PreferenceSpec, address: str | None = None) -> RunPlan:
    """The run a preference spec asks for, its pairs tokenized and (full fine-tuning against a reference) scored."""
    plan = plan_finetune(spec, prepare_finetune_data(spec, address, tokenize=prepare_pair_dataset))
    if spec.method == "full" and spec.preference.needs_reference and finished_run(plan) is None:
        check_before_running(plan, address)  # a run that cannot start fails before the pass, not after
        plan = dataclasses.replace(plan, reference=ensure_reference(plan, address))
    return plan


def run_preference(spec: PreferenceSpec, address: str | None = None) -> dict:
    """Tunes `spec.base` on `spec.data`'s preference pairs; returns the last reported metrics."""
    return launch(plan_preference(spec, address), address)
