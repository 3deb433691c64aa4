"""Dedup throughput and what the filters remove, in one run.

(a) Fraction removed on the built-in corpora as they are (builtin:python-docs; builtin:python-qa, each record's prompt
    and response as one text document): exact dedup, near-dedup (MinHash-LSH, the default settings: word 5-grams,
    128 permutations, 16 bands of 8 rows), and each quality rule set (Gopher repetition, Gopher, C4) alone, with the
    rules behind the removals.
(b) Throughput of the dedup pass (`filter.dedup` and `filter.near_dedup`: read, normalise, hash, MinHash signatures
    on the unit actor pool, the bucket shuffle on Ray Data, clusters on the driver) in documents/s, on 2 workers
    against 1, over builtin:python-docs repeated `--copies` times (each copy's documents tagged with the copy number,
    so every copy is a near-duplicate of the first: the removed fraction must be (copies - 1) / copies). Ray is
    started before timing; the actors' start and the shuffle are included. Best of 2 runs each, interleaved.

    python benchmarks/dedup_bench.py [--copies 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import psutil

from ember.config import parse_spec
from ember.config.specs import QualitySpec
from ember.data import builtin
from ember.data.quality import QualityFilter
from ember.data.sources import SkipLog, plan_units, resolve_inputs

FILE_MB = 8  # corpus files of about this size, so units spread over the workers


def tokenize_spec(inputs: list[str], filters: dict, unit_bytes: int | None = None):
    return parse_spec({"kind": "tokenize", "source": {"inputs": inputs, "unit_bytes": unit_bytes},
                       "filter": filters, "output": {"dir": "unused"}})


def timed_dedup_pass(spec, workers: int) -> tuple[dict, float, int]:
    """The tokenize job's dedup pass (`CorpusJob.prepare`'s first step): (drops per unit, seconds, documents)."""
    from ember.data.pipeline import dedup_documents, dedup_pass

    units = plan_units(resolve_inputs(spec.source), spec.source)
    t0 = time.perf_counter()
    drops = dedup_pass(spec, units, workers, 1.0)
    seconds = time.perf_counter() - t0
    documents = sum(1 for u in units for _ in dedup_documents(spec, u))  # counted outside the timing
    return drops, seconds, documents


def removed(drops: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for per_unit in drops.values():
        for reason in per_unit.values():
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def corpus_texts(corpus: str) -> list[str]:
    from ember.data.pipeline import dedup_documents

    spec = tokenize_spec([corpus], {})
    return [t for u in plan_units(resolve_inputs(spec.source), spec.source) for t in dedup_documents(spec, u)]


def fractions_removed(corpus: str) -> None:
    texts = corpus_texts(corpus)
    drops, seconds, n = timed_dedup_pass(tokenize_spec([corpus], {"dedup": True, "near_dedup": {"enabled": True}}), 2)
    counts = removed(drops)
    print(f"{corpus}: {n:,} documents; exact duplicates {counts.get('duplicate', 0):,} "
          f"({counts.get('duplicate', 0) / n:.1%}), near-duplicates {counts.get('near_duplicate', 0):,} "
          f"({counts.get('near_duplicate', 0) / n:.1%}) in {seconds:.1f}s on 2 workers")
    for section in ("gopher_repetition", "gopher", "c4"):
        skips = SkipLog()
        kept = sum(1 for _ in QualityFilter(QualitySpec(**{section: {"enabled": True}}), skips)(texts))
        top = sorted(skips.skipped.items(), key=lambda kv: -kv[1])[:4]
        print(f"  quality {section:17s}: {len(texts) - kept:5,} removed ({(len(texts) - kept) / len(texts):.1%}); "
              "top rules: " + ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in top))


def parts(spec) -> None:
    """Where the pass's time goes: MinHash signatures in this one process (the work the unit actors share), then the
    bucket shuffle and clusters alone (on 2 partitions, as the 2-worker pass)."""
    from ember.data.dedup import Signatures, near_duplicates
    from ember.data.pipeline import dedup_documents

    units = plan_units(resolve_inputs(spec.source), spec.source)
    texts = [list(dedup_documents(spec, u)) for u in units]
    signatures = Signatures(spec.filter.near_dedup)
    t0 = time.perf_counter()
    keys = [signatures(t) for t in texts]
    sign = time.perf_counter() - t0
    t0 = time.perf_counter()
    near_duplicates(keys, partitions=2)
    group = time.perf_counter() - t0
    n = sum(len(t) for t in texts)
    print(f"parts: signatures in 1 process {n / sign:,.0f} documents/s ({sign:.1f}s); bucket shuffle on Ray Data + "
          f"clusters {group:.1f}s")


def write_copies(directory: Path, copies: int) -> int:
    """JSONL files of builtin:python-docs repeated `copies` times, copy k's documents ending in " [k]"."""
    docs = [d.text for p in range(builtin.num_parts(builtin.PYTHON_DOCS)) for d in builtin.python_docs(p)]
    directory.mkdir(parents=True)
    part, f, n = 0, None, 0
    for copy in range(copies):
        for doc in docs:
            if f is None or f.tell() >= FILE_MB << 20:
                if f:
                    f.close()
                f = open(directory / f"part-{part:04d}.jsonl", "w")
                part += 1
            f.write(json.dumps({"text": doc if copy == 0 else f"{doc} [{copy}]"}) + "\n")
            n += 1
    f.close()
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=20, help="copies of builtin:python-docs for the throughput")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    print(f"machine: {platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")
    ray.init(address="local", num_cpus=psutil.cpu_count(), logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False

    print("(a) fraction removed, default settings")
    for corpus in ("builtin:python-docs", "builtin:python-qa"):
        fractions_removed(corpus)

    work = Path(tempfile.mkdtemp(prefix="ember-dedup-bench-"))
    n_docs = write_copies(work / "copies", args.copies)
    spec = tokenize_spec([str(work / "copies")], {"dedup": True, "near_dedup": {"enabled": True}})
    best: dict[int, float] = {}
    for workers in (2, 1, 2, 1):
        drops, seconds, n = timed_dedup_pass(spec, workers)
        best[workers] = min(best.get(workers, seconds), seconds)
        counts = removed(drops)
    units = len(plan_units(resolve_inputs(spec.source), spec.source))
    print(f"(b) dedup pass (exact + near) over builtin:python-docs x{args.copies} ({n:,} documents, {units} units):")
    for workers in (1, 2):
        print(f"    {workers} worker{'s' if workers > 1 else ' '}: {n / best[workers]:8,.0f} documents/s "
              f"({best[workers]:.1f}s)")
    print(f"    removed: {counts.get('duplicate', 0):,} exact + {counts.get('near_duplicate', 0):,} near = "
          f"{sum(counts.values()) / n:.3f} of the documents (expected {(args.copies - 1) / args.copies:.3f})")
    print(f"scaling: 2 vs 1 workers = {best[1] / best[2]:.2f}   (best of 2 runs each, interleaved)")
    parts(spec)
    assert n == n_docs
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
