"""Weighted mixtures of datasets: which source each sample of a run comes from, deterministic for a seed,
proportional at every prefix of training, and exactly resumable on any worker count.

`Mixture` places global sample ``k`` without any history: the sources are split in two halves (by position), and
sample ``k`` goes to the left half when ``⌊a(k+1) + ½⌋ > ⌊a·k + ½⌋``, ``a`` the left half's share of the weight;
its number within that half is ``⌊a·k + ½⌋`` (on the right, ``k`` minus that), and each half splits its own samples
the same way down to one source. So `locate(k)` gives (source, the source's own sample number) in O(log sources), and
among the first ``n`` samples each source has its share of ``n`` within half a sample per level of the split
(`counts`). Within each global batch (the `window`) the samples are then put in a seeded order, so that which rank
gets which source is random, not a fixed pattern; the counts at each step are unchanged. The source's sample number
goes through that source's own `ShardReader` order (its seed ``(seed, source)``), so each source streams its shards
as the run reaches them.

`exhausted: stop` ends the run before any source is read a second time: `samples_before_exhausted` is how many
samples the mixture gives before that, which the run plan turns into its last step; `recycle` starts the source's
next epoch (a new order) instead.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import numpy as np

from ember import storage
from ember.config.specs import DataSpec
from ember.data.shards import DEFAULT_BLOCK_BYTES, ShardReader, load_manifest, rank_batches
from ember.errors import EmberError
from ember.identity import identity_of

log = logging.getLogger("ember")


class Mixture:
    """Sources drawn by weight: `locate` a sample, `counts` of a prefix, `samples_before_exhausted`. With a `window`
    (a run's global batch), the samples of each window are placed in a seeded order of their own: the window holds
    the same samples of each source, but which rank gets which depends on the seed, not on a fixed pattern (with
    weights 1:1 and 2 workers, each worker would otherwise only ever see one source)."""

    def __init__(self, weights: list[float], *, seed: int = 0, window: int = 1):
        if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise EmberError(f"mixture weights must be positive finite numbers, got {weights}")
        self.weights = [w / sum(weights) for w in weights]
        self.seed, self.window = seed, window
        self._tree = self._split(list(range(len(weights))))
        self._order: tuple[int, np.ndarray] | None = None  # (window, its order), the last one used

    def _split(self, ids: list[int]):
        if len(ids) == 1:
            return ids[0]
        left, right = ids[: len(ids) // 2], ids[len(ids) // 2:]
        share = sum(self.weights[i] for i in left) / sum(self.weights[i] for i in ids)
        return share, self._split(left), self._split(right)

    def locate(self, k: int) -> tuple[int, int]:
        """Global sample `k` → (its source, the source's own sample number)."""
        if self.window > 1:
            w, position = divmod(k, self.window)
            if self._order is None or self._order[0] != w:
                self._order = (w, np.random.default_rng([self.seed, w]).permutation(self.window))
            k = w * self.window + int(self._order[1][position])
        node = self._tree
        while not isinstance(node, int):
            share, left, right = node
            before = math.floor(share * k + 0.5)
            if math.floor(share * (k + 1) + 0.5) > before:
                node, k = left, before
            else:
                node, k = right, k - before
        return node, k

    def counts(self, n: int) -> list[int]:
        """How many of the first `n` samples each source gives (with a window: at a multiple of it)."""
        out = [0] * len(self.weights)

        def walk(node, m):
            if isinstance(node, int):
                out[node] = m
                return
            share, left, right = node
            to_left = math.floor(share * m + 0.5)
            walk(left, to_left)
            walk(right, m - to_left)

        walk(self._tree, n)
        return out

    def samples_before_exhausted(self, sizes: list[int]) -> tuple[int, int]:
        """(n, source): the mixture gives `n` samples before `source` would need a sample past its `sizes` (rows in
        one epoch); the first source to run out."""
        best = None
        for i, size in enumerate(sizes):
            lo, hi = 0, max(2, int(size / self.weights[i]))
            while self.counts(hi)[i] <= size:  # counts[i] <= size at lo, > size at hi
                lo, hi = hi, 2 * hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if self.counts(mid)[i] <= size else (lo, mid)
            if best is None or lo < best[0]:
                best = (lo, i)
        return best


def dataset_sources(data: DataSpec) -> list[tuple[str, str, float]]:
    """A pretraining mixture's sources as (name, dataset dir, weight); a name defaults to the last part of the dir
    (`DataSpec` refuses two sources of one name)."""
    return [(m.name or storage.name(storage.normalize(m.dir)), storage.normalize(m.dir), m.weight) for m in data.mix]


def plan_mixture(sources: list[tuple[str, str, float]], exhausted: str, kind: str,
                 global_batch: int) -> tuple[dict, list[dict]]:
    """The record of a mixture of datasets, `sources` as (name, dir, weight): their weights, rows and dataset
    identities, and how it ends; and the datasets' manifests, after checking that they can be mixed: the same kind,
    tokenizer and row length, and rows for at least one step."""
    names, manifests = [name for name, _, _ in sources], []
    for name, directory, _ in sources:
        manifest = load_manifest(directory)
        where = f"data.mix source {name!r} ({storage.display(directory)})"
        if manifest.get("kind") != kind:
            raise EmberError(f"{where} is a {manifest.get('kind')!r} dataset; this job reads {kind!r} datasets")
        if not manifest["splits"]["train"]["rows"]:
            raise EmberError(f"{where} has no training rows")
        manifests.append(manifest)
    first = manifests[0]
    for name, manifest in zip(names, manifests):
        if not _tokenizer_hash(manifest):
            raise EmberError(f"data.mix source {name!r}: its manifest records no tokenizer hash, so it cannot be "
                             "checked to share the others' tokenizer (tokenize it again with this version)")
    for name, manifest in zip(names[1:], manifests[1:]):
        theirs, ours = _tokenizer_hash(manifest), _tokenizer_hash(first)
        if theirs != ours:
            raise EmberError(f"data.mix: sources {names[0]!r} and {name!r} have different tokenizers (sha256 "
                             f"{ours} and {theirs}); a mixture's datasets must share one (tokenize them with the same "
                             "tokenizer.path)")
        if manifest["seq_len"] != first["seq_len"]:
            raise EmberError(f"data.mix: sources {names[0]!r} and {name!r} have rows of {first['seq_len']} and "
                             f"{manifest['seq_len']} tokens; a mixture's datasets must share their seq_len")
    mixture = Mixture([weight for _, _, weight in sources])
    rows = [m["splits"]["train"]["rows"] for m in manifests]
    record = {"sources": [{"name": n, "dir": d, "weight": w, "share": share, "rows": r, "dataset": identity_of(m)}
                          for (n, d, w), share, r, m in zip(sources, mixture.weights, rows, manifests)],
              "exhausted": exhausted, "window": global_batch, "samples": None, "runs_out": None}
    if exhausted == "stop":
        samples, source = mixture.samples_before_exhausted(rows)
        record.update(samples=samples, runs_out=names[source])
        if samples < global_batch:
            raise EmberError(f"data.mix: source {names[source]!r} runs out after {samples} samples, less than one "
                             f"step of train.global_batch_size {global_batch} (data.exhausted: recycle reuses it)")
    return record, manifests


def _tokenizer_hash(manifest: dict) -> str | None:
    return (manifest.get("tokenizer") or {}).get("sha256")


def tokens_by_source(record: dict, samples: int, seq_len: int) -> dict[str, int]:
    """Training tokens each source gave in the first `samples` samples of the run."""
    counts = Mixture([s["weight"] for s in record["sources"]]).counts(samples)
    return {s["name"]: c * seq_len for s, c in zip(record["sources"], counts)}


class MixtureReader:
    """A `ShardReader`'s `batches` over a mixture's sources: global sample ``k`` is the `Mixture`'s, rank ``r`` of
    ``W`` takes ``k ≡ r (mod W)``, and each source's sample number goes through its own reader's order."""

    def __init__(self, record: dict, split: str = "train", *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 block_bytes: int = DEFAULT_BLOCK_BYTES):
        if not 0 <= rank < world_size:
            raise EmberError(f"rank {rank} is outside world size {world_size}")
        sources = [(i, s) for i, s in enumerate(record["sources"])
                   if split == "train" or load_manifest(s["dir"])["splits"][split]["rows"]]
        if not sources:
            raise EmberError(f"no source of the mixture has a {split!r} split")
        self.names = [s["name"] for _, s in sources]
        self.readers = [ShardReader(s["dir"], split, seed=(seed, i), block_bytes=block_bytes) for i, s in sources]
        self.mixture = Mixture([s["weight"] for _, s in sources], seed=seed, window=record.get("window", 1))
        self.stop = record["exhausted"] == "stop" and split == "train"
        self.rank, self.world_size = rank, world_size

    def columns(self, k: int) -> dict[str, np.ndarray]:
        """Every column of global sample `k`."""
        source, j = self.mixture.locate(k)
        reader = self.readers[source]
        if self.stop and j >= len(reader):  # the plan ends the run before this: a bug if reached
            raise EmberError(f"data.mix source {self.names[source]!r} ran out at sample {k} (data.exhausted: stop)")
        return reader.columns(reader.sample_row(j))

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray | dict, int]]:
        """As `ShardReader.batches`."""
        return rank_batches(self.columns, batch_size, start, self.rank, self.world_size)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def training_reader(data_dir: str, mixture: dict | None, split: str, *, seed: int, rank: int, world_size: int,
                    block_bytes: int | None) -> ShardReader | MixtureReader | None:
    """The reader of a run's split: data_dir's, or the mixture's; None when the split has no rows."""
    block = {"block_bytes": block_bytes or DEFAULT_BLOCK_BYTES}
    if mixture is None:
        if not load_manifest(data_dir)["splits"][split]["rows"]:
            return None
        return ShardReader(data_dir, split, seed=seed, rank=rank, world_size=world_size, **block)
    if not any(load_manifest(s["dir"])["splits"][split]["rows"] for s in mixture["sources"]):
        return None
    return MixtureReader(mixture, split, seed=seed, rank=rank, world_size=world_size, **block)
