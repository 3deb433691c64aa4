"""One executor for the jobs that turn input records into a dataset of shards, a work unit at a time, on Ray Data.

Corpus tokenization (`ember.data.pipeline`, manifest kind ``pretrain``), conversation tokenization
(`ember.data.sft`, kind ``sft``) and preference pairs (`ember.data.pairs`, kind ``preference``) each describe
themselves as a `DatasetJob`: their inputs, the parts of their identity, the tokenizer they write and the encoder that
turns one work unit's records into rows, what they add to the manifest, and their summary. `run_job` does the rest,
once, the same way for all:

- **The steps**: resolve the inputs (a missing path fails before any Ray work) → fingerprint them → the job's and
  the dataset's identities (`dataset_identity`) → ready the output dir → plan work units → connect to Ray → size
  the actor pool → the units' fingerprints → the job's tokenizer and encoder → run the pending units → the manifest
  → the job's summary.
- **The output dir** (`prepare_output`): a finished dataset whose identity matches is reused; an unfinished run of
  the same job is resumed; anything else is refused, or replaced when the spec says so.
- **State** while a job is unfinished: ``.ember/job.json``, a stamp of the job's identity (the spec fields and
  tokenizer that shape the output, not the input content: a run whose inputs changed since resumes and redoes the
  changed units), and ``.ember/units/u000123.json`` per finished unit, a stamp whose identity is the fingerprint of
  the unit's input, with its shards, statistics and skip counts. A rerun redoes only the units without a matching
  marker. ``.ember/`` is removed once ``manifest.json`` is written.
- **The actor pool** (`map_units`): one actor per worker builds its encoder once (the tokenizer is loaded once) and
  takes one unit per batch row. A user-facing error in a worker (strict mode) comes back as an error row and is
  raised on the driver with its message; the units finished before it keep their markers.
- **Shards**: per unit and split ``u000123-000.arrow``, ``u000123-001.arrow``, ... rolled over at `shard_bytes`,
  with the job's extra columns; a crashed attempt's shards of a unit are removed before the unit is redone.
- **The manifest** (`collect`, `publish`): per split the units' shards in unit order and their summed statistics,
  the tokenizer (vocabulary, EOS id, `tokenizer_identity`), the inputs, the merged skip counts, and what the job
  adds.

Everything a unit writes depends only on the unit and the job, so the same inputs give the same dataset whatever the
number of workers. The output dir is a location (`ember.storage`): a local path, or a bucket prefix that workers on
every node write their shards and markers to directly, the manifest last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Protocol

import numpy as np
import ray
import ray.data

from ember import storage
from ember.config.specs import SourceSpec
from ember.data import shards
from ember.data.sources import (
    InputFile,
    Segment,
    SkipLog,
    WorkUnit,
    input_stats,
    plan_units,
    source_fingerprint,
)
from ember.data.tokenizer import eos_token, load_tokenizer, tokenizer_config, tokenizer_identity
from ember.errors import EmberError
from ember.identity import identity_of, read_stamp, stamp_matches, write_stamp
from ember.runs.progress import FILE as PROGRESS_FILE
from ember.runs.progress import write_progress
from ember.runtime import ensure_ray, quiet_libraries

log = logging.getLogger("ember")

STATE_DIR = ".ember"
# What a dataset job writes in its dir (replaced together with data.overwrite); reference/ is a preference run's
# (`ember.train.reference`), figures of these pairs.
OWNED = ("manifest.json", "tokenizer.json", "tokenizer_config.json", PROGRESS_FILE, *shards.SPLITS, STATE_DIR,
         "reference")

Rows = np.ndarray | dict  # (n, row_len) token ids, or such arrays by column name when the job has extra columns


class UnitEncoder(Protocol):
    def __call__(self, unit: WorkUnit, skips: SkipLog, write: Callable[[str, Rows], None]) -> dict:
        """Encodes one unit, handing full rows to `write(split, rows)`. Returns the unit's record: ``stats`` (per
        split, counts that the manifest sums) and anything else the job reads back when it finishes."""


@dataclass(frozen=True)
class UnitJob:
    """What the executor needs to run a job's units: plain values and a picklable encoder factory."""

    out_dir: str
    row_len: int
    dtype: str
    shard_bytes: int
    encoder: Callable[[], UnitEncoder]  # called once per actor
    fingerprints: dict  # unit index -> fingerprint of its input, recorded in its marker
    extra_columns: tuple[str, ...] = ()
    strict: bool = False
    strict_key: str = "source.strict"
    threads: int = 1  # the tokenizer's threads per actor


class DatasetJob:
    """A dataset job as `run_job` runs it: what differs between corpus and conversation tokenization. A job sets
    the attributes and implements the methods; the hooks with a body here are optional."""

    kind: str  # the manifest's kind: "pretrain", "sft", "preference"
    label: str  # names the job in log lines
    out: str  # the dataset dir (a location)
    source: SourceSpec  # the inputs, and how they are cut into work units
    seq_len: int  # rows hold seq_len + 1 token ids
    shard_bytes: int
    overwrite: bool  # whether `out` may hold another dataset, which is then replaced
    dir_key: str  # the spec keys of `out` and of `overwrite`, named in messages
    overwrite_key: str
    strict_key: str  # the spec key of `source.strict`
    workers: int | None = None  # actors in the pool (default: one per CPU of the Ray cluster)
    extra_columns: tuple[str, ...] = ()  # beside input_ids (`ember.data.shards`)
    provenance: dict | None = None  # more of the manifest's record of its inputs (a fine-tune's base model)

    def resolve(self) -> list[InputFile | str]:
        """The resolved inputs (`ember.data.sources.resolve_inputs`), after every check that needs no Ray."""
        raise NotImplementedError

    def identity_parts(self) -> dict:
        """What shapes the rows besides the input content: the spec fields, the tokenizer (`tokenizer_identity`),
        a template. Worker counts, paths and `strict` are not among them."""
        raise NotImplementedError

    def unit_parts(self, unit: int):
        """What shapes one unit's rows besides its own input, known once `prepare` has run (the documents the dedup
        passes drop from it, which depend on other units): in its marker's identity, so a unit whose part changed
        is redone. None: nothing."""
        return None

    def check(self, identity: str) -> None:
        """Refuses, before the output dir is touched, a dataset of `identity` where it must not change."""

    def prepare(self, units: list[WorkUnit], workers: int, num_cpus: float) -> Callable[[], UnitEncoder]:
        """Writes the dataset's tokenizer.json and tokenizer_config.json into `out`; returns the encoder factory
        (picklable: each actor calls it once)."""
        raise NotImplementedError

    def finish(self, job: UnitJob, splits: dict, skips: SkipLog, markers: list[dict]) -> dict:
        """The job's own manifest fields, from the units' summed `splits`, merged `skips` and `markers` (it may add
        shards to `splits`, such as tokenize's last shards of the units' leftovers)."""
        raise NotImplementedError

    def summarize(self, manifest: dict, seconds: float | None, reused: int) -> None:
        """Logs the dataset (`seconds` is None when it was already there); raises when it is unusable."""


# ---------------------------------------------------------------- units as data


def unit_to_json(unit: WorkUnit) -> str:
    return json.dumps(dataclasses.asdict(unit))


def unit_from_json(text: str) -> WorkUnit:
    data = json.loads(text)
    return WorkUnit(data["index"], tuple(Segment(**s) for s in data["segments"]))


def unit_prefix(index: int) -> str:
    return f"u{index:06d}"


def marker_path(out: str, index: int) -> str:
    return storage.join(out, STATE_DIR, "units", f"{unit_prefix(index)}.json")


def job_stamp(out: str) -> str:
    return storage.join(out, STATE_DIR, "job.json")


def unit_fingerprints(units: list[WorkUnit], resolved: list[InputFile | str]) -> dict[int, str]:
    """Per unit, the identity of its segments and their files' sizes and times: a marker counts while it matches."""
    stats = input_stats(resolved)
    return {u.index: identity_of([unit_to_json(u), [stats.get(s.name) for s in u.segments]]) for u in units}


# ---------------------------------------------------------------- the output dir


def prepare_output(out: str, job: str, dataset: str, *, overwrite: bool, dir_key: str,
                   overwrite_key: str = "output.overwrite") -> dict | None:
    """Returns the manifest when `out` already holds this dataset; otherwise readies `out` for the job `job` (its
    stamp, split and state dirs), keeping an unfinished run of the same job. Refuses to mix datasets unless
    `overwrite` (then only what Ember wrote is removed); `overwrite_key` names the setting that allows it."""
    stamp, shown = job_stamp(out), storage.display(out)
    existing, other = _held(out, job, dataset, dir_key)
    if existing is not None:
        return existing
    if other is not None:
        if not overwrite:
            raise EmberError(f"{shown} holds {other}; set {overwrite_key}: true to replace it, or choose another "
                             f"{dir_key}")
        log.info("replacing the previous dataset in %s", shown)
        for name in OWNED:
            storage.delete_tree(storage.join(out, name))
            storage.delete(storage.join(out, name))
    if not storage.is_file(stamp):  # first, so that a directory Ember has written to is always recognised as Ember's
        write_stamp(stamp, job)
    for split in shards.SPLITS:
        storage.make_dirs(storage.join(out, split))
    if not storage.is_uri(out):  # a crashed local writer's temporary files (an object store has none)
        for rel, _ in storage.list_files(out):
            if rel.rsplit("/", 1)[-1].startswith(".tmp-"):
                storage.delete(storage.join(out, rel))
    return None


def _held(out: str, job: str, dataset: str, dir_key: str) -> tuple[dict | None, str | None]:
    """What `out` holds: (the manifest of this very dataset, None), or (None, what other output of Ember's it holds),
    or (None, None) for nothing or an unfinished run of this job. Anything not Ember's is refused."""
    present = storage.list_names(out)
    if "manifest.json" in present:
        existing = shards.load_manifest(out)
        if existing.get("identity") == dataset:
            return existing, None
        return None, "a different dataset (other inputs, settings or tokenizer)"
    if storage.is_file(job_stamp(out)):
        same = stamp_matches(job_stamp(out), job)
        return None, None if same else "an unfinished run of a different job (other settings or tokenizer)"
    if present - set(OWNED):
        raise EmberError(f"{storage.display(out)} is not empty and holds no Ember dataset; choose another {dir_key}")
    return None, None


def job_state(out: str) -> dict:
    """The job stamp's fields (a job may keep more there, such as the hash of the tokenizer it trained)."""
    return read_stamp(job_stamp(out)) or {}


def update_job_state(out: str, **fields) -> None:
    state = job_state(out)
    write_stamp(job_stamp(out), state["identity"], **{k: v for k, v in state.items() if k != "identity"}, **fields)


def read_markers(out: str, fingerprints: dict, units: list[WorkUnit]) -> dict[int, dict]:
    """The markers of the units that are finished: whose marker matches their input (`fingerprints`) now."""
    markers = {}
    for u in units:
        marker = read_stamp(marker_path(out, u.index))
        if marker is not None and marker["identity"] == fingerprints[u.index]:
            markers[u.index] = marker
    return markers


# ---------------------------------------------------------------- running units


class UnitRunner:
    """Runs one unit of a job in a worker: its encoder's rows into shards, then the unit's marker."""

    def __init__(self, job: UnitJob):
        # The tokenizer's Rust thread pool reads these on first use: one pool per actor, sized to its CPUs.
        os.environ["RAYON_NUM_THREADS"] = str(job.threads)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        self.job = job
        self.encode = job.encoder()

    def __call__(self, unit: WorkUnit) -> dict:
        job, out, prefix = self.job, self.job.out_dir, unit_prefix(unit.index)
        for split in shards.SPLITS:  # leftovers of a crashed attempt at this unit
            for rel, _ in storage.list_files(storage.join(out, split), recursive=False):
                if rel.startswith(f"{prefix}-") and rel.endswith(".arrow"):
                    storage.delete(storage.join(out, split, rel))
        skips = SkipLog(strict=job.strict, strict_key=job.strict_key)
        writers = {s: shards.ShardWriter(storage.join(out, s), prefix, job.row_len, np.dtype(job.dtype),
                                         job.shard_bytes, job.extra_columns) for s in shards.SPLITS}
        record = self.encode(unit, skips, lambda split, rows: writers[split].write(rows))
        written = {s: writers[s].close() for s in shards.SPLITS}
        marker = {**record, "unit": unit.index, "shards": written, "skips": skips.to_dict()}
        write_stamp(marker_path(out, unit.index), job.fingerprints[unit.index], **marker)
        return {"unit": unit.index, "tokens": sum(sh["tokens"] for s in shards.SPLITS for sh in written[s])}


class UnitWorker:
    """Ray Data actor: builds its worker once, then runs one unit per batch row. A user-facing error, in a unit or
    in building the worker, becomes an error row (its message intact) instead of failing the whole Ray Data job
    with a traceback."""

    def __init__(self, make_worker: Callable[[], Callable[[WorkUnit], dict]]):
        quiet_libraries()
        try:
            self.work, self.failed = make_worker(), None
        except EmberError as exc:
            self.work, self.failed = None, str(exc)

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["unit"]:
            try:
                if self.failed is not None:
                    raise EmberError(self.failed)
                results.append(json.dumps(self.work(unit_from_json(str(text)))))
            except EmberError as exc:
                results.append(json.dumps({"error": str(exc)}))
        return {"result": results}


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def pool(workers: int | None) -> tuple[int, float]:
    """(actors, CPUs per actor) for `workers` (default: one per CPU of the Ray cluster)."""
    cpus = cluster_cpus()
    workers = workers or cpus
    return workers, min(1.0, cpus / workers)


def map_units(units: list[WorkUnit], make_worker: Callable[[], Callable[[WorkUnit], dict]], *, workers: int,
              num_cpus: float) -> Iterator[dict]:
    """`worker(unit)` for every unit on a Ray Data actor pool of `workers` actors (the worker built once per actor by
    `make_worker`), yielded as units complete. A worker's EmberError is raised here with its message."""
    if not units:
        return
    ds = ray.data.from_items([{"unit": unit_to_json(u)} for u in units], override_num_blocks=len(units))
    results = ds.map_batches(UnitWorker, fn_constructor_kwargs={"make_worker": make_worker}, batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=min(workers, len(units))), num_cpus=num_cpus)
    for row in results.iter_rows():
        item = json.loads(row["result"])
        if "error" in item:
            raise EmberError(item["error"])
        yield item


def run_units(job: UnitJob, units: list[WorkUnit], *, workers: int, num_cpus: float, label: str,
              progress_dir: str | os.PathLike | None = None) -> int:
    """Runs the units without a matching marker in the job's output dir; returns how many were reused from an
    earlier run. The job's progress record (`ember.runs.progress`) goes to `progress_dir` (default: the output dir)
    as units complete.

    The pool starts once the job is ready, not before: starting it while the driver trained the tokenizer was
    measured slower on 2 cores (benchmarks/README.md), so that overlap was removed."""
    done = set(read_markers(job.out_dir, job.fingerprints, units))
    pending = [u for u in units if u.index not in done]
    if done:
        log.info("%s: resuming: %d of %d units were finished by an earlier run and are reused", label, len(done),
                 len(units))
    if not pending:
        return len(done)
    log.info("%s: %d units on %d workers", label, len(pending), min(workers, len(pending)))
    t0, tokens = time.perf_counter(), 0
    for n, item in enumerate(map_units(pending, partial(UnitRunner, job), workers=workers, num_cpus=num_cpus), 1):
        tokens += item["tokens"]
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        log.info("%s: %d/%d units, %s tokens, %s tokens/s", label, n, len(pending), f"{tokens:,}", f"{rate:,.0f}")
        write_progress(progress_dir or job.out_dir, {"kind": "tokenize", "units": n, "total_units": len(pending),
                                                     "tokens": tokens, "tokens_per_s": rate})
    return len(done)


# ---------------------------------------------------------------- the manifest


def collect(job: UnitJob, units: list[WorkUnit]) -> tuple[dict, SkipLog, list[dict]]:
    """The units' markers in unit order: per split their shards and summed statistics, the merged skip log, and
    the markers themselves (for what a job adds)."""
    splits = {s: {"shards": []} for s in shards.SPLITS}
    skips, markers = SkipLog(), []
    found = read_markers(job.out_dir, job.fingerprints, units)
    for unit in units:
        marker = found.get(unit.index)
        if marker is None:
            raise EmberError(f"{storage.display(marker_path(job.out_dir, unit.index))}: unit {unit.index} has no "
                             "done-marker after its run (was the output dir changed meanwhile?); run the job again")
        markers.append(marker)
        skips.merge(marker["skips"])
        for s in shards.SPLITS:
            splits[s]["shards"].extend(marker["shards"][s])
            for key, value in marker["stats"][s].items():
                splits[s][key] = splits[s].get(key, 0) + value
    return splits, skips, markers


def publish(job: UnitJob, splits: dict, manifest: dict) -> dict:
    """Totals the splits, removes shards no unit lists (of an earlier, different plan), writes manifest.json and
    drops the job's state; the last progress record counts the whole dataset. Returns the manifest."""
    out = job.out_dir
    for s in shards.SPLITS:
        splits[s]["rows"] = sum(sh["rows"] for sh in splits[s]["shards"])
        splits[s]["tokens"] = sum(sh["tokens"] for sh in splits[s]["shards"])
        listed = {sh["file"] for sh in splits[s]["shards"]}
        for rel, _ in storage.list_files(storage.join(out, s), recursive=False):
            if rel.endswith(".arrow") and rel not in listed:
                storage.delete(storage.join(out, s, rel))
    manifest = {"format": shards.FORMAT, "format_version": shards.FORMAT_VERSION, "seq_len": job.row_len - 1,
                "dtype": job.dtype, **manifest, "splits": splits}
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    storage.delete_tree(storage.join(out, STATE_DIR))
    write_progress(out, {"kind": "tokenize", "units": manifest["units"], "total_units": manifest["units"],
                         "done": True, "tokens": sum(splits[s]["tokens"] for s in shards.SPLITS)})
    return manifest


def skip_summary(skips: SkipLog, kept: int, **more) -> dict:
    """The manifest's count of records read, kept and skipped (with reasons and first locations)."""
    counts = skips.to_dict()
    return {"read": kept + sum(counts["skipped"].values()), "kept": kept, **more, **counts}


def source_summary(inputs: list[str], fingerprint: str, **more) -> dict:
    """The manifest's record of its inputs: as given, without query strings (which may carry credentials)."""
    return {"inputs": [storage.display(i) for i in inputs], "fingerprint": fingerprint, **more}


def tokenizer_facts(out: str) -> tuple[int, int]:
    """(vocabulary size, EOS id) of the tokenizer in a dataset dir."""
    tok = load_tokenizer(out)
    return tok.get_vocab_size(), eos_token(tok, tokenizer_config(out))[1]


# ---------------------------------------------------------------- the whole job


def dataset_identity(job: str, fingerprint: str) -> str:
    """What makes two finished datasets the same: the job (`job_identity`) and the input content."""
    return identity_of({"job": job, "inputs": fingerprint})


def job_identity(parts: dict) -> str:
    """What makes two jobs the same apart from the input content: the job's parts and the shard format."""
    return identity_of({**parts, "format_version": shards.FORMAT_VERSION})


def run_job(job: DatasetJob, address: str | None = None, progress_dir: str | os.PathLike | None = None) -> dict:
    """Runs a dataset job on Ray (the connected instance, `address`, RAY_ADDRESS or a new local one), or finds its
    dataset already in `job.out`; returns the manifest. The progress record goes to `progress_dir` (default: the
    output dir) while the units run."""
    t0 = time.perf_counter()
    resolved = job.resolve()  # a missing input fails here, before any Ray work
    fingerprint = source_fingerprint(resolved)
    job_id = job_identity(job.identity_parts())
    identity = dataset_identity(job_id, fingerprint)
    job.check(identity)
    finished = prepare_output(job.out, job_id, identity, overwrite=job.overwrite, dir_key=job.dir_key,
                              overwrite_key=job.overwrite_key)
    if finished is not None:
        log.info("%s: %s already holds this dataset (same inputs, settings and tokenizer): nothing to do",
                 job.label, storage.display(job.out))
        job.summarize(finished, None, 0)
        return finished
    units = plan_units(resolved, job.source)
    ensure_ray(address)
    workers, num_cpus = pool(job.workers)
    encoder = job.prepare(units, workers, num_cpus)
    fingerprints = {u: fp if job.unit_parts(u) is None else identity_of([fp, job.unit_parts(u)])
                    for u, fp in unit_fingerprints(units, resolved).items()}
    vocab_size, eos_id = tokenizer_facts(job.out)
    unit_job = UnitJob(job.out, job.seq_len + 1, shards.token_dtype(vocab_size).name, job.shard_bytes, encoder,
                       fingerprints, extra_columns=job.extra_columns, strict=job.source.strict,
                       strict_key=job.strict_key, threads=max(1, int(num_cpus)))
    reused = run_units(unit_job, units, workers=workers, num_cpus=num_cpus, label=job.label,
                       progress_dir=progress_dir)
    splits, skips, markers = collect(unit_job, units)
    own = job.finish(unit_job, splits, skips, markers)
    manifest = publish(unit_job, splits, {
        "kind": job.kind, "identity": identity, "vocab_size": vocab_size, "eos_id": eos_id,
        "tokenizer": {"file": "tokenizer.json", "sha256": tokenizer_identity(job.out)},
        "source": source_summary(job.source.inputs, fingerprint, **(job.provenance or {})), "units": len(units), **own})
    job.summarize(manifest, time.perf_counter() - t0, reused)
    return manifest
