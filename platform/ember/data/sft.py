"""Tokenizing conversations for fine-tuning: records → chat template → ids + loss mask → packed rows, on Ray Data.

The result is a dataset dir in the shard format of `kind: tokenize` with manifest kind ``sft`` and two more columns
(``loss_mask``, ``segments``; see `ember.data.shards`). Its tokenizer is the base model's, plus the chat tokens the
default template needs, and its `tokenizer_config.json` carries the chat template, so the fine-tuned model dir gets
both. The work is the unit executor's (`ember.data.units.run_job`), as for `kind: tokenize`: the same steps, work
units, shard names, `shard_bytes`, per-unit resume and reuse of a finished dataset, manifest and identities, and the
refusal to replace another dataset in a `data.dir` unless `data.overwrite`; `ConversationJob` (its inputs, tokenizer,
encoder `ConversationEncoder` and summary) is what differs.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial

import numpy as np

from ember import storage
from ember.config.specs import ChatDataSpec
from ember.data import shards
from ember.data.chat import (
    BadRecord,
    ChatEncoder,
    ChatTemplate,
    SFTPacker,
    chat_tokenizer,
    template_source,
    to_messages,
)
from ember.data.sources import InputFile, Location, RecordReader, SkipLog, WorkUnit, resolve_inputs
from ember.data.steps import doc_hash, split_of
from ember.data.tokenizer import (
    PAD_TOKEN,
    eos_token,
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_identity,
)
from ember.data.units import DatasetJob, UnitJob, run_job, skip_summary
from ember.errors import EmberError

log = logging.getLogger("ember")


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
        packers = {s: SFTPacker(row_len, self.pad_id, data.pack) for s in shards.SPLITS}
        stats = {s: {"conversations": 0, "target_tokens": 0, "conversation_tokens": 0} for s in shards.SPLITS}
        truncated = 0
        for record, where in RecordReader(data.source(), skips)(unit):
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
        for s in shards.SPLITS:
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
            messages = to_messages(record, self.data.format, self.data.messages_field)
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


class ConversationJob(DatasetJob):
    """Fine-tuning data as the unit executor runs it: `data`'s conversations, the base model's tokenizer with the
    chat template's tokens added, into the dataset dir `out`."""

    kind, label = "sft", "finetune data"
    records = "conversations"  # what the job's records are, in its messages
    dir_key, overwrite_key, strict_key = "data.dir", "data.overwrite", "data.strict"
    extra_columns = shards.SFT_COLUMNS

    def __init__(self, data: ChatDataSpec, base_dir: str | os.PathLike, out: str | os.PathLike, context: int,
                 locked_by: str | None):
        self.data, self.source, self.context, self.locked_by = data, data.source(), context, locked_by
        self.base_dir, self.out = base_dir, storage.normalize(out)
        self.seq_len, self.shard_bytes = data.seq_len, data.shard_bytes
        # The default RUN_DIR/data is its run's own (the run refuses changed data once it has checkpoints:
        # `locked_by`); a data.dir the spec names may hold another dataset, which goes only with data.overwrite.
        self.overwrite = data.overwrite or data.dir is None
        self.provenance = {"base": storage.display(storage.normalize(base_dir))}

    def resolve(self) -> list[InputFile | str]:
        if self.data.seq_len > self.context:
            raise EmberError(f"data.seq_len ({self.data.seq_len}) is over the base model's context ({self.context} "
                             "tokens)")
        resolved = resolve_inputs(self.source)
        for item in resolved:
            if isinstance(item, InputFile) and item.fmt == "text":
                raise EmberError(f"{item.name}: plain text holds no {self.records}; give JSONL, JSON or Parquet "
                                 "records")
        # The base's tokenizer with the template's tokens, once the spec's own checks passed (as before the executor).
        self.tok, self.config, self.added = chat_tokenizer(load_tokenizer(self.base_dir),
                                                           tokenizer_config(self.base_dir))
        ChatTemplate.of(self.config)  # a template that does not compile fails here
        return resolved

    def identity_parts(self) -> dict:
        """The settings, the base's tokenizer and the template that shape the rows (the tokens the template adds
        follow from the two)."""
        shaping = self.data.model_dump(exclude={"dir", "overwrite", "strict", "unit_bytes"})
        return {"data": shaping, "tokenizer": tokenizer_identity(self.base_dir), "added_tokens": self.added,
                "template": template_source(self.config)}

    def check(self, identity: str) -> None:
        out = self.out
        if self.locked_by and storage.is_file(storage.join(out, "manifest.json")) and \
                shards.load_manifest(out).get("identity") != identity:
            raise EmberError(f"the {self.records}, data settings or base tokenizer changed since {self.locked_by} "
                             f"wrote its checkpoints (their data positions index {storage.display(out)}); choose "
                             "another output.dir to start over, or restore the previous data spec to resume")

    def prepare(self, units: list[WorkUnit], workers: int, num_cpus: float):
        save_tokenizer(self.tok, self.out, model_max_length=self.context, base_config=self.config)
        if self.added:
            log.info("%s: added special tokens %s for the chat template", self.label, ", ".join(self.added))
        return partial(ConversationEncoder, self.data, self.out)

    def finish(self, job: UnitJob, splits: dict, skips: SkipLog, markers: list[dict]) -> dict:
        kept = sum(splits[s]["conversations"] for s in shards.SPLITS)
        return {"pad_id": pad_id_of(self.tok, self.config), "added_tokens": self.added,
                "train_on": self.data.train_on,
                "conversations": skip_summary(skips, kept, truncated=sum(m["truncated"] for m in markers))}

    def summarize(self, manifest: dict, seconds: float | None, reused: int) -> None:
        c, splits = manifest["conversations"], manifest["splits"]
        log.info("finetune data: %d conversations read, %d kept, %d truncated%s", c["read"], c["kept"],
                 c["truncated"], (", skipped: " + ", ".join(f"{k} {v}" for k, v in c["skipped"].items()))
                 if c["skipped"] else "")
        for where in c["examples"]:
            log.info("  bad record: %s", where)
        for s in shards.SPLITS:
            log.info("finetune data: %s: %d conversations in %d rows of %d, %d target tokens", s,
                     splits[s]["conversations"], splits[s]["rows"], self.seq_len + 1, splits[s]["target_tokens"])
        if seconds is not None:
            log.info("finetune data: %s in %.1fs", storage.display(self.out), seconds)
        if not splits["train"]["rows"]:
            raise EmberError(f"no usable conversations in {', '.join(self.data.inputs)} (see the skip counts above)")


def prepare_chat_dataset(data: ChatDataSpec, base_dir: str | os.PathLike, out: str | os.PathLike, context: int,
                         address: str | None = None, locked_by: str | None = None,
                         progress_dir: str | os.PathLike | None = None) -> dict:
    """Tokenizes `data` with the base model's tokenizer and chat template into the dataset dir `out`; returns its
    manifest. Bad input paths and a `seq_len` over the model's `context` fail before any Ray work. `locked_by`
    names a run whose checkpoints point into the existing dataset: it must then not change. The job's progress
    record goes to `progress_dir` (the fine-tuning run's dir) while the units run."""
    return run_job(ConversationJob(data, base_dir, out, context, locked_by), address, progress_dir)
