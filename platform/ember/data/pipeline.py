"""`kind: tokenize`: corpus → tokenizer + packed Arrow shards, with the work units run in parallel by Ray Data.

The flow: resolve inputs (a missing path fails here, before any Ray work) → plan work units → train or load the
tokenizer → (optional) a hash pass for exact-duplicate removal → Ray Data runs `UnitTokenizer` actors (tokenizer
loaded once per actor) over the pending units; each unit reads, normalises, splits, tokenizes, packs and writes its
own shards, then records a done-marker → the driver packs the units' leftover tokens in unit order into a last shard
and writes `manifest.json`.

Everything a unit writes depends only on the unit and the spec, and the final remainder is assembled in unit order,
so the same input and spec give the same shards whatever the number of workers. A rerun after a crash redoes only
units without a done-marker; a rerun of a finished job is a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.data

from ember.config.specs import TokenizeSpec
from ember.data import shards as fmt
from ember.data.sources import (
    DocumentReader,
    Segment,
    SkipLog,
    WorkUnit,
    plan_units,
    read_sample,
    resolve_inputs,
    source_fingerprint,
)
from ember.data.steps import Normalizer, Packer, Tokenize, doc_hash, split_of
from ember.data.tokenizer import (
    eos_token,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    tokenizer_config,
    tokenizer_file,
    train_tokenizer,
    write_tokenizer_config,
)
from ember.errors import EmberError
from ember.progress import FILE as PROGRESS_FILE
from ember.progress import write_progress
from ember.runtime import ensure_ray

log = logging.getLogger("ember")

STATE_DIR = ".ember"  # per-unit done-markers while a job is unfinished; removed once the manifest is written
_OWNED = ("manifest.json", "tokenizer.json", "tokenizer_config.json", "train", "val", STATE_DIR, PROGRESS_FILE)
_TEXT_PER_BATCH = 1 << 21  # characters of text handed to the tokenizer at once


@dataclass(frozen=True)
class UnitPlan:
    """Everything a worker needs to process units: plain values, picklable, no globals."""

    spec: TokenizeSpec
    out_dir: str
    tokenizer_path: str
    eos_id: int
    dtype: str
    duplicates: dict  # unit index -> sorted list of document positions to drop (exact-duplicate removal)
    fingerprints: dict  # unit index -> fingerprint of its input, recorded in its done-marker


def unit_to_json(unit: WorkUnit) -> str:
    return json.dumps(dataclasses.asdict(unit))


def unit_from_json(text: str) -> WorkUnit:
    data = json.loads(text)
    return WorkUnit(data["index"], tuple(Segment(**s) for s in data["segments"]))


def _marker(out_dir: Path, index: int) -> Path:
    return out_dir / STATE_DIR / "units" / f"{_unit_prefix(index)}.json"


def _marker_matches(out: Path, index: int, fingerprint: str) -> bool:
    path = _marker(out, index)
    return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint


def _unit_prefix(index: int) -> str:
    return f"u{index:06d}"


def unit_documents(unit: WorkUnit, plan: UnitPlan, skips: SkipLog):
    """The normalised, filtered and de-duplicated documents of a unit, in order."""
    docs = Normalizer(plan.spec.filter, skips)(DocumentReader(plan.spec.source, skips)(unit))
    drop = set(plan.duplicates.get(unit.index, ()))
    for position, text in enumerate(docs):
        if position in drop:
            skips.skip("duplicate", "", bad_input=False)
        else:
            yield text


def process_unit(unit: WorkUnit, plan: UnitPlan, tokenize: Tokenize) -> dict:
    """Reads, tokenizes, packs and writes one unit's shards, then its done-marker; returns the marker's content."""
    out = Path(plan.out_dir)
    prefix = _unit_prefix(unit.index)
    for split in fmt.SPLITS:  # leftovers of a crashed attempt at this unit
        for stale in (out / split).glob(f"*{prefix}-*.arrow"):
            stale.unlink()
    skips = SkipLog(strict=plan.spec.source.strict)
    row_len = plan.spec.pack.seq_len + 1
    dtype = np.dtype(plan.dtype)
    writers = {s: fmt.ShardWriter(out / s, prefix, row_len, dtype, plan.spec.pack.shard_bytes) for s in fmt.SPLITS}
    packers = {s: Packer(row_len, plan.eos_id, dtype) for s in fmt.SPLITS}
    kept = {s: 0 for s in fmt.SPLITS}
    doc_tokens = {s: 0 for s in fmt.SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in fmt.SPLITS}
    pending_chars = 0

    def flush():
        for s, texts in pending.items():
            if texts:
                ids = tokenize(texts)
                doc_tokens[s] += sum(len(x) for x in ids)
                writers[s].write(packers[s](ids))
                texts.clear()

    for text in unit_documents(unit, plan, skips):
        s = split_of(doc_hash(text), plan.spec.pack.val_fraction)
        pending[s].append(text)
        kept[s] += 1
        pending_chars += len(text)
        if pending_chars >= _TEXT_PER_BATCH:
            flush()
            pending_chars = 0
    flush()
    result = {
        "unit": unit.index,
        "fingerprint": plan.fingerprints.get(unit.index),
        "shards": {s: writers[s].close() for s in fmt.SPLITS},
        "remainder": {s: packers[s].remainder().tolist() for s in fmt.SPLITS},
        "kept": kept,
        "doc_tokens": doc_tokens,
        "skips": skips.to_dict(),
    }
    fmt.write_json_atomic(_marker(out, unit.index), result)
    return result


def unit_hashes(unit: WorkUnit, plan: UnitPlan) -> np.ndarray:
    """Hashes of a unit's documents after normalisation, in order (the dedup pass)."""
    return np.array([doc_hash(t) for t in unit_documents(unit, plan, SkipLog(strict=plan.spec.source.strict))],
                    dtype=np.uint64)


class UnitTokenizer:
    """Ray Data actor: loads the tokenizer once, then processes one unit per batch row."""

    def __init__(self, plan: UnitPlan, threads: int):
        # The tokenizer's Rust thread pool reads this on first use: one pool per actor sized to its CPUs.
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        self.plan = plan
        self.tokenize = Tokenize(load_tokenizer(plan.tokenizer_path))

    def __call__(self, batch: dict) -> dict:
        done = []
        for text in batch["unit"]:
            try:
                result = process_unit(unit_from_json(str(text)), self.plan, self.tokenize)
            except EmberError as exc:  # a user-facing error (strict mode): hand its message to the driver intact
                done.append(json.dumps({"error": str(exc)}))
                continue
            tokens = sum(sh["tokens"] for s in fmt.SPLITS for sh in result["shards"][s])
            done.append(json.dumps({"unit": result["unit"], "tokens": tokens}))
        return {"done": done}


def _hash_batch(batch: dict, plan: UnitPlan) -> dict:
    out = []
    for text in batch["unit"]:
        unit = unit_from_json(str(text))
        try:
            out.append(json.dumps({"unit": unit.index, "hashes": unit_hashes(unit, plan).tolist()}))
        except EmberError as exc:
            out.append(json.dumps({"error": str(exc)}))
    return {"hashes": out}


def _checked(row_json: str) -> dict:
    """A worker's result row, or its user-facing error raised here (finished units keep their done-markers)."""
    item = json.loads(row_json)
    if "error" in item:
        raise EmberError(item["error"])
    return item


def spec_identity(spec: TokenizeSpec, tokenizer_sha: str | None) -> str:
    """What makes two jobs the same apart from the input content: every output-affecting spec field and a given
    tokenizer (not the worker count, the output path or `strict`)."""
    shaping = spec.model_dump(include={"source", "filter", "tokenizer", "pack"})
    shaping["source"].pop("strict")
    blob = json.dumps({"spec": shaping, "tokenizer": tokenizer_sha, "format_version": fmt.FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def dataset_identity(job: str, fingerprint: str) -> str:
    """What makes two finished datasets the same: the job and the input content."""
    return hashlib.sha256(f"{job}:{fingerprint}".encode()).hexdigest()


def unit_fingerprints(units: list[WorkUnit], resolved: list) -> dict[int, str]:
    """Per unit, a hash of its segments and their files' sizes and times: a done-marker counts only while it matches."""
    stats = {f.name: f"{f.size}:{f.mtime_ns}" for f in resolved if not isinstance(f, str)}
    prints = {}
    for unit in units:
        blob = unit_to_json(unit) + "".join(stats.get(seg.name, "builtin") for seg in unit.segments)
        prints[unit.index] = hashlib.sha256(blob.encode()).hexdigest()
    return prints


def _prepare_output(out: Path, job: str, dataset: str, overwrite: bool) -> dict | None:
    """Returns the manifest when this exact dataset is already there; refuses to mix datasets.

    An unfinished run of the same job is resumed even if some input files changed since (their units are redone).
    """
    manifest_path, job_path = out / "manifest.json", out / STATE_DIR / "job.json"
    if manifest_path.is_file():
        existing = fmt.load_manifest(out)
        if existing.get("identity") == dataset:
            return existing
        what = "a different dataset (other inputs, spec or tokenizer)"
    elif job_path.is_file():
        if json.loads(job_path.read_text()).get("job") == job:
            return None
        what = "an unfinished run of a different job (other spec or tokenizer)"
    elif out.is_dir() and any(p.name not in _OWNED for p in out.iterdir()):
        raise EmberError(f"output directory {out} is not empty and holds no Ember dataset; choose another output.dir")
    else:
        return None
    if not overwrite:
        raise EmberError(f"output directory {out} holds {what}; set output.overwrite: true to replace it, "
                         "or choose another output.dir")
    log.info("overwrite: removing the previous dataset in %s", out)
    for name in _OWNED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return None


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


def _prepare_tokenizer(spec: TokenizeSpec, out: Path, units: list[WorkUnit], given: Path | None) -> Path:
    """The dataset's tokenizer.json: the one saved by an earlier attempt, the given one, or a freshly trained one."""
    target = out / "tokenizer.json"
    job_path = out / STATE_DIR / "job.json"
    job = json.loads(job_path.read_text())
    if target.is_file() and job.get("tokenizer_sha256") == file_sha256(target):
        log.info("tokenizer: reusing %s from the earlier attempt", target)
        return target
    if given is not None:
        tok = load_tokenizer(given)
        log.info("tokenizer: using %s (vocab %d)", given, tok.get_vocab_size())
        shutil.copyfile(given, out / ".tmp-tokenizer.json")  # byte for byte: its hash is the one the user knows
        os.replace(out / ".tmp-tokenizer.json", target)
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
    job["tokenizer_sha256"] = file_sha256(target)
    fmt.write_json_atomic(job_path, job)
    return target


def _duplicates(units: list[WorkUnit], plan: UnitPlan, remote_args: dict) -> dict:
    """Exact-duplicate positions per unit: every occurrence after the first, in unit order."""
    ds = ray.data.from_items([{"unit": unit_to_json(u)} for u in units], override_num_blocks=len(units))
    per_unit = {}
    for row in ds.map_batches(_hash_batch, fn_kwargs={"plan": plan}, batch_size=1, **remote_args).iter_rows():
        item = _checked(row["hashes"])
        per_unit[item["unit"]] = np.array(item["hashes"], dtype=np.uint64)
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


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_tokenize(spec: TokenizeSpec, address: str | None = None) -> dict:
    """Runs a tokenize job on Ray (the connected instance, `address`, RAY_ADDRESS or a new local one).

    Returns the manifest. Inputs and the output directory are checked before any Ray work starts.
    """
    t_start = time.perf_counter()
    out = Path(spec.output.dir).expanduser().resolve()
    resolved = resolve_inputs(spec.source)  # fails on a missing path before any Ray work
    given = tokenizer_file(spec.tokenizer.path) if spec.tokenizer.path else None
    fingerprint = source_fingerprint(resolved)
    job = spec_identity(spec, file_sha256(given) if given else None)
    identity = dataset_identity(job, fingerprint)
    finished = _prepare_output(out, job, identity, spec.output.overwrite)
    if finished is not None:
        log.info("%s already holds this dataset (same inputs and spec): nothing to do", out)
        for line in _summary_lines(finished, None, 0):
            log.info(line)
        return finished

    job_path = out / STATE_DIR / "job.json"
    if not job_path.is_file():  # first, so that a directory Ember has written to is always recognised as Ember's
        job_path.parent.mkdir(parents=True, exist_ok=True)
        fmt.write_json_atomic(job_path, {"job": job})
    for d in (out / "train", out / "val", out / STATE_DIR / "units"):
        d.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".tmp-*"):
        stale.unlink()

    units = plan_units(resolved, spec.source)
    tok_path = _prepare_tokenizer(spec, out, units, given)
    tok = load_tokenizer(tok_path)
    _, eos_id = eos_token(tok, tokenizer_config(tok_path))
    dtype = fmt.token_dtype(tok.get_vocab_size())

    ensure_ray(address)
    workers = spec.workers or _cluster_cpus()
    cpus_per_worker = min(1.0, _cluster_cpus() / workers)
    remote_args = {"num_cpus": cpus_per_worker}
    prints = unit_fingerprints(units, resolved)
    plan = UnitPlan(spec, str(out), str(tok_path), eos_id, dtype.name, {}, prints)
    if spec.filter.dedup:
        plan = dataclasses.replace(plan, duplicates=_duplicates(units, plan, remote_args))

    done = {u.index for u in units if _marker_matches(out, u.index, prints[u.index])}
    pending = [u for u in units if u.index not in done]
    if done:
        log.info("resuming: %d of %d units were finished by an earlier run and are reused", len(done), len(units))
    t_work = time.perf_counter()
    if pending:
        log.info("tokenize: %d units on %d workers", len(pending), min(workers, len(pending)))
        ds = ray.data.from_items([{"unit": unit_to_json(u)} for u in pending], override_num_blocks=len(pending))
        results = ds.map_batches(
            UnitTokenizer, fn_constructor_kwargs={"plan": plan, "threads": max(1, int(cpus_per_worker))},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(pending))), **remote_args)
        tokens = 0
        for n, row in enumerate(results.iter_rows(), 1):
            tokens += _checked(row["done"])["tokens"]
            rate = tokens / max(time.perf_counter() - t_work, 1e-9)
            log.info("tokenize: %d/%d units, %s tokens, %s tokens/s", n, len(pending), f"{tokens:,}", f"{rate:,.0f}")
            write_progress(out, {"kind": "tokenize", "units": n, "total_units": len(pending), "tokens": tokens,
                                 "tokens_per_s": rate})

    manifest = _assemble(spec, out, units, identity, fingerprint, tok_path, tok.get_vocab_size(), eos_id, dtype)
    shutil.rmtree(out / STATE_DIR)
    write_progress(out, {"kind": "tokenize", "units": len(units), "total_units": len(units), "done": True,
                         "tokens": sum(manifest["splits"][s]["tokens"] for s in fmt.SPLITS)})
    for line in _summary_lines(manifest, time.perf_counter() - t_start, len(done)):
        log.info(line)
    log.info("dataset: %s", out)
    if manifest["splits"]["train"]["rows"] == 0:
        log.warning("warning: no training rows were written: the corpus holds fewer tokens than one row of "
                    "seq_len + 1 (%d); check the inputs and the skip counts above", spec.pack.seq_len + 1)
    return manifest


def _assemble(spec: TokenizeSpec, out: Path, units: list[WorkUnit], identity: str, fingerprint: str,
              tok_path: Path, vocab_size: int, eos_id: int, dtype: np.dtype) -> dict:
    """Packs the units' remainders (in unit order) into a last shard per split and writes manifest.json."""
    row_len = spec.pack.seq_len + 1
    skips = SkipLog()
    splits = {s: {"rows": 0, "tokens": 0, "documents": 0, "document_tokens": 0, "shards": []} for s in fmt.SPLITS}
    remainders: dict[str, list[list[int]]] = {s: [] for s in fmt.SPLITS}
    for unit in units:
        result = json.loads(_marker(out, unit.index).read_text())
        skips.merge(result["skips"])
        for s in fmt.SPLITS:
            splits[s]["shards"].extend(result["shards"][s])
            splits[s]["documents"] += result["kept"][s]
            splits[s]["document_tokens"] += result["doc_tokens"][s]
            remainders[s].append(result["remainder"][s])
    dropped = 0
    for s in fmt.SPLITS:
        stream = np.array([t for r in remainders[s] for t in r], dtype=dtype)
        n = len(stream) // row_len
        writer = fmt.ShardWriter(out / s, "tail", row_len, dtype, spec.pack.shard_bytes)
        writer.write(stream[: n * row_len].reshape(n, row_len))
        splits[s]["shards"].extend(writer.close())
        dropped += len(stream) - n * row_len
        splits[s]["rows"] = sum(sh["rows"] for sh in splits[s]["shards"])
        splits[s]["tokens"] = sum(sh["tokens"] for sh in splits[s]["shards"])
        listed = {sh["file"] for sh in splits[s]["shards"]}
        for stale in (out / s).glob("*.arrow"):  # shards of units an earlier, different plan had
            if stale.name not in listed:
                stale.unlink()
    kept = sum(splits[s]["documents"] for s in fmt.SPLITS)
    counts = skips.to_dict()
    manifest = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "kind": "pretrain",
        "identity": identity,
        "seq_len": spec.pack.seq_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer": {"file": "tokenizer.json", "sha256": file_sha256(tok_path)},
        "source": {"inputs": [i.split("?", 1)[0] for i in spec.source.inputs], "fingerprint": fingerprint},
        "units": len(units),
        "splits": splits,
        "tokens_dropped": dropped,
        "documents": {"read": kept + sum(counts["skipped"].values()), "kept": kept, **counts},
    }
    fmt.write_json_atomic(out / "manifest.json", manifest)
    return manifest
