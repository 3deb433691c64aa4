"""Near-duplicate removal for the tokenize job: MinHash signatures, LSH band keys, one document kept per cluster.

Three stages, each where it scales:

1. **Signatures, in parallel per work unit** (`Signatures`, which the tokenize job's dedup pass runs on the unit actor
   pool, in the same read of each unit as the exact-dedup hashes): each document's shingles (word or character
   n-grams) go into a `datasketch.MinHash`; its `num_perm` values are cut into `bands` bands of `rows` values, and
   each band becomes one 63-bit key (band index and values mixed).
2. **Buckets, by key, on Ray Data**: the rows (key, document id) are hash-partitioned by key (a shuffle: every row of
   a key lands in one block); each block yields an edge from every document to the first document of its bucket.
3. **Clusters, on the driver**: the edges' connected components (scipy); each keeps its first document in input
   order. Document ids are input positions (units in order, then documents in a unit), so the result is the same
   whatever the number of workers or partitions.

Candidates are not verified by their Jaccard similarity: two documents are duplicates when any band agrees, which
happens with probability 1 - (1 - s^rows)^bands for a similarity s (the S-curve of LSH).
"""

from __future__ import annotations

import base64
import logging
from typing import Iterable

import numpy as np

from ember.config.specs import NearDedupSpec

log = logging.getLogger("ember")

_SHINGLES_AT_ONCE = 1 << 16  # bounds the memory one huge document takes
_SCHEME = "affine32"  # datasketch 2's default permutation scheme, named: MinHashes made from permutations need it
_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio constant (splitmix64)
_ROWS_PER_PARTITION = 4 << 20  # (key, doc) rows of 16 bytes: 64 MiB


def shingles(text: str, spec: NearDedupSpec) -> set[bytes]:
    """A document's shingles: lowercased word n-grams (whitespace-split), or character n-grams of the text with
    whitespace runs as one space. A document shorter than one n-gram is one shingle."""
    if spec.shingle == "word":
        words = text.lower().split()
        n = min(spec.ngram, len(words))
        return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}
    flat = " ".join(text.lower().split())
    n = min(spec.ngram, len(flat))
    return {flat[i:i + n].encode() for i in range(len(flat) - n + 1)}


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) int64 keys from (documents, bands × rows) MinHash values: equal keys mean equal values in
    that band (up to a 2^-63 chance), and keys of different bands differ."""
    values = signatures.astype(np.uint64).reshape(len(signatures), bands, rows)
    with np.errstate(over="ignore"):
        keys = _splitmix(np.arange(1, bands + 1, dtype=np.uint64) * _MIX)[None, :].repeat(len(values), axis=0)
        for r in range(rows):
            keys = _splitmix(keys ^ values[:, :, r])
    return (keys >> np.uint64(1)).astype(np.int64)


class Signatures:
    """Documents → their LSH band keys, (documents, bands) int64: the MinHash of each one's shingles, cut into bands.
    Built once per worker (the permutations are drawn here, not for each document)."""

    def __init__(self, spec: NearDedupSpec):
        from datasketch import MinHash  # imported where used: a tokenize job without near-dedup never loads it

        self.spec, self.minhash = spec, MinHash
        self.permutations = MinHash(num_perm=spec.num_perm, seed=spec.seed, scheme=_SCHEME).permutations

    def signature(self, text: str) -> np.ndarray:
        m = self.minhash(num_perm=self.spec.num_perm, permutations=self.permutations, scheme=_SCHEME)
        grams = list(shingles(text, self.spec))
        for start in range(0, len(grams), _SHINGLES_AT_ONCE):  # datasketch hashes a batch as (n, num_perm) arrays
            m.update_batch(grams[start:start + _SHINGLES_AT_ONCE])
        return m.hashvalues

    def __call__(self, texts: Iterable[str]) -> np.ndarray:
        sigs = [self.signature(t) for t in texts]
        matrix = np.array(sigs, dtype=np.uint64).reshape(len(sigs), self.spec.num_perm)
        return band_keys(matrix, self.spec.bands, self.spec.rows)


def keys_to_text(keys: np.ndarray) -> str:
    """Band keys as text for a worker's JSON result (base64 of the int64 array)."""
    return base64.b64encode(np.ascontiguousarray(keys, dtype=np.int64).tobytes()).decode()


def keys_from_text(text: str, bands: int) -> np.ndarray:
    """The (documents, bands) keys `keys_to_text` wrote."""
    return np.frombuffer(base64.b64decode(text), dtype=np.int64).reshape(-1, bands)


def bucket_edges(batch: dict) -> dict:
    """A block of (key, doc) rows holding every row of its keys → an edge (first, doc) from each document to the
    smallest document id of its bucket."""
    key, doc = batch["key"], batch["doc"]
    order = np.lexsort((doc, key))
    key, doc = key[order], doc[order]
    starts = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, dtype=bool)
    first = doc[np.maximum.accumulate(np.where(starts, np.arange(len(key)), 0))] if len(key) else doc
    return {"first": first[~starts], "doc": doc[~starts]}


def _edges(keys: list[np.ndarray], offsets: np.ndarray, partitions: int) -> np.ndarray:
    """(2, edges) document-id pairs of shared buckets, grouped by key on Ray Data."""
    import pyarrow as pa
    import ray

    tables = [pa.table({"key": k.ravel(), "doc": np.repeat(np.arange(len(k), dtype=np.int64) + o, k.shape[1])})
              for k, o in zip(keys, offsets) if len(k)]
    if not tables:
        return np.zeros((2, 0), dtype=np.int64)
    rows = sum(t.num_rows for t in tables)
    # A block after the shuffle must hold all rows of its keys: at least one partition per _ROWS_PER_PARTITION rows
    # keeps each well under Ray Data's largest block (128 MiB), which it would otherwise split.
    ds = ray.data.from_arrow(tables).repartition(max(partitions, -(-rows // _ROWS_PER_PARTITION)), keys=["key"])
    pairs = [(b["first"], b["doc"]) for b in
             ds.map_batches(bucket_edges, batch_size=None, batch_format="numpy").iter_batches(batch_format="numpy",
                                                                                             batch_size=None)]
    if not pairs:
        return np.zeros((2, 0), dtype=np.int64)
    return np.stack([np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])]).astype(np.int64)


def near_duplicates(keys: list[np.ndarray], partitions: int) -> list[list[int]]:
    """Near-duplicate positions per unit, from each unit's band keys (units in input order, documents in unit order):
    every document of a cluster but its first in input order. The buckets are grouped over `partitions` blocks."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = np.array([len(k) for k in keys], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(keys) else counts
    total = int(counts.sum())
    drops: list[list[int]] = [[] for _ in keys]
    if total == 0:
        return drops
    edges = _edges(keys, offsets, partitions)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(total, total))
    _, labels = connected_components(graph, directed=False)
    keep = np.zeros(total, dtype=bool)
    keep[np.unique(labels, return_index=True)[1]] = True  # the first document of each cluster
    unit_of = np.repeat(np.arange(len(keys)), counts)
    for doc in np.flatnonzero(~keep).tolist():
        drops[unit_of[doc]].append(doc - int(offsets[unit_of[doc]]))
    log.info("near-dedup: %d near-duplicates of %d documents (%d candidate pairs)", int((~keep).sum()), total,
             edges.shape[1])
    return drops
