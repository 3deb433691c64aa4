"""`kind: finetune`: supervised fine-tuning on conversations, full or LoRA, in two steps.

`prepare_finetune_data` is the work before planning: it checks the base model dir, tokenizes the conversations with
its tokenizer and chat template (Ray Data, `ember.data.sft`, on the unit executor; reused when unchanged) and stamps
the base's weights in the run dir. `plan_finetune` then only reads and builds the `RunPlan`, which
`ember.train.launch` runs on the same trainer as pretraining with the supervised recipe (`ember.train.recipes`):
only assistant tokens carry loss unless `data.train_on: all`. The run dir gets `model/` (servable, with the chat
template in its tokenizer_config.json) and, for LoRA, `adapter/` (PEFT format; merged into `model/` as well).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ember import storage
from ember.config.specs import FinetuneSpec
from ember.data.mixture import plan_mixture
from ember.data.sft import prepare_chat_dataset
from ember.data.tokenizer import load_tokenizer, tokenizer_file
from ember.errors import EmberError
from ember.identity import read_stamp, write_stamp
from ember.model import builtin
from ember.model.hf import bos_token_id, config_from_hf, generation_stops, read_json, weights_fingerprint
from ember.runs.run_dir import RunDir
from ember.runs.tracking import settle_tracking
from ember.train.launch import launch, refuse_never, resume_path
from ember.train.run import RunPlan, total_steps

log = logging.getLogger("ember")


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
    stamp = read_stamp(RunDir(run_dir).base_weights)
    if resuming and stamp is not None and stamp["identity"] != fingerprint:
        raise EmberError(f"{storage.display(run_dir)} holds a fine-tune of an earlier version of "
                         f"{storage.display(base)} (its weights changed since); delete that directory or choose "
                         "another output.dir to fine-tune the new base")
    write_stamp(RunDir(run_dir).base_weights, fingerprint, base=storage.display(base))
    return fingerprint


@dataclass(frozen=True)
class FinetuneData:
    """What `prepare_finetune_data` made ready for planning."""

    base: str  # the base model dir, resolved
    data_dir: str  # the tokenized conversations
    manifest: dict  # their manifest.json
    base_weights: str  # the fingerprint of the base's weights
    mixture: dict | None = None  # data.mix's record (`ember.data.mixture.plan_mixture`); data_dir is its first source


def _base_config(base: str):
    """(the base's config.json as data, its ModelConfig)."""
    config = storage.join(base, "config.json")
    data = read_json(config)
    return data, config_from_hf(data, storage.display(config))


def prepare_finetune_data(spec: FinetuneSpec, address: str | None = None,
                          tokenize=prepare_chat_dataset) -> FinetuneData:
    """The step before planning: checks the base, tokenizes the conversations (on Ray) and stamps the base's weights
    in the run dir. `tokenize` is the dataset job of the spec's data (`kind: preference` tokenizes pairs), with
    `prepare_chat_dataset`'s signature."""
    base = _base(spec)
    cfg = _base_config(base)[1]
    run_dir = storage.normalize(spec.output.dir)
    refuse_never(spec, run_dir)
    data_dir = storage.normalize(spec.data.dir) if spec.data.dir else RunDir(run_dir).data
    # Ray Train restores the run dir's own latest checkpoint first, whatever `resume` names (never: refused above).
    resuming = RunDir(run_dir).has_checkpoints()
    locked_by = storage.display(run_dir) if resuming else None
    if getattr(spec.data, "mix", None) is None:
        manifest = tokenize(spec.data, base, data_dir, cfg.max_position_embeddings, address,
                                        locked_by=locked_by, progress_dir=run_dir)
        return FinetuneData(base, data_dir, manifest, _check_base_weights(run_dir, base, resuming))
    sources = []  # a mixture: each source's conversations in a dataset of their own, DATA_DIR/NAME
    for name, weight, data in spec.data.sources():
        log.info("finetune: data.mix source %r", name)
        source_dir = storage.join(data_dir, name)
        if spec.data.dir:  # a dir the user named: each source's is theirs too, not replaced unless data.overwrite
            data = data.model_copy(update={"dir": source_dir})
        prepare_chat_dataset(data, base, source_dir, cfg.max_position_embeddings, address, locked_by=locked_by,
                             progress_dir=run_dir)
        sources.append((name, source_dir, weight))
    mixture, manifests = plan_mixture(sources, spec.data.exhausted, "sft", spec.train.global_batch_size)
    return FinetuneData(base, sources[0][1], manifests[0], _check_base_weights(run_dir, base, resuming), mixture)


def plan_finetune(spec: FinetuneSpec, data: FinetuneData) -> RunPlan:
    """The run a finetune spec asks for, on the data `prepare_finetune_data` made ready."""
    hf_config, cfg = _base_config(data.base)
    cfg.vocab_size = max(cfg.vocab_size, data.manifest["vocab_size"])
    eos_ids = sorted(generation_stops(load_tokenizer(data.data_dir), chat=True, eos_ids=[data.manifest["eos_id"]]))
    spec = spec.model_copy(deep=True)  # workers run elsewhere: hand them absolute paths (or URIs)
    spec.output.dir = storage.normalize(spec.output.dir)
    if not builtin.is_builtin(spec.base):  # a built-in base is resolved on each node, where its workers run
        spec.base = data.base
    settle_tracking(spec.train.tracking)
    log.info("%s: %s from %s, %s", spec.kind, spec.method, storage.display(data.base),
             f"rank {spec.lora.rank} on {', '.join(spec.lora.target_modules)}" if spec.method == "lora" else
             "every weight")
    steps = total_steps(spec, data.manifest, data.mixture)
    return RunPlan(spec=spec, model=cfg, data_dir=data.data_dir, manifest=data.manifest, run_dir=spec.output.dir,
                   total_steps=steps, eos_ids=tuple(eos_ids), base_weights=data.base_weights,
                   start_from=resume_path(spec), bos_id=bos_token_id(hf_config), mixture=data.mixture)


def run_finetune(spec: FinetuneSpec, address: str | None = None) -> dict:
    """Fine-tunes `spec.base` on `spec.data`: prepares the data, plans, launches; returns the last reported
    metrics."""
    return launch(plan_finetune(spec, prepare_finetune_data(spec, address)), address)
