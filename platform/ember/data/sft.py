"""Tokenizing conversations for fine-tuning: records → chat template → ids + loss mask → packed rows, on Ray Data.

The result is a dataset dir in the shard format of `kind: tokenize` with manifest kind ``sft`` and two more columns
(``loss_mask``, ``segments``; see `ember.data.shards`). Its tokenizer is the base model's, plus the chat tokens the
default template needs, and its `tokenizer_config.json` carries the chat template, so the fine-tuned model dir gets
both. Work units are the same as tokenize's (files grouped, large files split); each `ChatUnitEncoder` actor loads
the tokenizer once and writes its units' shards. The same inputs and settings reuse a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import ray.data

from ember.config.specs import ChatDataSpec, SourceSpec
from ember.data import shards as fmt
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
from ember.runtime import ensure_ray

log = logging.getLogger("ember")


def source_of(data: ChatDataSpec) -> SourceSpec:
    return SourceSpec(inputs=data.inputs, strict=data.strict, unit_bytes=data.unit_bytes)


class ChatUnitEncoder:
    """Ray Data actor: loads the dataset's tokenizer and template once, then encodes one work unit per row."""

    def __init__(self, data: dict, out_dir: str):
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        self.data = ChatDataSpec.model_validate(data)
        self.out = Path(out_dir)
        tok = load_tokenizer(self.out)
        config = tokenizer_config(self.out)
        self.encoder = ChatEncoder(tok, ChatTemplate.of(config),
                                   self.data.train_on)
        self.pad_id = tok.token_to_id(PAD_TOKEN)
        if self.pad_id is None:
            self.pad_id = eos_token(tok, config)[1]

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["unit"]:
            unit = unit_from_json(str(text))
            try:
                results.append(json.dumps(self.encode_unit(unit)))
            except EmberError as exc:  # strict mode, or input that is not conversations: to the driver intact
                results.append(json.dumps({"error": str(exc)}))
        return {"done": results}

    def encode_unit(self, unit: WorkUnit) -> dict:
        data, row_len = self.data, self.data.seq_len + 1
        skips = SkipLog(strict=data.strict, strict_key="data.strict")
        packers = {s: SFTPacker(row_len, self.pad_id, data.pack) for s in fmt.SPLITS}
        stats = {s: {"conversations": 0, "target_tokens": 0, "conversation_tokens": 0} for s in fmt.SPLITS}
        truncated = 0
        for record, where in RecordReader(source_of(data), skips)(unit):
            try:
                messages = to_messages(record, data.format)
                ids, mask = self.encoder.encode(messages)
            except BadRecord as bad:
                skips.skip(bad.reason, where, bad.detail)
                continue
            if len(ids) > row_len:
                if data.overlong == "drop":
                    skips.skip("too_long", where, f"{len(ids)} tokens, over a row of {row_len}", bad_input=False)
                    continue
                ids, mask = ids[:row_len], mask[:row_len]
                if not mask.any():
                    skips.skip("no_target_left", where, "no assistant token left after truncation", bad_input=False)
                    continue
                truncated += 1
            split = split_of(doc_hash(json.dumps(messages, sort_keys=True)), data.val_fraction)
            packers[split].add(ids, mask)
            stats[split]["conversations"] += 1
            stats[split]["target_tokens"] += int(mask.sum())
            stats[split]["conversation_tokens"] += len(ids)
        shards = {}
        for s in fmt.SPLITS:
            packers[s].finish()
            columns = packers[s].take()
            if not columns:
                shards[s] = []
                continue
            columns["loss_mask"] = columns["loss_mask"].astype(np.uint8)
            columns["segments"] = columns["segments"].astype(np.uint16)
            columns["input_ids"] = columns["input_ids"].astype(np.dtype(self.dtype))
            shards[s] = [fmt.write_columns(self.out / s / f"unit-{unit.index:05d}.arrow", columns)]
        return {"unit": unit.index, "shards": shards, "stats": stats, "truncated": truncated,
                "skips": skips.to_dict()}

    @property
    def dtype(self) -> str:
        return fmt.token_dtype(self.encoder.tok.get_vocab_size()).name


def unit_to_json(unit: WorkUnit) -> str:
    from ember.data.pipeline import unit_to_json as encode

    return encode(unit)


def unit_from_json(text: str) -> WorkUnit:
    from ember.data.pipeline import unit_from_json as decode

    return decode(text)


def _identity(data: ChatDataSpec, tokenizer_json: str, config: dict, fingerprint: str) -> str:
    shaping = data.model_dump(exclude={"dir", "strict", "unit_bytes"})
    blob = json.dumps({"data": shaping, "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                       "template": template_source(config), "inputs": fingerprint,
                       "format_version": fmt.FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _clear(out: Path) -> None:
    """Empties a dataset dir Ember wrote before; refuses a directory with other content."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = (out / ".ember-sft").is_file() or (
        (out / "manifest.json").is_file() and fmt.load_manifest(out).get("kind") == "sft")
    if not ours:
        raise EmberError(f"{out} is not empty and holds no Ember fine-tuning dataset; choose another data.dir")
    shutil.rmtree(out)


def prepare_chat_dataset(data: ChatDataSpec, base_dir: str | os.PathLike, out: str | os.PathLike, context: int,
                         address: str | None = None, locked_by: str | None = None) -> dict:
    """Tokenizes `data` with the base model's tokenizer and chat template into the dataset dir `out`; returns its
    manifest. Bad input paths and a `seq_len` over the model's `context` fail before any Ray work. `locked_by`
    names a run whose checkpoints point into the existing dataset: it must then not change."""
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    if data.seq_len > context:
        raise EmberError(f"data.seq_len ({data.seq_len}) is over the base model's context ({context} tokens)")
    source = source_of(data)
    resolved = resolve_inputs(source)
    for item in resolved:
        if isinstance(item, InputFile) and item.fmt == "text":
            raise EmberError(f"{item.name}: plain text holds no conversations; give JSONL, JSON or Parquet records")
    tok, config, added = chat_tokenizer(load_tokenizer(base_dir), tokenizer_config(base_dir))
    ChatTemplate.of(config)  # a template that does not compile fails here
    fingerprint = source_fingerprint(resolved)
    identity = _identity(data, tok.to_str(), config, fingerprint)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        existing = fmt.load_manifest(out)
        if existing.get("identity") == identity:
            log.info("finetune data: %s already holds these conversations (same inputs, settings and tokenizer): "
                     "reused", out)
            return existing
        if locked_by:
            raise EmberError(f"the conversations, data settings or base tokenizer changed since {locked_by} wrote its "
                             f"checkpoints (their data positions index {out}); choose another output.dir to start "
                             "over, or restore the previous data spec to resume")
    _clear(out)
    for d in (out / "train", out / "val"):
        d.mkdir(parents=True, exist_ok=True)
    (out / ".ember-sft").write_text(identity)  # marks the dir as Ember's while it is unfinished
    save_tokenizer(tok, out, model_max_length=context, base_config=config)
    if added:
        log.info("finetune data: added special tokens %s for the chat template", ", ".join(added))

    units = plan_units(resolved, source)
    ensure_ray(address)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(cpus, len(units))
    ds = ray.data.from_items([{"unit": unit_to_json(u)} for u in units], override_num_blocks=len(units))
    results = ds.map_batches(ChatUnitEncoder, fn_constructor_kwargs={"data": data.model_dump(), "out_dir": str(out)},
                             batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    per_unit = {}
    for row in results.iter_rows():
        item = json.loads(row["done"])
        if "error" in item:
            raise EmberError(item["error"])
        per_unit[item["unit"]] = item

    skips = SkipLog()
    splits = {s: {"rows": 0, "tokens": 0, "conversations": 0, "target_tokens": 0, "conversation_tokens": 0,
                  "shards": []} for s in fmt.SPLITS}
    truncated = 0
    for unit in units:
        item = per_unit[unit.index]
        skips.merge(item["skips"])
        truncated += item["truncated"]
        for s in fmt.SPLITS:
            splits[s]["shards"].extend(item["shards"][s])
            for key, value in item["stats"][s].items():
                splits[s][key] += value
    for s in fmt.SPLITS:
        splits[s]["rows"] = sum(sh["rows"] for sh in splits[s]["shards"])
        splits[s]["tokens"] = sum(sh["tokens"] for sh in splits[s]["shards"])
    kept = sum(splits[s]["conversations"] for s in fmt.SPLITS)
    counts = skips.to_dict()
    pad_id = tok.token_to_id(PAD_TOKEN)
    manifest = {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "kind": "sft", "identity": identity,
        "seq_len": data.seq_len, "dtype": fmt.token_dtype(tok.get_vocab_size()).name,
        "vocab_size": tok.get_vocab_size(), "eos_id": eos_token(tok, config)[1],
        "pad_id": pad_id if pad_id is not None else eos_token(tok, config)[1],
        "added_tokens": added, "train_on": data.train_on,
        "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256((out / "tokenizer.json").read_bytes())
                      .hexdigest()},
        "source": {"inputs": [i.split("?", 1)[0] for i in data.inputs], "fingerprint": fingerprint,
                   "base": str(Path(base_dir).resolve())},
        "units": len(units), "splits": splits,
        "conversations": {"read": kept + sum(counts["skipped"].values()), "kept": kept, "truncated": truncated,
                          **counts},
    }
    fmt.write_json_atomic(manifest_path, manifest)
    (out / ".ember-sft").unlink()
    c = manifest["conversations"]
    log.info("finetune data: %d conversations read, %d kept, %d truncated%s", c["read"], kept, truncated,
             (", skipped: " + ", ".join(f"{k} {v}" for k, v in c["skipped"].items())) if c["skipped"] else "")
    for where in c["examples"]:
        log.info("  bad record: %s", where)
    for s in fmt.SPLITS:
        log.info("finetune data: %s: %d conversations in %d rows of %d, %d target tokens", s,
                 splits[s]["conversations"], splits[s]["rows"], data.seq_len + 1, splits[s]["target_tokens"])
    log.info("finetune data: %s in %.1fs", out, time.perf_counter() - t0)
    if not splits["train"]["rows"]:
        raise EmberError(f"no usable conversations in {', '.join(data.inputs)} (see the skip counts above)")
    return manifest
