"""Tokenizing conversations for fine-tuning: records → chat template → ids + loss mask → packed rows, on Ray Data.

The result is a dataset dir in the shard format of `kind: tokenize` with manifest kind ``sft`` and two more columns
(``loss_mask``, ``segments``; see `ember.data.shards`). Its tokenizer is the base model's, plus the chat tokens the
default template needs, and its `tokenizer_config.json` carries the chat template, so the fine-tuned model dir gets
both. The work is the unit executor's (`ember.data.units`), as for `kind: tokenize`: the same work units, shard
names, `shard_bytes`, per-unit resume and reuse of a finished dataset, and the refusal to replace another dataset in a
`data.dir` unless `data.overwrite`; `ConversationEncoder` is what differs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial

import numpy as np

from ember import storage
from ember.config.specs import ChatDataSpec, SourceSpec
from ember.data import shards as fmt
from ember.data import units as ex
from ember.data.chat import (
    BadRecord,
    ChatEncoder,
    ChatTemplate,
    SFTPacker,
    chat_tokenizer,
    template_source,
    to_messages,
)
from ember.data.sources import (
    InputFile,
    Location,
    RecordReader,
    SkipLog,
    WorkUnit,
    plan_units,
    resolve_inputs,
    source_fingerprint,
)
from ember.data.steps import doc_hash, split_of
from ember.data.tokenizer import PAD_TOKEN, eos_token, load_tokenizer, save_tokenizer, tokenizer_config
from ember.errors import EmberError
from ember.identity import content_sha256, identity_of
from ember.runtime import ensure_ray

log = logging.getLogger("ember")


def source_of(data: ChatDataSpec) -> SourceSpec:
    return SourceSpec(inputs=data.inputs, strict=data.strict, unit_bytes=data.unit_bytes)


def pad_id_of(tok, config: dict) -> int:
    """The pad token's id, or EOS's when the tokenizer has no pad token."""
    pad = tok.token_to_id(PAD_TOKEN)
    return pad if pad is not None else eos_token(tok, config)[1]


class ConversationEncoder:
    """The fine-tuning data job's unit encoder: records → conversations → chat-template ids and loss mask → packed
    rows with segments. Loads the dataset's tokenizer and template once."""

    def __init__(self, data: ChatDataSpec, dataset_dir: str):
        tok = load_tokenizer(dataset_dir)
        config = tokenizer_config(dataset_dir)
        self.data = data
        self.encoder = ChatEncoder(tok, ChatTemplate.of(config), data.train_on)
        self.pad_id = pad_id_of(tok, config)

    def __call__(self, unit: WorkUnit, skips: SkipLog, write) -> dict:
        data, row_len = self.data, self.data.seq_len + 1
        packers = {s: SFTPacker(row_len, self.pad_id, data.pack) for s in fmt.SPLITS}
        stats = {s: {"conversations": 0, "target_tokens": 0, "conversation_tokens": 0} for s in fmt.SPLITS}
        truncated = 0
        for record, where in RecordReader(source_of(data), skips)(unit):
            encoded = self.encode(record, where, skips)
            if encoded is None:
                continue
            messages, ids, mask, cut = encoded
            truncated += cut
            split = split_of(doc_hash(json.dumps(messages, sort_keys=True)), data.val_fraction)
            packers[split].add(ids, mask)
            stats[split]["conversations"] += 1
            stats[split]["target_tokens"] += int(mask.sum())
            stats[split]["conversation_tokens"] += len(ids)
        for s in fmt.SPLITS:
            packers[s].finish()
            columns = packers[s].take()
            if columns:
                write(s, columns)
        return {"stats": stats, "truncated": truncated}

    def encode(self, record, where: Location, skips: SkipLog) -> tuple[list, np.ndarray, np.ndarray, bool] | None:
        """(messages, ids, mask, truncated) of one record, or None when it is skipped (and counted)."""
        row_len = self.data.seq_len + 1
        if isinstance(record, str):
            raise EmberError(f"{where.segment.name}: plain text holds no conversations; give JSONL, JSON or Parquet "
                             "records (or builtin:python-qa)")
        try:
            messages = to_messages(record, self.data.format)
            ids, mask = self.encoder.encode(messages)
        except BadRecord as bad:
            skips.skip(bad.reason, str(where), bad.detail)
            return None
        if len(ids) <= row_len:
            return messages, ids, mask, False
        if self.data.overlong == "drop":
            skips.skip("too_long", str(where), f"{len(ids)} tokens, over a row of {row_len}", bad_input=False)
            return None
        ids, mask = ids[:row_len], mask[:row_len]
        if not mask.any():
            skips.skip("no_target_left", str(where), "no assistant token left after truncation", bad_input=False)
            return None
        return messages, ids, mask, True


def _identities(data: ChatDataSpec, tok, config: dict, fingerprint: str) -> tuple[str, str]:
    """(job, dataset): the settings, tokenizer and template that shape the rows; and those with the input content."""
    shaping = data.model_dump(exclude={"dir", "overwrite", "strict", "unit_bytes"})
    job = identity_of({"data": shaping, "tokenizer": identity_of(tok.to_str()), "template": template_source(config),
                       "format_version": fmt.FORMAT_VERSION})
    return job, identity_of({"job": job, "inputs": fingerprint})


def _resolve(data: ChatDataSpec, context: int) -> list:
    if data.seq_len > context:
        raise EmberError(f"data.seq_len ({data.seq_len}) is over the base model's context ({context} tokens)")
    resolved = resolve_inputs(source_of(data))
    for item in resolved:
        if isinstance(item, InputFile) and item.fmt == "text":
            raise EmberError(f"{item.name}: plain text holds no conversations; give JSONL, JSON or Parquet records")
    return resolved


def prepare_chat_dataset(data: ChatDataSpec, base_dir: str | os.PathLike, out: str | os.PathLike, context: int,
                         address: str | None = None, locked_by: str | None = None,
                         progress_dir: str | os.PathLike | None = None) -> dict:
    """Tokenizes `data` with the base model's tokenizer and chat template into the dataset dir `out`; returns its
    manifest. Bad input paths and a `seq_len` over the model's `context` fail before any Ray work. `locked_by`
    names a run whose checkpoints point into the existing dataset: it must then not change. The job's progress
    record goes to `progress_dir` (the fine-tuning run's dir) while the units run."""
    t0 = time.perf_counter()
    out = storage.normalize(out)
    resolved = _resolve(data, context)
    tok, config, added = chat_tokenizer(load_tokenizer(base_dir), tokenizer_config(base_dir))
    ChatTemplate.of(config)  # a template that does not compile fails here
    fingerprint = source_fingerprint(resolved)
    job_id, identity = _identities(data, tok, config, fingerprint)
    if locked_by and storage.is_file(storage.join(out, "manifest.json")) and \
            fmt.load_manifest(out).get("identity") != identity:
        raise EmberError(f"the conversations, data settings or base tokenizer changed since {locked_by} wrote its "
                         f"checkpoints (their data positions index {storage.display(out)}); choose another "
                         "output.dir to start "
                         "over, or restore the previous data spec to resume")
    # The default RUN_DIR/data is its run's own (the run refuses changed data once it has checkpoints: `locked_by`);
    # a data.dir the spec names may hold another dataset, which goes only with data.overwrite, as in tokenize.
    finished = ex.prepare_output(out, job_id, identity, overwrite=data.overwrite or data.dir is None,
                                 dir_key="data.dir", overwrite_key="data.overwrite")
    if finished is not None:
        log.info("finetune data: %s already holds these conversations (same inputs, settings and tokenizer): "
                 "reused", storage.display(out))
        return finished
    save_tokenizer(tok, out, model_max_length=context, base_config=config)
    if added:
        log.info("finetune data: added special tokens %s for the chat template", ", ".join(added))

    units = plan_units(resolved, source_of(data))
    ensure_ray(address)
    workers, num_cpus = ex.pool(None)
    fingerprints = ex.unit_fingerprints(units, resolved)
    job = ex.UnitJob(out, data.seq_len + 1, fmt.token_dtype(tok.get_vocab_size()).name, data.shard_bytes,
                     partial(ConversationEncoder, data, out), fingerprints,
                     extra_columns=tuple(fmt.EXTRA_COLUMNS), strict=data.strict, strict_key="data.strict")
    ex.run_units(lambda: job, units, out_dir=out, fingerprints=fingerprints, workers=workers, num_cpus=num_cpus,
                 label="finetune data", progress_dir=progress_dir)
    manifest = _publish(data, job, units, tok, config, added, identity, fingerprint, base_dir)
    _log_summary(manifest, data, out, time.perf_counter() - t0)
    if not manifest["splits"]["train"]["rows"]:
        raise EmberError(f"no usable conversations in {', '.join(data.inputs)} (see the skip counts above)")
    return manifest


def _publish(data: ChatDataSpec, job: ex.UnitJob, units: list[WorkUnit], tok, config: dict, added: list[str],
             identity: str, fingerprint: str, base_dir) -> dict:
    splits, skips, markers = ex.collect(job, units)
    kept = sum(splits[s]["conversations"] for s in fmt.SPLITS)
    eos_id = eos_token(tok, config)[1]
    return ex.publish(job, splits, {
        "kind": "sft", "identity": identity, "vocab_size": tok.get_vocab_size(), "eos_id": eos_id,
        "pad_id": pad_id_of(tok, config), "added_tokens": added, "train_on": data.train_on,
        "tokenizer": {"file": "tokenizer.json", "sha256": content_sha256(storage.join(job.out_dir, "tokenizer.json"))},
        "source": ex.source_summary(data.inputs, fingerprint, base=storage.display(storage.normalize(base_dir))),
        "units": len(units),
        "conversations": ex.skip_summary(skips, kept, truncated=sum(m["truncated"] for m in markers)),
    })


def _log_summary(manifest: dict, data: ChatDataSpec, out: str, seconds: float) -> None:
    c, splits = manifest["conversations"], manifest["splits"]
    log.info("finetune data: %d conversations read, %d kept, %d truncated%s", c["read"], c["kept"], c["truncated"],
             (", skipped: " + ", ".join(f"{k} {v}" for k, v in c["skipped"].items())) if c["skipped"] else "")
    for where in c["examples"]:
        log.info("  bad record: %s", where)
    for s in fmt.SPLITS:
        log.info("finetune data: %s: %d conversations in %d rows of %d, %d target tokens", s,
                 splits[s]["conversations"], splits[s]["rows"], data.seq_len + 1, splits[s]["target_tokens"])
    log.info("finetune data: %s in %.1fs", storage.display(out), seconds)
