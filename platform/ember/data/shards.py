"""The shard format (packed Arrow IPC files plus `manifest.json`) and the reader training uses.

A dataset directory::

    manifest.json        format version, tokenizer hash, seq_len, dtype, shards per split, document counts
    tokenizer.json       + tokenizer_config.json
    train/*.arrow        Arrow IPC files; each row is one packed sequence of seq_len + 1 token ids
    val/*.arrow

Rows are a `fixed_size_list<uint16|uint32>[seq_len + 1]` column ``input_ids``. Fine-tuning datasets (manifest kind
``sft``) add two columns of the same shape: ``loss_mask`` (uint8: 1 where the token is a training target) and
``segments`` (uint16: which packed conversation a token belongs to, 1, 2, ...; 0 is padding). The manifest lists each
shard with its rows, tokens, bytes and SHA-256. A file is written under a temporary name and renamed when complete
(in object storage: uploaded whole once complete), so a crash never leaves a half shard that looks whole.

The dataset directory is a location (`ember.storage`). The reader reads a bucket's shards through the node cache,
checked against the manifest's sizes and hashes.

`ShardReader` memory-maps the shards and serves samples in a deterministic global order: epoch ``e`` is a seeded
permutation of all rows, sample ``k`` of the run is row ``perm[k // N][k % N]``, and rank ``r`` of ``W`` takes samples
``k ≡ r (mod W)``. Resuming at a sample count therefore continues the same global order, whatever ``W`` is.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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


EXTRA_COLUMNS = {"loss_mask": np.dtype(np.uint8), "segments": np.dtype(np.uint16)}


def shard_schema(row_len: int, dtype: np.dtype, extra_columns: Sequence[str] = ()) -> pa.Schema:
    columns = {"input_ids": np.dtype(dtype), **{c: EXTRA_COLUMNS[c] for c in extra_columns}}
    return pa.schema([pa.field(name, pa.list_(pa.from_numpy_dtype(t), row_len)) for name, t in columns.items()],
                     metadata={b"ember.row_length": str(row_len).encode()})


class ShardWriter:
    """Writes packed rows to shard files named ``{prefix}-{n:03d}.arrow``, rolling over at `shard_bytes`.

    Rows are an (n, row_len) array of token ids, or with `extra_columns` (fine-tuning data) a dict of such arrays by
    column name. A shard is written under a temporary name and renamed when complete; in object storage it is written
    to a local temporary file and uploaded whole when complete."""

    def __init__(self, directory: str | os.PathLike, prefix: str, row_len: int, dtype: np.dtype, shard_bytes: int,
                 extra_columns: Sequence[str] = ()):
        self.directory = storage.normalize(directory)
        self._staging = tempfile.gettempdir() if storage.is_uri(self.directory) else self.directory
        self.prefix = prefix
        self.row_len = row_len
        self.dtypes = {"input_ids": np.dtype(dtype), **{c: EXTRA_COLUMNS[c] for c in extra_columns}}
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


@dataclass
class _Block:
    rows: np.ndarray  # (n, row_len), a view into a memory-mapped file
    start: int  # global index of its first row
    extra: dict  # the same for the extra columns of fine-tuning datasets


class ShardReader:
    """Memory-mapped, deterministic, rank-sliced and exactly resumable access to one split of a dataset."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train", *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if split not in SPLITS:
            raise EmberError(f"unknown split {split!r} (one of: {', '.join(SPLITS)})")
        if not 0 <= rank < world_size:
            raise EmberError(f"rank {rank} is outside world size {world_size}")
        self.dataset_dir = storage.normalize(dataset_dir)
        self.manifest = load_manifest(dataset_dir)
        self.split, self.seed, self.rank, self.world_size = split, seed, rank, world_size
        self.row_len = self.manifest["seq_len"] + 1
        self._blocks: list[_Block] = []
        self.extra_columns: list[str] | None = None  # loss_mask and segments in fine-tuning datasets
        start = 0
        for shard in self.manifest["splits"][split]["shards"]:
            rel = storage.relative_key(str(shard["file"]), storage.join(self.dataset_dir, "manifest.json"))
            path = self._local(storage.join(self.dataset_dir, split, rel), shard)
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            extra = [c for c in EXTRA_COLUMNS if c in table.column_names]
            if self.extra_columns is None:
                self.extra_columns = extra
            for i, chunk in enumerate(table.column("input_ids").chunks):
                rows = chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.row_len)
                more = {c: table.column(c).chunks[i].flatten().to_numpy(zero_copy_only=True).reshape(-1, self.row_len)
                        for c in self.extra_columns}
                self._blocks.append(_Block(rows, start, more))
                start += len(rows)
        self.num_rows = start
        self.extra_columns = self.extra_columns or []
        if self.num_rows == 0:
            raise EmberError(f"{storage.display(self.dataset_dir)}: split {split!r} has no rows")
        self._starts = np.array([b.start for b in self._blocks])
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    @staticmethod
    def _local(location: str, shard: dict) -> Path:
        """A shard's local file: itself, or its node-cache copy checked against the manifest's size and hash."""
        try:
            if not storage.is_uri(location):
                if not os.path.isfile(location):
                    raise FileNotFoundError(location)
                return Path(location)
            return storage.NodeCache().fetch(location, size=shard.get("bytes"), sha256=shard.get("sha256")).path
        except FileNotFoundError:
            raise EmberError(f"shard listed in the manifest is missing: {storage.display(location)}") from None

    def __len__(self) -> int:
        return self.num_rows

    def row(self, index: int) -> np.ndarray:
        """Row `index` of the split in file order, shape (seq_len + 1,)."""
        b = self._blocks[int(np.searchsorted(self._starts, index, side="right")) - 1]
        return b.rows[index - b.start]

    def columns(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` of every column: input_ids, and loss_mask and segments where the dataset has them."""
        b = self._blocks[int(np.searchsorted(self._starts, index, side="right")) - 1]
        return {"input_ids": b.rows[index - b.start], **{c: b.extra[c][index - b.start] for c in self.extra_columns}}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of row indices for one epoch, fixed by (seed, epoch)."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return self._perm

    def sample_row(self, k: int) -> int:
        """The row index of global sample `k` (k counts samples across epochs and ranks)."""
        epoch, pos = divmod(k, self.num_rows)
        return int(self.epoch_order(epoch)[pos])

    def sample_indices(self, start: int = 0) -> Iterator[int]:
        """Global sample numbers this rank takes, from `start` (a global count of samples consumed) on."""
        k = start + self.rank
        while True:
            yield k
            k += self.world_size

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[np.ndarray | dict, int]]:
        """Endless (batch, global samples consumed after it) pairs. A batch is an int64 array (batch_size,
        seq_len + 1), or for a fine-tuning dataset a dict of such arrays by column name."""
        indices = self.sample_indices(start)
        consumed = start
        while True:
            ks = [next(indices) for _ in range(batch_size)]
            consumed += batch_size * self.world_size
            if not self.extra_columns:
                yield np.stack([self.row(self.sample_row(k)) for k in ks]).astype(np.int64), consumed
                continue
            rows = [self.columns(self.sample_row(k)) for k in ks]
            yield {c: np.stack([r[c] for r in rows]).astype(np.int64) for c in rows[0]}, consumed
