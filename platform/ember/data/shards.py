"""The shard format (packed Arrow IPC files plus `manifest.json`) and the reader training uses.

A dataset directory::

    manifest.json        format version, tokenizer hash, seq_len, dtype, shards per split, document counts
    tokenizer.json       + tokenizer_config.json
    train/*.arrow        Arrow IPC files; each row is one packed sequence of seq_len + 1 token ids
    val/*.arrow

Rows are a `fixed_size_list<uint16|uint32>[seq_len + 1]` column ``input_ids`` (the token dtype: the smallest that
holds the vocabulary). Other kinds of dataset add columns of the same shape (`COLUMN_TYPES`):

- fine-tuning (manifest kind ``sft``, `SFT_COLUMNS`): ``loss_mask`` (uint8: 1 where the token is a training target)
  and ``segments`` (uint16: which packed conversation a token belongs to, 1, 2, ...; 0 is padding);
- preference pairs (kind ``preference``, `PREFERENCE_COLUMNS`), one pair per row, unpacked: ``input_ids`` is the
  chosen side (prompt and answer) and ``loss_mask`` marks its answer's tokens; ``rejected_ids`` (the token dtype)
  and ``rejected_mask`` (uint8) are the rejected side the same way. Both sides are padded with the manifest's
  ``pad_id`` (mask 0).

The manifest lists each shard with its rows, tokens, bytes and SHA-256. A file is written under a temporary name and
renamed when complete (in object storage: uploaded whole once complete), so a crash never leaves a half shard that
looks whole.

The dataset directory is a location (`ember.storage`). The reader reads a bucket's shards through the node cache,
checked against the manifest's sizes and hashes.

`ShardReader` serves samples in a deterministic global order computed from the manifest alone (rank ``r`` of ``W``
takes samples ``k ≡ r (mod W)``, so resuming at a sample count continues the same order whatever ``W`` is), opening
the shards as the order reaches them: a bucket's shards stream through the node cache, a block of them ahead, within
its budget. `ember.data.mixture` draws from several datasets by weight the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from ember import storage
from ember.errors import EmberError

FORMAT = "ember-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ROWS_PER_BATCH = 1024  # Arrow record batch size inside a shard


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


TOKEN_IDS = "token ids"  # a column of token ids: of the dataset's token dtype, as input_ids
# Every column a shard may hold beside input_ids, and its type.
COLUMN_TYPES: dict[str, np.dtype | str] = {"loss_mask": np.dtype(np.uint8), "segments": np.dtype(np.uint16),
                                           "rejected_ids": TOKEN_IDS, "rejected_mask": np.dtype(np.uint8)}
SFT_COLUMNS = ("loss_mask", "segments")
PREFERENCE_COLUMNS = ("loss_mask", "rejected_ids", "rejected_mask")


def column_dtypes(dtype: np.dtype, extra_columns: Sequence[str] = ()) -> dict[str, np.dtype]:
    """Each column's dtype, input_ids first, for a dataset whose token dtype is `dtype`."""
    dtype = np.dtype(dtype)
    return {"input_ids": dtype, **{c: dtype if COLUMN_TYPES[c] is TOKEN_IDS else COLUMN_TYPES[c]
                                   for c in extra_columns}}


def shard_schema(row_len: int, dtype: np.dtype, extra_columns: Sequence[str] = ()) -> pa.Schema:
    columns = column_dtypes(dtype, extra_columns)
    return pa.schema([pa.field(name, pa.list_(pa.from_numpy_dtype(t), row_len)) for name, t in columns.items()],
                     metadata={b"ember.row_length": str(row_len).encode()})


class ShardWriter:
    """Writes packed rows to shard files named ``{prefix}-{n:03d}.arrow``, rolling over at `shard_bytes`.

    Rows are an (n, row_len) array of token ids, or with `extra_columns` (fine-tuning and preference data) a dict of
    such arrays by column name. A shard is written under a temporary name and renamed when complete; in object storage
    it is written to a local temporary file and uploaded whole when complete."""

    def __init__(self, directory: str | os.PathLike, prefix: str, row_len: int, dtype: np.dtype, shard_bytes: int,
                 extra_columns: Sequence[str] = ()):
        self.directory = storage.normalize(directory)
        self._staging = tempfile.gettempdir() if storage.is_uri(self.directory) else self.directory
        self.prefix = prefix
        self.row_len = row_len
        self.dtypes = column_dtypes(dtype, extra_columns)
        row_bytes = row_len * sum(t.itemsize for t in self.dtypes.values())
        self.rows_per_shard = max(1, shard_bytes // row_bytes)
        self.schema = shard_schema(row_len, self.dtypes["input_ids"], extra_columns)
        self.shards: list[dict] = []  # {"file", "rows", "tokens"} of each completed shard
        self._writer = None
        self._rows_in_current = 0
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):03d}.arrow"

    def write(self, rows: np.ndarray | dict[str, np.ndarray]) -> None:
        """Appends rows, buffered into record batches of ROWS_PER_BATCH."""
        columns = rows if isinstance(rows, dict) else {"input_ids": rows}
        if set(columns) != set(self.dtypes):
            raise ValueError(f"rows have columns {sorted(columns)}, the shard {sorted(self.dtypes)}")
        n = len(columns["input_ids"])
        if n == 0:
            return
        self._pending.append({c: columns[c].astype(t, copy=False) for c, t in self.dtypes.items()})
        self._pending_rows += n
        while self._pending_rows >= ROWS_PER_BATCH:
            self._flush(ROWS_PER_BATCH)

    def _flush(self, limit: int) -> None:
        block = self._pending[0] if len(self._pending) == 1 else \
            {c: np.concatenate([p[c] for p in self._pending]) for c in self.dtypes}
        room = self.rows_per_shard - self._rows_in_current
        take = min(limit, room, self._pending_rows)
        self._write_batch({c: a[:take] for c, a in block.items()})
        rest = {c: a[take:] for c, a in block.items()}
        self._pending_rows = len(rest["input_ids"])
        self._pending = [rest] if self._pending_rows else []
        if self._rows_in_current >= self.rows_per_shard:
            self._close_current()

    def _write_batch(self, columns: dict[str, np.ndarray]) -> None:
        if self._writer is None:
            suffix = f"-{os.getpid()}-{id(self)}" if storage.is_uri(self.directory) else ""
            self._tmp = Path(self._staging) / f".tmp-{self._name()}{suffix}"
            self._writer = pa.ipc.new_file(str(self._tmp), self.schema)
        arrays = [pa.FixedSizeListArray.from_arrays(pa.array(columns[c].reshape(-1)), self.row_len)
                  for c in self.dtypes]
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self._rows_in_current += len(columns["input_ids"])

    def _close_current(self) -> None:
        self._writer.close()
        name = self._name()
        size, sha256 = self._tmp.stat().st_size, storage.file_sha256(self._tmp)
        if storage.is_uri(self.directory):
            try:
                storage.put_file(self._tmp, storage.join(self.directory, name))
            finally:
                self._tmp.unlink(missing_ok=True)
        else:
            os.replace(self._tmp, Path(self.directory) / name)
        self.shards.append({"file": name, "rows": self._rows_in_current,
                            "tokens": self._rows_in_current * self.row_len, "bytes": size, "sha256": sha256})
        self._writer = None
        self._rows_in_current = 0

    def close(self) -> list[dict]:
        """Flushes what is buffered and renames the last shard into place; returns the shards written."""
        while self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._close_current()
        return self.shards


def load_manifest(dataset_dir: str | os.PathLike) -> dict:
    """Reads and checks a dataset's manifest.json (in a directory or a bucket prefix)."""
    location = storage.join(storage.normalize(dataset_dir), "manifest.json")
    path = storage.display(location)
    try:
        data = storage.read_bytes(location)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        more = " (a dataset is complete once its manifest is written: was its job stopped before the end?)" \
            if storage.list_names(dataset_dir) else ""
        raise EmberError(f"not a dataset directory (no manifest.json): {storage.display(dataset_dir)}{more}") \
            from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmberError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise EmberError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})")
    return manifest


DEFAULT_BLOCK_BYTES = 1 << 30  # shards shuffled together; a reader holds at most two blocks' shards at once


@dataclass
class _Shard:
    """One shard file of a split: where it is, its rows' global range in file order, its manifest record."""

    location: str
    start: int  # global index of its first row
    rows: int
    record: dict  # the manifest's entry: file, rows, bytes, sha256


class _Opened:
    """A shard file memory-mapped: its record batches' rows (and extra columns) as views into the map."""

    def __init__(self, path: Path, row_len: int, extra: list[str] | None):
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        self.extra = [c for c in table.column_names if c != "input_ids"] if extra is None else extra
        self.chunks: list[dict[str, np.ndarray]] = []
        for i in range(table.column("input_ids").num_chunks):
            self.chunks.append({c: table.column(c).chunks[i].flatten().to_numpy(zero_copy_only=True)
                                .reshape(-1, row_len) for c in ("input_ids", *self.extra)})
        self.starts = np.cumsum([0] + [len(c["input_ids"]) for c in self.chunks[:-1]])

    def columns(self, index: int) -> dict[str, np.ndarray]:
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        return {c: a[index - self.starts[i]] for c, a in self.chunks[i].items()}


class ShardReader:
    """Deterministic, rank-sliced, exactly resumable and streaming access to one split of a dataset.

    **The order** comes from the manifest's row counts alone. A split no larger than `block_bytes` is one block:
    epoch ``e`` is a permutation of all its rows seeded by ``(seed, e)``. A larger split is read in blocks: epoch
    ``e`` permutes the shards (seeded by ``(seed, e)``), cuts that order into blocks of at most `block_bytes` (at
    least one shard each), and permutes the rows within each block (seeded by ``(seed, e, block)``). Sample ``k`` of
    the run is position ``k mod N`` of epoch ``k // N``; rank ``r`` of ``W`` takes the samples ``k ≡ r (mod W)``, so
    resuming at a sample count continues the same global order whatever ``W`` is. A `seed` may be a tuple (a
    mixture's sources each have their own).

    **Streaming**: nothing is read when the reader is made. A shard is opened (a bucket's: fetched into the node
    cache and checked against the manifest's size and SHA-256) when a sample first reaches it; entering a block
    fetches its shards and the next block's in the background; the shards of blocks behind are closed, so the node
    cache can evict them within its budget (`ember.storage.NodeCache`; `check_cache_budget` checks before a run
    that two blocks of each streamed split fit it). A shard that cannot be fetched, or does not match
    its record, stops the reader with an error naming it: no row of it is served. (A local shard is read as it is:
    only its presence is checked.)"""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train", *, seed: int | tuple = 0, rank: int = 0,
                 world_size: int = 1, block_bytes: int = DEFAULT_BLOCK_BYTES):
        if split not in SPLITS:
            raise EmberError(f"unknown split {split!r} (one of: {', '.join(SPLITS)})")
        if not 0 <= rank < world_size:
            raise EmberError(f"rank {rank} is outside world size {world_size}")
        self.dataset_dir = storage.normalize(dataset_dir)
        self.manifest = load_manifest(dataset_dir)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        self.row_len = self.manifest["seq_len"] + 1
        self.block_bytes = block_bytes
        self.shards: list[_Shard] = []
        start = 0
        for record in self.manifest["splits"][split]["shards"]:
            rel = storage.relative_key(str(record["file"]), storage.join(self.dataset_dir, "manifest.json"))
            location = storage.join(self.dataset_dir, split, rel)
            if not storage.is_uri(location) and not os.path.isfile(location):
                raise EmberError(f"shard listed in the manifest is missing: {storage.display(location)}")
            self.shards.append(_Shard(location, start, int(record["rows"]), record))
            start += int(record["rows"])
        self.num_rows = start
        if self.num_rows == 0:
            raise EmberError(f"{storage.display(self.dataset_dir)}: split {split!r} has no rows")
        self._starts = np.array([s.start for s in self.shards])
        self.extra_columns: list[str] | None = None  # the columns beside input_ids: known once a shard is open
        self._open: dict[int, _Opened] = {}  # shard index -> its map, for the current and the next block
        self._pending: dict[int, Future] = {}  # shard index -> its fetch, in the background
        self._fetcher: ThreadPoolExecutor | None = None
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (shard order, block starts)
        self._block: tuple[int, int] | None = None  # (epoch, block) of the last sample served
        self._block_rows: dict[tuple[int, int], np.ndarray] = {}

    # ---------------------------------------------------------------- the order

    def _rng(self, *more: int) -> np.random.Generator:
        return np.random.default_rng([*self.seed, *more])

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's shard order and the position (in the epoch) at which each block starts."""
        if epoch not in self._epochs:
            sizes = [int(s.record.get("bytes") or s.rows * self.row_len * 2) for s in self.shards]
            if sum(sizes) <= self.block_bytes:
                order, starts = np.arange(len(self.shards)), np.array([0])
            else:
                order = self._rng(epoch).permutation(len(self.shards))
                starts, size, position = [0], 0, 0
                for i in order:
                    if size and size + sizes[i] > self.block_bytes:
                        starts.append(position)
                        size = 0
                    size += sizes[i]
                    position += self.shards[i].rows
                starts = np.array(starts)
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = (order, starts)
        return self._epochs[epoch]

    def _shards_of(self, epoch: int, block: int) -> list[int]:
        order, starts = self._epoch(epoch)
        rows = np.cumsum([0] + [self.shards[i].rows for i in order])
        first = int(np.searchsorted(rows, starts[block], side="right")) - 1
        end = starts[block + 1] if block + 1 < len(starts) else self.num_rows
        last = int(np.searchsorted(rows, end, side="left"))
        return [int(i) for i in order[first:last]]

    def _rows_of(self, epoch: int, block: int) -> np.ndarray:
        """The global row indices of a block, in the order its samples take them."""
        key = (epoch, block)
        if key not in self._block_rows:
            if len(self._epoch(epoch)[1]) == 1:
                rows = self._rng(epoch).permutation(self.num_rows)
            else:
                members = np.concatenate([np.arange(self.shards[i].start, self.shards[i].start + self.shards[i].rows)
                                          for i in self._shards_of(epoch, block)])
                rows = members[self._rng(epoch, block).permutation(len(members))]
            self._block_rows = {k: v for k, v in self._block_rows.items() if k >= (epoch, block - 1)}
            self._block_rows[key] = rows
        return self._block_rows[key]

    def _locate(self, k: int) -> tuple[int, int, int]:
        """Global sample `k` → (epoch, block, position in the block)."""
        epoch, position = divmod(k, self.num_rows)
        starts = self._epoch(epoch)[1]
        block = int(np.searchsorted(starts, position, side="right")) - 1
        return epoch, block, position - int(starts[block])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of one epoch in sample order."""
        return np.concatenate([self._rows_of(epoch, b) for b in range(len(self._epoch(epoch)[1]))])

    def sample_row(self, k: int) -> int:
        """The row index of global sample `k` (k counts samples across epochs and ranks)."""
        epoch, block, position = self._locate(k)
        self._entered(epoch, block)
        return int(self._rows_of(epoch, block)[position])

    # ---------------------------------------------------------------- the shards

    def _entered(self, epoch: int, block: int) -> None:
        """Keeps the shards of this block and the next open or on their way; closes the others."""
        if self._block == (epoch, block):
            return
        self._block = (epoch, block)
        following = (epoch, block + 1) if block + 1 < len(self._epoch(epoch)[1]) else (epoch + 1, 0)
        keep = set(self._shards_of(epoch, block)) | set(self._shards_of(*following))
        for i in [i for i in self._open if i not in keep]:
            del self._open[i]  # the map closes with its last view: the node cache may evict the file
        for i in [i for i in self._pending if i not in keep]:  # reached by no sample of this rank after all
            self._pending.pop(i).cancel()
        if storage.is_uri(self.dataset_dir):
            if self._fetcher is None:
                # One download at a time: each makes room for itself in the cache first, so the budget holds.
                self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-shards")
            for i in self._shards_of(epoch, block) + self._shards_of(*following):  # this block's first
                if i not in self._open and i not in self._pending:
                    self._pending[i] = self._fetcher.submit(self._fetch, i)

    def _fetch(self, i: int) -> Path:
        """A shard's local file: itself, or its node-cache copy checked against the manifest's size and hash."""
        shard = self.shards[i]
        try:
            if not storage.is_uri(shard.location):
                if not os.path.isfile(shard.location):
                    raise FileNotFoundError(shard.location)
                return Path(shard.location)
            return storage.NodeCache().fetch(shard.location, size=shard.record.get("bytes"),
                                             sha256=shard.record.get("sha256")).path
        except FileNotFoundError:
            raise EmberError(f"shard listed in the manifest is missing: {storage.display(shard.location)}") from None

    def _opened(self, i: int) -> _Opened:
        if i not in self._open:
            pending = self._pending.pop(i, None)
            path = pending.result() if pending is not None else self._fetch(i)
            try:
                opened = _Opened(path, self.row_len, self.extra_columns)
            except FileNotFoundError:  # a cached copy evicted between its fetch and now: fetched again
                opened = _Opened(self._fetch(i), self.row_len, self.extra_columns)
            self._open[i] = opened
            self.extra_columns = opened.extra
        return self._open[i]

    def __len__(self) -> int:
        return self.num_rows

    def columns(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` of every column: input_ids, and the dataset's other columns (`COLUMN_TYPES`)."""
        i = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._opened(i).columns(index - self.shards[i].start)

    def row(self, index: int) -> np.ndarray:
        """Row `index` of the split in file order, shape (seq_len + 1,)."""
        return self.columns(index)["input_ids"]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray | dict, int]]:
        """Endless (batch, global samples consumed after it) pairs from `start` (a global count of samples consumed)
        on. A batch is an int64 array (batch_size, seq_len + 1), or for a dataset with more columns (fine-tuning,
        preference) a dict of such arrays by column name."""
        return rank_batches(lambda k: self.columns(self.sample_row(k)), batch_size, start, self.rank, self.world_size)

    def close(self) -> None:
        """Closes the maps and stops the background fetches."""
        self._open.clear()
        if self._fetcher is not None:
            self._fetcher.shutdown(wait=True, cancel_futures=True)
            self._fetcher, self._pending = None, {}


def rank_batches(sample: Callable[[int], dict], batch_size: int, start: int, rank: int,
                 world_size: int) -> Iterator[tuple[np.ndarray | dict, int]]:
    """(batch, global samples consumed after it) pairs of rank `rank` of `world_size`, which takes the global samples
    ``k ≡ rank (mod world_size)`` from `start` on; `sample(k)` gives sample k's columns. A batch is input_ids alone
    as an int64 array, or every column by name (datasets with more columns: fine-tuning, preference)."""
    k, consumed = start + rank, start
    while True:
        rows = [sample(k + i * world_size) for i in range(batch_size)]
        k += batch_size * world_size
        consumed += batch_size * world_size
        if len(rows[0]) == 1:
            yield np.stack([r["input_ids"] for r in rows]).astype(np.int64), consumed
        else:
            yield {c: _batch_column([r[c] for r in rows]) for c in rows[0]}, consumed


def _batch_column(values: list) -> np.ndarray:
    """One column of a batch: token ids and masks as int64 (what embedding lookups and losses take), figures carried
    beside the rows (a preference pair's reference log-probabilities) as they are."""
    stacked = np.stack(values)
    return stacked.astype(np.int64) if np.issubdtype(stacked.dtype, np.integer) else stacked


def check_cache_budget(dataset_dirs: list[str], block_bytes: int) -> None:
    """Fails when the streamed datasets (those in a bucket) need more of the node cache at once than its budget:
    up to two blocks of each split (the one being read and the next, fetched ahead)."""
    need = 0
    for directory in dataset_dirs:
        if storage.is_uri(directory):
            for split in load_manifest(directory)["splits"].values():
                need += min(sum(int(s.get("bytes") or 0) for s in split["shards"]), 2 * block_bytes)
    budget = storage.NodeCache().budget
    if need > budget:
        raise EmberError(f"the datasets streamed from object storage need up to {need / 2**20:,.0f} MiB of the node "
                         f"cache at once (two blocks of data.shuffle_block_bytes, {block_bytes / 2**20:,.0f} MiB, per "
                         f"dataset and split), over its budget of {budget / 2**20:,.0f} MiB: raise "
                         f"{storage.CACHE_BYTES_ENV} or lower data.shuffle_block_bytes")
