"""`kind: finetune`: the run plan for supervised fine-tuning on conversations, full or LoRA.

The driver checks the base model dir and tokenizes the conversations with its tokenizer and chat template (Ray Data,
`ember.data.sft`, on the unit executor; reused when unchanged); `ember.train.launch` then runs the same trainer as
pretraining with the supervised recipe (`ember.train.recipes`): only assistant tokens carry loss unless
`data.train_on: all`. The run dir gets `model/` (servable, with the chat template in its tokenizer_config.json) and,
for LoRA, `adapter/` (PEFT format; merged into `model/` as well).
"""

from __future__ import annotations

import logging

from ember import storage
from ember.config.specs import FinetuneSpec
from ember.data.sft import prepare_chat_dataset
from ember.data.tokenizer import load_tokenizer, tokenizer_file, turn_end_ids
from ember.errors import EmberError
from ember.identity import read_stamp, write_stamp
from ember.model import builtin
from ember.model.hf import bos_token_id, config_from_hf, read_json, weights_fingerprint
from ember.runs.tracking import settle_tracking
from ember.train.launch import SNAPSHOT, RunPlan, launch, refuse_never, resume_path, total_steps

log = logging.getLogger("ember")

BASE_STAMP = "base_weights.json"  # in the run dir: the fingerprint of the base's weights its checkpoints come from


def _base(spec: FinetuneSpec) -> str:
    base = builtin.resolve(spec.base)
    if not storage.is_file(storage.join(base, "config.json")):
        raise EmberError(f"base: {storage.display(base)} is not a model directory (no config.json)")
    try:
        tokenizer_file(base)
    except EmberError:
        raise EmberError(f"base: {storage.display(base)} has no tokenizer.json; a model dir for fine-tuning needs "
                         "its tokenizer") from None
    return base


def _check_base_weights(run_dir: str, base: str, resuming: bool) -> str:
    """The base's weights are part of what the run is: checkpoints made from another version of the base (one
    retrained in place since) must not be continued, nor a finished run of it reused. Returns their fingerprint."""
    fingerprint = weights_fingerprint(base)
    stamp = read_stamp(storage.join(run_dir, BASE_STAMP))
    if resuming and stamp is not None and stamp["identity"] != fingerprint:
        raise EmberError(f"{storage.display(run_dir)} holds a fine-tune of an earlier version of "
                         f"{storage.display(base)} (its weights changed since); delete that directory or choose "
                         "another output.dir to fine-tune the new base")
    write_stamp(storage.join(run_dir, BASE_STAMP), fingerprint, base=storage.display(base))
    return fingerprint


def plan_finetune(spec: FinetuneSpec, address: str | None = None) -> RunPlan:
    """The run a finetune spec asks for: checks the base, tokenizes the conversations (on Ray), and plans."""
    base = _base(spec)
    config = storage.join(base, "config.json")
    data = read_json(config)
    cfg = config_from_hf(data, storage.display(config))
    run_dir = storage.normalize(spec.output.dir)
    refuse_never(spec, run_dir)
    data_dir = storage.normalize(spec.data.dir) if spec.data.dir else storage.join(run_dir, "data")
    # Ray Train restores the run dir's own latest checkpoint first, whatever `resume` names (never: refused above).
    resuming = storage.is_file(storage.join(run_dir, SNAPSHOT))
    manifest = prepare_chat_dataset(spec.data, base, data_dir, cfg.max_position_embeddings, address,
                                    locked_by=storage.display(run_dir) if resuming else None, progress_dir=run_dir)
    cfg.vocab_size = max(cfg.vocab_size, manifest["vocab_size"])
    eos_ids = sorted({manifest["eos_id"], *turn_end_ids(load_tokenizer(data_dir))})
    spec = spec.model_copy(deep=True)  # workers run elsewhere: hand them absolute paths (or URIs)
    spec.output.dir = run_dir
    if not builtin.is_builtin(spec.base):  # a built-in base is resolved on each node, where its workers run
        spec.base = base
    settle_tracking(spec.train.tracking)
    log.info("finetune: %s from %s, %s", spec.method, storage.display(base),
             f"rank {spec.lora.rank} on {', '.join(spec.lora.target_modules)}" if spec.method == "lora" else
             "every weight")
    return RunPlan(spec=spec, model=cfg, data_dir=data_dir, manifest=manifest, run_dir=run_dir,
                   total_steps=total_steps(spec, manifest), eos_ids=tuple(eos_ids),
                   base_weights=_check_base_weights(run_dir, base, resuming), start_from=resume_path(spec),
                   bos_id=bos_token_id(data))


def run_finetune(spec: FinetuneSpec, address: str | None = None) -> dict:
    """Fine-tunes `spec.base` on `spec.data`; returns the last reported metrics."""
    return launch(plan_finetune(spec, address), address)
