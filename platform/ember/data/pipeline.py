"""`kind: tokenize`: corpus → tokenizer + packed Arrow shards, the work units run in parallel by Ray Data.

The flow: resolve inputs (a missing path fails here, before any Ray work) → plan work units → (optional) a hash
pass for exact-duplicate removal → the unit executor (`ember.data.units`) starts its actor pool, and while the
actors start the tokenizer is trained or loaded → the actors run `CorpusEncoder` over the pending units: each unit's
documents are read, normalised, split, tokenized and packed into its own shards → the units' leftover tokens are
packed in unit order into a last shard per split → `manifest.json`.

Everything a unit writes depends only on the unit and the spec, and the final remainder is assembled in unit order,
so the same input and spec give the same shards whatever the number of workers. A rerun after a crash redoes only
units without a done-marker; a rerun of a finished job is a no-op.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np

from ember import storage
from ember.config.specs import TokenizeSpec
from ember.data import shards as fmt
from ember.data import units as ex
from ember.data.sources import SkipLog, WorkUnit, plan_units, resolve_inputs, source_fingerprint
from ember.data.steps import Normalizer, Packer, Tokenize, doc_hash, read_sample, read_texts, split_of
from ember.data.tokenizer import (
    eos_token,
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_file,
    train_tokenizer,
    write_tokenizer_config,
)
from ember.identity import content_sha256, identity_of
from ember.runtime import ensure_ray

log = logging.getLogger("ember")

_TEXT_PER_BATCH = 1 << 21  # characters of text handed to the tokenizer at once


def unit_documents(unit: WorkUnit, spec: TokenizeSpec, skips: SkipLog, drop: frozenset = frozenset()):
    """The normalised and filtered documents of a unit, in order, without those at the positions in `drop` (exact
    duplicates of earlier documents)."""
    docs = Normalizer(spec.filter, skips)(read_texts(spec.source, skips)(unit))
    for position, text in enumerate(docs):
        if position in drop:
            skips.skip("duplicate", "", bad_input=False)
        else:
            yield text


class CorpusEncoder:
    """The tokenize job's unit encoder: documents → token ids → rows of `seq_len + 1`. A unit's leftover tokens per
    split (too few for a row) go into its record as ``remainder``; the driver packs them into the last shards."""

    def __init__(self, spec: TokenizeSpec, tokenizer_path: str, eos_id: int, dtype: str, duplicates: dict):
        self.spec, self.eos_id, self.dtype = spec, eos_id, np.dtype(dtype)
        self.duplicates = duplicates  # unit index -> sorted document positions to drop
        self.tokenize = Tokenize(load_tokenizer(tokenizer_path))

    def __call__(self, unit: WorkUnit, skips: SkipLog, write) -> dict:
        spec = self.spec
        packers = {s: Packer(spec.pack.seq_len + 1, self.eos_id, self.dtype) for s in fmt.SPLITS}
        stats = {s: {"documents": 0, "document_tokens": 0} for s in fmt.SPLITS}
        pending: dict[str, list[str]] = {s: [] for s in fmt.SPLITS}
        pending_chars = 0

        def flush():
            for s, texts in pending.items():
                if texts:
                    ids = self.tokenize(texts)
                    stats[s]["document_tokens"] += sum(len(x) for x in ids)
                    write(s, packers[s](ids))
                    texts.clear()

        drop = frozenset(self.duplicates.get(unit.index, ()))
        for text in unit_documents(unit, spec, skips, drop):
            s = split_of(doc_hash(text), spec.pack.val_fraction)
            pending[s].append(text)
            stats[s]["documents"] += 1
            pending_chars += len(text)
            if pending_chars >= _TEXT_PER_BATCH:
                flush()
                pending_chars = 0
        flush()
        return {"stats": stats, "remainder": {s: packers[s].remainder().tolist() for s in fmt.SPLITS}}


class DocumentHasher:
    """The dedup pass's worker: the hashes of a unit's documents after normalisation, in order."""

    def __init__(self, spec: TokenizeSpec):
        self.spec = spec

    def __call__(self, unit: WorkUnit) -> dict:
        docs = unit_documents(unit, self.spec, SkipLog(strict=self.spec.source.strict))
        return {"unit": unit.index, "hashes": [doc_hash(t) for t in docs]}


def spec_identity(spec: TokenizeSpec, tokenizer_sha: str | None) -> str:
    """What makes two jobs the same apart from the input content: every output-affecting spec field and a given
    tokenizer (not the worker count, the output path or `strict`)."""
    shaping = spec.model_dump(include={"source", "filter", "tokenizer", "pack"})
    shaping["source"].pop("strict")
    return identity_of({"spec": shaping, "tokenizer": tokenizer_sha, "format_version": fmt.FORMAT_VERSION})


def dataset_identity(job: str, fingerprint: str) -> str:
    """What makes two finished datasets the same: the job and the input content."""
    return identity_of({"job": job, "inputs": fingerprint})


def _summary_lines(manifest: dict, seconds: float | None, reused: int) -> list[str]:
    docs = manifest["documents"]
    lines = [
        f"documents: {docs['read']:,} read, {docs['kept']:,} kept"
        + (", skipped: " + ", ".join(f"{k} {v:,}" for k, v in docs["skipped"].items()) if docs["skipped"] else "")
        + (", repaired: " + ", ".join(f"{k} {v:,}" for k, v in docs["repaired"].items()) if docs["repaired"] else ""),
    ]
    for where in docs["examples"]:
        lines.append(f"  bad record: {where}")
    for split in fmt.SPLITS:
        s = manifest["splits"][split]
        lines.append(f"{split}: {s['tokens']:,} tokens in {s['rows']:,} rows of {manifest['seq_len'] + 1}, "
                     f"{len(s['shards'])} shards")
    if seconds is not None:
        total = sum(manifest["splits"][s]["tokens"] for s in fmt.SPLITS)
        lines.append(f"{total:,} tokens in {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s), "
                     f"{reused} of {manifest['units']} units reused from an earlier run")
    return lines


def _prepare_tokenizer(spec: TokenizeSpec, out: str, units: list[WorkUnit], given: str | None) -> str:
    """The dataset's tokenizer.json: the one saved by an earlier attempt, the given one, or a freshly trained one."""
    target = storage.join(out, "tokenizer.json")
    if storage.is_file(target) and ex.job_state(out).get("tokenizer_sha256") == content_sha256(target):
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
        normalize = Normalizer(spec.filter, SkipLog())
        tok = train_tokenizer(normalize(read_sample(units, spec.source, spec.tokenizer.sample_bytes)),
                              spec.tokenizer.vocab_size, spec.tokenizer.min_frequency)
        log.info("tokenizer: trained, vocab %d, in %.1fs", tok.get_vocab_size(), time.perf_counter() - t0)
        save_tokenizer(tok, out, model_max_length=spec.pack.seq_len)
    ex.update_job_state(out, tokenizer_sha256=content_sha256(target))
    return target


def _tokenizer_facts(tok_path: str) -> tuple[int, int]:
    """(vocab size, EOS id) of the dataset's tokenizer."""
    tok = load_tokenizer(tok_path)
    return tok.get_vocab_size(), eos_token(tok, tokenizer_config(tok_path))[1]


def _duplicates(spec: TokenizeSpec, units: list[WorkUnit], workers: int, num_cpus: float) -> dict:
    """Exact-duplicate positions per unit: every occurrence after the first, in unit order."""
    per_unit = {item["unit"]: np.array(item["hashes"], dtype=np.uint64)
                for item in ex.map_units(units, partial(DocumentHasher, spec), workers=workers, num_cpus=num_cpus)}
    hashes = np.concatenate([per_unit[u.index] for u in units]) if units else np.zeros(0, np.uint64)
    owner = np.concatenate([np.full(len(per_unit[u.index]), u.index) for u in units]) if units else hashes
    position = np.concatenate([np.arange(len(per_unit[u.index])) for u in units]) if units else hashes
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    drops: dict[int, list[int]] = {}
    for u, p in zip(owner[~keep].tolist(), position[~keep].tolist()):
        drops.setdefault(u, []).append(p)
    log.info("dedup: %d exact duplicates of %d documents", int((~keep).sum()), len(hashes))
    return drops


def run_tokenize(spec: TokenizeSpec, address: str | None = None) -> dict:
    """Runs a tokenize job on Ray (the connected instance, `address`, RAY_ADDRESS or a new local one).

    Returns the manifest. Inputs and the output directory are checked before any Ray work starts.
    """
    t_start = time.perf_counter()
    out = storage.normalize(spec.output.dir)
    resolved = resolve_inputs(spec.source)  # fails on a missing path before any Ray work
    given = tokenizer_file(spec.tokenizer.path) if spec.tokenizer.path else None
    fingerprint = source_fingerprint(resolved)
    job_id = spec_identity(spec, content_sha256(given) if given else None)
    identity = dataset_identity(job_id, fingerprint)
    finished = ex.prepare_output(out, job_id, identity, overwrite=spec.output.overwrite, dir_key="output.dir")
    if finished is not None:
        log.info("%s already holds this dataset (same inputs and spec): nothing to do", storage.display(out))
        for line in _summary_lines(finished, None, 0):
            log.info(line)
        return finished

    units = plan_units(resolved, spec.source)
    ensure_ray(address)
    workers, num_cpus = ex.pool(spec.workers)
    duplicates = _duplicates(spec, units, workers, num_cpus) if spec.filter.dedup else {}
    fingerprints = ex.unit_fingerprints(units, resolved)

    def prepare() -> ex.UnitJob:  # runs while the pool's actors start
        tok_path = _prepare_tokenizer(spec, out, units, given)
        vocab_size, eos_id = _tokenizer_facts(tok_path)
        dtype = fmt.token_dtype(vocab_size).name
        return ex.UnitJob(out, spec.pack.seq_len + 1, dtype, spec.pack.shard_bytes,
                          partial(CorpusEncoder, spec, tok_path, eos_id, dtype, duplicates), fingerprints,
                          strict=spec.source.strict, threads=max(1, int(num_cpus)))

    job, reused = ex.run_units(prepare, units, out_dir=out, fingerprints=fingerprints, workers=workers,
                               num_cpus=num_cpus, label="tokenize")
    manifest = _assemble(spec, job, units, identity, fingerprint)
    for line in _summary_lines(manifest, time.perf_counter() - t_start, reused):
        log.info(line)
    log.info("dataset: %s", storage.display(out))
    if manifest["splits"]["train"]["rows"] == 0:
        log.warning("warning: no training rows were written: the corpus holds fewer tokens than one row of "
                    "seq_len + 1 (%d); check the inputs and the skip counts above", spec.pack.seq_len + 1)
    return manifest


def _assemble(spec: TokenizeSpec, job: ex.UnitJob, units: list[WorkUnit], identity: str, fingerprint: str) -> dict:
    """Packs the units' remainders (in unit order) into a last shard per split and writes manifest.json."""
    tok_path = storage.join(job.out_dir, "tokenizer.json")
    vocab_size, eos_id = _tokenizer_facts(tok_path)
    splits, skips, markers = ex.collect(job, units)
    dropped = 0
    for s in fmt.SPLITS:
        stream = np.array([t for m in markers for t in m["remainder"][s]], dtype=job.dtype)
        n = len(stream) // job.row_len
        writer = fmt.ShardWriter(storage.join(job.out_dir, s), "tail", job.row_len, np.dtype(job.dtype),
                                 job.shard_bytes)
        writer.write(stream[: n * job.row_len].reshape(n, job.row_len))
        splits[s]["shards"].extend(writer.close())
        dropped += len(stream) - n * job.row_len
    kept = sum(splits[s]["documents"] for s in fmt.SPLITS)
    return ex.publish(job, splits, {
        "kind": "pretrain",
        "identity": identity,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": {"file": "tokenizer.json", "sha256": content_sha256(tok_path)},
        "source": ex.source_summary(spec.source.inputs, fingerprint),
        "units": len(units),
        "tokens_dropped": dropped,
        "documents": ex.skip_summary(skips, kept),
    })
