"""`kind: tokenize`: corpus → tokenizer + packed Arrow shards, the work units run in parallel by Ray Data.

`CorpusJob` is this job as the unit executor (`ember.data.units.run_job`) runs it: resolve inputs (a missing path
fails here, before any Ray work) → plan work units → (optional) a hash pass for exact-duplicate removal and a
MinHash-LSH pass for near-duplicates (`ember.data.dedup`) → the tokenizer is trained or loaded → the actors run
`CorpusEncoder` over the pending units: each unit's documents are read, normalised, quality-filtered
(`ember.data.quality`), split, tokenized and packed into its own shards → the units' leftover tokens are packed in unit
order into a last shard per split → `manifest.json`.

Everything a unit writes depends only on the unit and the spec, and the final remainder is assembled in unit order,
so the same input and spec give the same shards whatever the number of workers. A rerun after a crash redoes only
units without a done-marker; a rerun of a finished job is a no-op.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable, Iterable, Iterator

import numpy as np

from ember import storage
from ember.config.specs import FilterSpec, TokenizeSpec
from ember.data import shards
from ember.data.dedup import Signatures, keys_from_text, keys_to_text, near_duplicates
from ember.data.quality import QualityFilter
from ember.data.sources import InputFile, SkipLog, WorkUnit, resolve_inputs
from ember.data.steps import Normalizer, Packer, Tokenize, doc_hash, read_sample, read_texts, split_of
from ember.data.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_file,
    tokenizer_identity,
    train_tokenizer,
    write_tokenizer_config,
)
from ember.data.units import (
    DatasetJob,
    UnitJob,
    job_state,
    map_units,
    run_job,
    skip_summary,
    tokenizer_facts,
    update_job_state,
)
from ember.errors import EmberError

log = logging.getLogger("ember")

_TEXT_PER_BATCH = 1 << 21  # characters of text handed to the tokenizer at once


def cleaned(spec: FilterSpec, skips: SkipLog) -> Callable[[Iterable[str]], Iterator[str]]:
    """The per-document steps before dedup: normalisation and, where a rule set is enabled, the quality filters."""
    normalize = Normalizer(spec, skips)
    if spec.quality_rules() is None:
        return normalize
    quality = QualityFilter(spec.quality_rules(), skips)
    return lambda docs: quality(normalize(docs))


def unit_documents(unit: WorkUnit, spec: TokenizeSpec, skips: SkipLog, drop: dict[int, list] | None = None):
    """The normalised and filtered documents of a unit, in order, without those at the positions in `drop` (exact
    or near duplicates of earlier documents: position -> [the reason counted, the document's `doc_hash`]). A
    dropped position whose document is not the one the dedup pass read fails the unit: an input changed, or a read
    failed, between the two passes, and dropping by position would drop the wrong documents."""
    drop = drop or {}
    docs = cleaned(spec.filter, skips)(read_texts(spec.source, skips)(unit))
    for position, text in enumerate(docs):
        if position not in drop:
            yield text
            continue
        reason, expected = drop[position]
        if doc_hash(text) != expected:
            where = unit.segments[0].name if unit.segments else f"unit {unit.index}"
            raise EmberError(f"work unit {unit.index} ({where}, ...): its document {position} is not the one the "
                             "dedup pass read (an input changed or could not be read meanwhile); run the job again")
        skips.skip(reason, "", bad_input=False)


def dedup_documents(spec: TokenizeSpec, unit: WorkUnit) -> Iterator[str]:
    """A unit's documents as the dedup passes see them: cleaned, nothing dropped yet (skips are counted later)."""
    return unit_documents(unit, spec, SkipLog(strict=spec.source.strict))


class CorpusEncoder:
    """The tokenize job's unit encoder: documents → token ids → rows of `seq_len + 1`. A unit's leftover tokens per
    split (too few for a row) go into its record as ``remainder``; the driver packs them into the last shards."""

    def __init__(self, spec: TokenizeSpec, tokenizer_path: str, eos_id: int, dtype: str, duplicates: dict):
        self.spec, self.eos_id, self.dtype = spec, eos_id, np.dtype(dtype)
        self.duplicates = duplicates  # unit index -> {document position to drop: [reason, its doc_hash]}
        self.tokenize = Tokenize(load_tokenizer(tokenizer_path))

    def __call__(self, unit: WorkUnit, skips: SkipLog, write) -> dict:
        spec = self.spec
        packers = {s: Packer(spec.pack.seq_len + 1, self.eos_id, self.dtype) for s in shards.SPLITS}
        stats = {s: {"documents": 0, "document_tokens": 0} for s in shards.SPLITS}
        pending: dict[str, list[str]] = {s: [] for s in shards.SPLITS}
        pending_chars = 0

        def flush():
            for s, texts in pending.items():
                if texts:
                    ids = self.tokenize(texts)
                    stats[s]["document_tokens"] += sum(len(x) for x in ids)
                    write(s, packers[s](ids))
                    texts.clear()

        drop = self.duplicates.get(unit.index, {})
        for text in unit_documents(unit, spec, skips, drop):
            s = split_of(doc_hash(text), spec.pack.val_fraction)
            pending[s].append(text)
            stats[s]["documents"] += 1
            pending_chars += len(text)
            if pending_chars >= _TEXT_PER_BATCH:
                flush()
                pending_chars = 0
        flush()
        return {"stats": stats, "remainder": {s: packers[s].remainder().tolist() for s in shards.SPLITS}}


class DocumentHasher:
    """The dedup pass's worker: for a unit's documents after normalisation and quality filters, in order, their
    hashes (exact dedup) and LSH band keys (near-dedup), whichever the spec turns on, in one read of the unit."""

    def __init__(self, spec: TokenizeSpec):
        self.spec = spec
        near = spec.filter.near_dedup_on()
        self.signatures = Signatures(near) if near else None

    def __call__(self, unit: WorkUnit) -> dict:
        docs = list(dedup_documents(self.spec, unit))
        found = {"unit": unit.index, "hashes": [doc_hash(t) for t in docs]}  # exact dedup, and the drops' check
        if self.signatures is not None:
            found["keys"] = keys_to_text(self.signatures(docs))
        return found


def _summary_lines(manifest: dict, seconds: float | None, reused: int) -> list[str]:
    docs = manifest["documents"]
    plain = {k: v for k, v in docs["skipped"].items() if ":" not in k}
    by_step: dict[str, dict[str, int]] = {}  # "quality:gopher.min_doc_words" -> by_step["quality"]["gopher.min..."]
    for reason, n in docs["skipped"].items():
        if ":" in reason:
            step, rule = reason.split(":", 1)
            by_step.setdefault(step, {})[rule] = n
    lines = [
        f"documents: {docs['read']:,} read, {docs['kept']:,} kept"
        + (", skipped: " + ", ".join(f"{k} {v:,}" for k, v in plain.items()) if plain else "")
        + (", repaired: " + ", ".join(f"{k} {v:,}" for k, v in docs["repaired"].items()) if docs["repaired"] else ""),
    ]
    for step, rules in by_step.items():
        lines.append(f"  removed by the {step} filters: {sum(rules.values()):,} ("
                     + ", ".join(f"{rule} {n:,}" for rule, n in rules.items()) + ")")
    for where in docs["examples"]:
        lines.append(f"  bad record: {where}")
    for split in shards.SPLITS:
        s = manifest["splits"][split]
        lines.append(f"{split}: {s['tokens']:,} tokens in {s['rows']:,} rows of {manifest['seq_len'] + 1}, "
                     f"{len(s['shards'])} shards")
    if seconds is not None:
        total = sum(manifest["splits"][s]["tokens"] for s in shards.SPLITS)
        lines.append(f"{total:,} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s), "
                     f"{reused} of {manifest['units']} units reused from an earlier run")
    return lines


def _prepare_tokenizer(spec: TokenizeSpec, out: str, units: list[WorkUnit], given: str | None) -> str:
    """The dataset's tokenizer.json: the one saved by an earlier attempt, the given one, or a freshly trained one."""
    target = storage.join(out, "tokenizer.json")
    if storage.is_file(target) and job_state(out).get("tokenizer_sha256") == tokenizer_identity(target):
        log.info("tokenizer: reusing %s from the earlier attempt", storage.display(target))
        return target
    if given is not None:
        tok = load_tokenizer(given)
        log.info("tokenizer: using %s (vocab %d)", storage.display(given), tok.get_vocab_size())
        storage.write_bytes(target, storage.read_bytes(given))  # byte for byte: its hash is the one the user knows
        write_tokenizer_config(tok, out, model_max_length=spec.pack.seq_len, base_config=tokenizer_config(given))
    else:
        t0 = time.perf_counter()
        log.info("tokenizer: training byte-level BPE, vocab %d, on up to %d MB of the corpus",
                 spec.tokenizer.vocab_size, spec.tokenizer.sample_bytes >> 20)
        clean = cleaned(spec.filter, SkipLog())
        tok = train_tokenizer(clean(read_sample(units, spec.source, spec.tokenizer.sample_bytes)),
                              spec.tokenizer.vocab_size, spec.tokenizer.min_frequency)
        log.info("tokenizer: trained, vocab %d, in %.1fs", tok.get_vocab_size(), time.perf_counter() - t0)
        save_tokenizer(tok, out, model_max_length=spec.pack.seq_len)
    update_job_state(out, tokenizer_sha256=tokenizer_identity(target))
    return target


def _duplicates(per_unit: list[list[int]]) -> list[list[int]]:
    """Exact-duplicate positions per unit, from each unit's document hashes (units in input order): every occurrence
    after the first."""
    hashes = np.concatenate([np.array(h, dtype=np.uint64) for h in per_unit]) if per_unit else np.zeros(0, np.uint64)
    owner = np.repeat(np.arange(len(per_unit)), [len(h) for h in per_unit])
    position = np.concatenate([np.arange(len(h)) for h in per_unit]) if per_unit else owner
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    drops: list[list[int]] = [[] for _ in per_unit]
    for u, p in zip(owner[~keep].tolist(), position[~keep].tolist()):
        drops[u].append(p)
    log.info("dedup: %d exact duplicates of %d documents", int((~keep).sum()), len(hashes))
    return drops


def dedup_pass(spec: TokenizeSpec, units: list[WorkUnit], workers: int,
               num_cpus: float) -> dict[int, dict[int, list]]:
    """The documents the dedup passes drop: unit index -> {position: ["duplicate" or "near_duplicate", its
    `doc_hash`]}; a document both passes drop counts as an exact duplicate."""
    near = spec.filter.near_dedup_on()
    if not (spec.filter.dedup or near):
        return {}
    found = {item["unit"]: item
             for item in map_units(units, partial(DocumentHasher, spec), workers=workers, num_cpus=num_cpus)}
    found_in_order = [found[u.index] for u in units]
    passes = []
    if near:
        keys = [keys_from_text(f["keys"], near.bands) for f in found_in_order]
        passes.append(("near_duplicate", near_duplicates(keys, partitions=workers)))
    if spec.filter.dedup:
        passes.append(("duplicate", _duplicates([f["hashes"] for f in found_in_order])))
    drops: dict[int, dict[int, list]] = {}
    for reason, per_unit in passes:
        for unit, found_in_unit, positions in zip(units, found_in_order, per_unit):
            for position in positions:
                drops.setdefault(unit.index, {})[position] = [reason, found_in_unit["hashes"][position]]
    return drops


class CorpusJob(DatasetJob):
    """`kind: tokenize` as the unit executor runs it."""

    kind, label = "pretrain", "tokenize"
    dir_key, overwrite_key, strict_key = "output.dir", "output.overwrite", "source.strict"

    def __init__(self, spec: TokenizeSpec):
        self.spec, self.source = spec, spec.source
        self.out, self.overwrite = storage.normalize(spec.output.dir), spec.output.overwrite
        self.seq_len, self.shard_bytes, self.workers = spec.pack.seq_len, spec.pack.shard_bytes, spec.workers
        self.given: str | None = None  # the tokenizer.json the spec names, found by `resolve`
        self.drops: dict[int, dict[int, list]] = {}  # the dedup passes' drops, found by `prepare`

    def resolve(self) -> list[InputFile | str]:
        resolved = resolve_inputs(self.spec.source)
        self.given = tokenizer_file(self.spec.tokenizer.path) if self.spec.tokenizer.path else None
        return resolved

    def identity_parts(self) -> dict:
        """Every output-affecting spec field and a given tokenizer (not the worker count, the output path or
        `strict`)."""
        shaping = self.spec.model_dump(include={"source", "filter", "tokenizer", "pack"})
        shaping["source"].pop("strict")
        return {"spec": shaping, "tokenizer": tokenizer_identity(self.given) if self.given else None}

    def prepare(self, units: list[WorkUnit], workers: int, num_cpus: float):
        self.drops = dedup_pass(self.spec, units, workers, num_cpus)
        tok_path = _prepare_tokenizer(self.spec, self.out, units, self.given)
        vocab_size, eos_id = tokenizer_facts(self.out)
        return partial(CorpusEncoder, self.spec, tok_path, eos_id, shards.token_dtype(vocab_size).name, self.drops)

    def unit_parts(self, unit: int):
        """The documents the dedup passes drop from the unit (they depend on the other units)."""
        drops = self.drops.get(unit)
        return sorted(drops.items()) if drops else None

    def finish(self, job: UnitJob, splits: dict, skips: SkipLog, markers: list[dict]) -> dict:
        """Packs the units' remainders (in unit order) into a last shard per split."""
        dropped = 0
        for s in shards.SPLITS:
            stream = np.array([t for m in markers for t in m["remainder"][s]], dtype=job.dtype)
            n = len(stream) // job.row_len
            writer = shards.ShardWriter(storage.join(job.out_dir, s), "tail", job.row_len, np.dtype(job.dtype),
                                        job.shard_bytes)
            writer.write(stream[: n * job.row_len].reshape(n, job.row_len))
            splits[s]["shards"].extend(writer.close())
            dropped += len(stream) - n * job.row_len
        kept = sum(splits[s]["documents"] for s in shards.SPLITS)
        return {"tokens_dropped": dropped, "documents": skip_summary(skips, kept)}

    def summarize(self, manifest: dict, seconds: float | None, reused: int) -> None:
        for line in _summary_lines(manifest, seconds, reused):
            log.info(line)
        if seconds is None:
            return
        log.info("dataset: %s", storage.display(self.out))
        if manifest["splits"]["train"]["rows"] == 0:
            log.warning("warning: no training rows were written: the corpus holds fewer tokens than one row of "
                        "seq_len + 1 (%d); check the inputs and the skip counts above", self.seq_len + 1)


def run_tokenize(spec: TokenizeSpec, address: str | None = None) -> dict:
    """Runs a tokenize job on Ray (the connected instance, `address`, RAY_ADDRESS or a new local one).

    Returns the manifest. Inputs and the output directory are checked before any Ray work starts.
    """
    return run_job(CorpusJob(spec), address)
