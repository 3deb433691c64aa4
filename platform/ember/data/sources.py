"""Corpus sources: resolve inputs to files, plan them into work units, and read documents from a unit.

Inputs are local paths, directories, globs, or URIs of any filesystem pyarrow opens (``s3://``, ``gs://``,
``file://``; S3 options such as ``?endpoint_override=...`` ride along in the URI), or a built-in corpus
(``builtin:python-docs``, ``builtin:python-qa``, ``builtin:python-prefs``, and ``:test`` of the last two). Globs
match as a shell's do: ``*``, ``?`` and ``[...]`` within one path segment, ``**`` as a whole segment for any number
of directories (``data/**/*.parquet``). A Hugging Face ``datasets`` directory written by ``save_to_disk`` (format
``hf``: ``state.json`` and the ``data-0000K-of-0000N.arrow`` files it lists, Arrow IPC streams; a ``DatasetDict`` is
``dataset_dict.json`` with a subdirectory per split, of which ``split`` is read) is read with pyarrow alone.

A *work unit* is a list of segments (a whole file, a byte range of a large uncompressed text/JSONL file, a range of
Parquet row groups or of an Arrow stream's record batches, or one part of a built-in corpus), about ``unit_bytes``
in all. Units are the grain of
parallelism and of crash recovery. The plan depends only on the inputs and the spec, never on the worker count.

`RecordReader` yields a unit's records with their locations; what a record means (a document's text, a
conversation) is up to its consumer. Reading never raises on bad records: they go to a ``SkipLog`` (counted by
reason, first locations kept as ``file:line``) unless ``strict`` is on, where the first one fails the job with its
location.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import zstandard

from ember import storage
from ember.config.specs import SourceSpec
from ember.data import builtin
from ember.errors import EmberError
from ember.identity import files_fingerprint

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
           ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-docs", "python-qa", "python-qa:test", "python-prefs", "python-prefs:test")
MAX_EXAMPLES = 5  # bad-record locations kept per reason kind, per unit and in the final summary
MAX_DOCUMENT_BYTES = 256 << 20  # one document (line, paragraph or whole file) past this is skipped: a corrupt file or
# a decompression bomb, which would otherwise take the worker's memory
_READ_CHUNK = 1 << 20
HF_STATE, HF_DICT = "state.json", "dataset_dict.json"  # what save_to_disk writes in a Dataset / DatasetDict dir


# ---------------------------------------------------------------- bad records


@dataclass
class SkipLog:
    """Counts skipped (and repaired) records by reason and keeps the first few locations."""

    strict: bool = False
    strict_key: str = "source.strict"  # named in the error strict mode raises
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str, detail: str = "", *, bad_input: bool = True) -> None:
        """Records one skipped record; under `strict`, bad input fails at once instead."""
        message = f"{where}: {detail or reason.replace('_', ' ')}"
        if self.strict and bad_input:
            raise EmberError(f"{message} ({self.strict_key} is on)")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if bad_input and len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def repair(self, reason: str) -> None:
        self.repaired[reason] = self.repaired.get(reason, 0) + 1

    def merge(self, other: dict) -> None:
        """Adds a serialised SkipLog (from another unit) to this one."""
        for key in ("skipped", "repaired"):
            mine = getattr(self, key)
            for reason, n in other.get(key, {}).items():
                mine[reason] = mine.get(reason, 0) + n
        self.examples.extend(other.get("examples", [])[: MAX_EXAMPLES - len(self.examples)])

    def to_dict(self) -> dict:
        return {"skipped": dict(sorted(self.skipped.items())), "repaired": dict(sorted(self.repaired.items())),
                "examples": list(self.examples)}


# ---------------------------------------------------------------- files and units


@dataclass(frozen=True)
class Segment:
    """A readable piece of input: a file or a byte/row-group range of one, or a part of a built-in corpus."""

    name: str  # shown in messages: the path or URI without its query string
    fs_uri: str  # "" for the local filesystem, else the URI the filesystem is opened from
    path: str  # path inside that filesystem (for builtin: the corpus name)
    fmt: str  # text | jsonl | parquet | hf | builtin
    compression: str | None = None
    start: int = 0  # byte offset (text/jsonl, and hf: of the first record batch), first row group (parquet) or part
    end: int = -1  # exclusive; -1 = to the end


@dataclass(frozen=True)
class WorkUnit:
    """The grain of parallel work and of crash recovery."""

    index: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class InputFile:
    name: str
    fs_uri: str
    path: str
    size: int
    mtime_ns: int
    fmt: str
    compression: str | None


display_name = storage.display  # a URI without its query string (which may carry credentials)


def filesystem(fs_uri: str) -> pafs.FileSystem:
    """The file system of an input's store ("" = local): `ember.storage`'s, one per store and process."""
    return storage.resolve(fs_uri or os.sep)[0]


def _split_uri(uri: str) -> tuple[str, str]:
    """(fs_uri, path) for a user-given input: "" and an absolute path for a local one."""
    if not storage.is_uri(uri):
        return "", storage.normalize(uri)
    try:
        return storage.normalize(uri), storage.resolve(uri)[1]
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise EmberError(f"cannot open input {display_name(uri)}: {exc}") from None


def _strip_compression(name: str) -> str:
    base, ext = os.path.splitext(name.lower())
    return base if ext in COMPRESSIONS else name.lower()


def _format_of(name: str, forced: str) -> tuple[str | None, str | None]:
    """(format, compression) of a file name under `source.format`."""
    compression = COMPRESSIONS.get(os.path.splitext(name.lower())[1])
    ext = os.path.splitext(_strip_compression(name))[1]
    if forced != "auto":
        return forced, compression
    return FORMATS.get(ext), compression


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _file_entry(fs_uri: str, info: pafs.FileInfo, forced: str, explicit: bool) -> InputFile | None:
    name = _name(fs_uri, info.path)
    fmt, compression = _format_of(info.path, forced)
    if fmt is None:
        if explicit:
            raise EmberError(f"{name}: cannot tell the format from the extension; set source.format")
        return None
    if fmt == "parquet" and compression:
        raise EmberError(f"{name}: compressed Parquet files are not supported (Parquet compresses internally)")
    return _input_file(fs_uri, info, fmt, compression)


def _name(fs_uri: str, path: str) -> str:
    """A file's name in messages: its path, or its URI without the query."""
    return path if not fs_uri else f"{urlsplit(fs_uri).scheme}://{path}"


def _input_file(fs_uri: str, info: pafs.FileInfo, fmt: str, compression: str | None) -> InputFile:
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return InputFile(_name(fs_uri, info.path), fs_uri, info.path, info.size or 0, mtime, fmt, compression)


def resolve_inputs(source: SourceSpec) -> list[InputFile | str]:
    """Every input file (sorted per input; a Hugging Face dataset's in its state.json's order), or a built-in corpus
    name; a missing path, a directory holding nothing readable, a split that does not exist, a split chosen with no
    DatasetDict to choose it from fail here, before Ray work."""
    resolved: list[InputFile | str] = []
    dicts = 0
    for given in source.inputs:
        if given.startswith(BUILTIN_PREFIX):
            corpus = given[len(BUILTIN_PREFIX):]
            if corpus not in BUILTINS:
                known = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                raise EmberError(f"unknown built-in corpus {given!r} (known: {known})")
            resolved.append(corpus)
        else:
            files, is_dict = _resolve_path(given, source)
            resolved.extend(files)
            dicts += is_dict
    if source.split is not None and not dicts:
        raise EmberError(f"split: {source.split} chooses the split of a Hugging Face DatasetDict input, and no input "
                         "is one (name a split's directory, or leave split out)")
    return resolved


def _resolve_path(given: str, source: SourceSpec) -> tuple[list[InputFile], bool]:
    """The files of one input that is not a built-in corpus: a glob's matches, a directory's files (or a Hugging Face
    dataset's), or the file itself; and whether it is a DatasetDict."""
    fs_uri, path = _split_uri(given)
    fs = filesystem(fs_uri)
    shown = display_name(given).rstrip("/")
    if _has_glob(path):
        return _glob_files(fs_uri, fs, path, shown, source.format), False
    info = _infos(fs, [path], given)[0]
    if info.type == pafs.FileType.NotFound:
        raise EmberError(f"input not found: {shown}")
    if info.type != pafs.FileType.Directory:
        if source.format == "hf":
            raise EmberError(f"{shown}: format hf reads a directory written by save_to_disk, not a file")
        return [_file_entry(fs_uri, info, source.format, True)], False
    if source.format == "hf" or (source.format == "auto" and _is_hf_dir(fs, path, given)):
        return _hf_files(fs_uri, fs, path, shown, source.split or "train")
    files = [f for f in (_file_entry(fs_uri, i, source.format, False) for i in _list(fs, path, shown)) if f]
    if not files:
        raise EmberError(f"input directory {shown} holds no files of a known format ({', '.join(sorted(FORMATS))}) "
                         f"and is not a Hugging Face dataset ({HF_STATE} or {HF_DICT})")
    return files, False


def _infos(fs: pafs.FileSystem, paths: list[str], given: str) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(paths)
    except (pa.ArrowException, OSError) as exc:
        raise storage.storage_error(exc, given, "open input") from None


def glob_match(pattern: str, path: str) -> bool:
    """Whether `path` matches `pattern` as a shell glob: `*`, `?` and `[...]` within one /-separated segment, a
    segment `**` any number of segments (none included)."""
    return _match_segments(pattern.split("/"), path.split("/"))


def _match_segments(patterns: list[str], parts: list[str]) -> bool:
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_match_segments(patterns[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _match_segments(patterns[1:], parts[1:])


def _glob_files(fs_uri: str, fs: pafs.FileSystem, pattern: str, shown: str, forced: str) -> list[InputFile]:
    """The readable files a glob matches, sorted; the listing is recursive only when the pattern spans directories."""
    if forced == "hf":
        raise EmberError(f"{shown}: format hf reads a directory written by save_to_disk; name it, not a glob")
    base = pattern
    while _has_glob(base):
        base = os.path.dirname(base)
    recursive = "**" in pattern or "/" in pattern[len(base):].strip("/")
    matches = [i for i in _list(fs, base, shown, recursive) if glob_match(pattern, i.path)]
    files = [f for f in (_file_entry(fs_uri, i, forced, False) for i in matches) if f]
    if not files:
        raise EmberError(f"input not found: {shown} matched no readable files")
    return files


def _list(fs: pafs.FileSystem, base: str, shown: str, recursive: bool = True) -> list[pafs.FileInfo]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive))
    except FileNotFoundError:
        raise EmberError(f"input not found: {shown}") from None
    except (pa.ArrowException, OSError) as exc:
        raise storage.storage_error(exc, shown, "list input") from None
    def hidden(path: str) -> bool:  # dot files and _SUCCESS-style markers below the listed directory
        return any(part.startswith((".", "_")) for part in path[len(base):].split("/") if part)

    return sorted((i for i in infos if i.type == pafs.FileType.File and not hidden(i.path)), key=lambda i: i.path)


# ---------------------------------------------------------------- Hugging Face datasets directories


def _is_hf_dir(fs: pafs.FileSystem, path: str, given: str) -> bool:
    """Whether a directory is a Hugging Face dataset (a Dataset's state.json, or a DatasetDict's dataset_dict.json)."""
    infos = _infos(fs, [f"{path}/{HF_STATE}", f"{path}/{HF_DICT}"], given)
    return any(i.type == pafs.FileType.File for i in infos)


def _hf_json(fs: pafs.FileSystem, path: str, shown: str) -> dict | None:
    """A save_to_disk JSON file as a dict; None when it does not exist."""
    try:
        with fs.open_input_file(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise storage.storage_error(exc, shown, "read") from None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmberError(f"{shown}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise EmberError(f"{shown}: expected a JSON object, got {type(value).__name__}")
    return value


def _hf_files(fs_uri: str, fs: pafs.FileSystem, path: str, shown: str, split: str) -> tuple[list[InputFile], bool]:
    """The data files of a Hugging Face dataset written by `save_to_disk`, in its state.json's order (a DatasetDict:
    those of `split`), and whether it is a DatasetDict."""
    splits = _hf_json(fs, f"{path}/{HF_DICT}", f"{shown}/{HF_DICT}")
    if splits is not None:
        names = splits.get("splits")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise EmberError(f"{shown}/{HF_DICT}: 'splits' is not a list of split names")
        if split not in names:
            raise EmberError(f"{shown} is a Hugging Face DatasetDict without a split {split!r}; its splits: "
                             f"{', '.join(names) or 'none'} (choose one with `split:`, or name its directory)")
        path, shown = f"{path}/{storage.relative_key(split, shown)}", f"{shown}/{split}"
    state = _hf_json(fs, f"{path}/{HF_STATE}", f"{shown}/{HF_STATE}")
    if state is None:
        raise EmberError(f"{shown} is not a Hugging Face dataset directory: it holds neither {HF_STATE} nor {HF_DICT} "
                         "(what datasets' save_to_disk writes)")
    if state.get("_indices_data_files"):
        raise EmberError(f"{shown}: saved with an indices mapping (an older datasets); save it again after "
                         "flatten_indices()")
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise EmberError(f"{shown}/{HF_STATE}: '_data_files' is not a list of {{filename}} entries")
    names = [storage.relative_key(e["filename"], f"{shown}/{HF_STATE}") for e in entries]
    infos = _infos(fs, [f"{path}/{n}" for n in names], shown)
    for name, info in zip(names, infos):
        if info.type != pafs.FileType.File:
            raise EmberError(f"{shown}/{name}: listed in {HF_STATE} but missing")
    if not infos:
        raise EmberError(f"{shown}: {HF_STATE} lists no data files")
    return [_input_file(fs_uri, info, "hf", None) for info in infos], splits is not None


_CONTINUATION = 0xFFFFFFFF  # starts each message of an Arrow IPC stream (since Arrow 0.15)
_SCHEMA, _RECORD_BATCH = 1, 3  # Arrow's MessageHeader union: Schema, DictionaryBatch, RecordBatch, ...


def _flatbuffer_field(buf: bytes, table: int, index: int) -> int:
    """Where field `index` of the flatbuffer table at `table` is stored; 0 when absent (it holds its default)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    at = 4 + 2 * index
    if at >= struct.unpack_from("<H", buf, vtable)[0]:
        return 0
    offset = struct.unpack_from("<H", buf, vtable + at)[0]
    return table + offset if offset else 0


def _message_header(meta: bytes) -> tuple[int, int, int]:
    """(header type, body length, rows) of an Arrow IPC message's metadata: Message.fbs fields header_type (1),
    header (2) and bodyLength (3); a RecordBatch header's length (0) is its row count."""
    root = struct.unpack_from("<I", meta, 0)[0]
    at = _flatbuffer_field(meta, root, 1)
    kind = meta[at] if at else 0
    at = _flatbuffer_field(meta, root, 3)
    body = struct.unpack_from("<q", meta, at)[0] if at else 0
    rows = 0
    at = _flatbuffer_field(meta, root, 2)
    if kind == _RECORD_BATCH and at:
        header = at + struct.unpack_from("<I", meta, at)[0]
        at = _flatbuffer_field(meta, header, 0)
        rows = struct.unpack_from("<q", meta, at)[0] if at else 0
    return kind, body, rows


def _arrow_batches(f) -> list[tuple[int, int, int]] | None:
    """(offset, end, rows) of each record batch of an Arrow IPC stream file, from its message headers alone (the
    bodies are skipped, not read); None when the stream holds more than a schema and record batches (dictionaries)
    or its headers do not parse (the reader then reports the file where it breaks)."""
    size, pos, batches = f.size(), 0, []
    try:
        while pos + 8 <= size:
            head = f.read_at(min(4096, size - pos), pos)
            marker, length = struct.unpack_from("<Ii", head)
            prefix = 8
            if marker != _CONTINUATION:  # a stream of Arrow before 0.15: the length alone
                length, prefix = struct.unpack_from("<i", head)[0], 4
            if length == 0:  # the end-of-stream marker
                break
            meta = head[prefix:prefix + length]
            if len(meta) < length:
                meta = f.read_at(length, pos + prefix)
            kind, body, rows = _message_header(meta)
            end = pos + prefix + length + body
            if length < 0 or body < 0 or end > size or (kind != _RECORD_BATCH and (kind != _SCHEMA or pos)):
                return None
            if kind == _RECORD_BATCH:
                batches.append((pos, end, rows))
            pos = end
    except (struct.error, IndexError):
        return None
    return batches


def input_stats(resolved: list[InputFile | str]) -> dict[str, tuple[str, int, int]]:
    """(name, size, mtime_ns) of each input by name, for fingerprints; a built-in corpus stands as its content's
    fingerprint (the Python build it comes from)."""
    stats = {}
    for item in resolved:
        if isinstance(item, str):
            name = BUILTIN_PREFIX + item
            stats[name] = (f"{name}@{builtin.corpus_fingerprint()}", 0, 0)
        else:
            stats[item.name] = (item.name, item.size, item.mtime_ns)
    return stats


def source_fingerprint(resolved: list[InputFile | str]) -> str:
    """Identifies the input content: names, sizes and modification times (built-ins: the Python build)."""
    return files_fingerprint(input_stats(resolved).values())


def _segments(item: InputFile | str, unit_bytes: int) -> Iterator[tuple[Segment, int]]:
    """Segments of one input with their approximate byte weight."""
    if isinstance(item, str):
        corpus = item.split(":", 1)[0]
        for part in range(builtin.num_parts(corpus)):
            yield Segment(BUILTIN_PREFIX + item, "", item, "builtin", None, part, part + 1), unit_bytes // 4
        return
    if item.fmt == "hf":
        yield from _arrow_segments(item, unit_bytes)
        return
    if item.fmt == "parquet":
        meta = pq.ParquetFile(filesystem(item.fs_uri).open_input_file(item.path)).metadata
        first, size = 0, 0
        for rg in range(meta.num_row_groups):
            size += meta.row_group(rg).total_byte_size
            if size >= unit_bytes or rg == meta.num_row_groups - 1:
                yield Segment(item.name, item.fs_uri, item.path, "parquet", None, first, rg + 1), size
                first, size = rg + 1, 0
        if meta.num_row_groups == 0:
            yield Segment(item.name, item.fs_uri, item.path, "parquet", None, 0, 0), 0
        return
    splittable = item.compression is None and item.path.lower().endswith((".jsonl", ".ndjson", ".txt", ".text", ".md"))
    if not splittable or item.size <= unit_bytes:
        yield Segment(item.name, item.fs_uri, item.path, item.fmt, item.compression), item.size
        return
    for start in range(0, item.size, unit_bytes):
        end = min(start + unit_bytes, item.size)
        yield Segment(item.name, item.fs_uri, item.path, item.fmt, None, start, end), end - start


def _arrow_segments(item: InputFile, unit_bytes: int) -> Iterator[tuple[Segment, int]]:
    """An Arrow stream file whole, or, when it is larger than a unit, as runs of record batches of about
    `unit_bytes` (byte ranges from the first batch's start to the last one's end), as Parquet row groups are."""
    batches = None
    if item.size > unit_bytes:
        with filesystem(item.fs_uri).open_input_file(item.path) as f:
            batches = _arrow_batches(f)
    if not batches:
        yield Segment(item.name, item.fs_uri, item.path, "hf"), item.size
        return
    first = batches[0][0]
    for n, (start, end, _) in enumerate(batches):
        if end - first >= unit_bytes or n == len(batches) - 1:
            yield Segment(item.name, item.fs_uri, item.path, "hf", None, first, end), end - first
            first = end


UNITS_TARGET = 64  # default unit size aims at this many units: enough to balance dozens of workers
MIN_UNIT, MAX_UNIT = 1 << 20, 64 << 20


def unit_size(resolved: list[InputFile | str], source: SourceSpec) -> int:
    """`source.unit_bytes`, or a size from the corpus alone (never the worker count, so outputs do not depend on it)."""
    if source.unit_bytes:
        return source.unit_bytes
    total = sum(item.size for item in resolved if not isinstance(item, str))
    return min(MAX_UNIT, max(MIN_UNIT, total // UNITS_TARGET))


def plan_units(resolved: list[InputFile | str], source: SourceSpec) -> list[WorkUnit]:
    """Groups segments, in input order, into units of about `unit_size` bytes."""
    limit = unit_size(resolved, source)
    units: list[WorkUnit] = []
    pending: list[Segment] = []
    weight = 0
    for item in resolved:
        for segment, size in _segments(item, limit):
            if pending and (weight + size > limit or segment.fmt == "builtin"):
                units.append(WorkUnit(len(units), tuple(pending)))
                pending, weight = [], 0
            pending.append(segment)
            weight += size
    if pending:
        units.append(WorkUnit(len(units), tuple(pending)))
    return units


# ---------------------------------------------------------------- reading


class _Truncated(Exception):
    """A compressed stream ended early or is corrupt."""


class _TooLarge(Exception):
    """One document holds more than MAX_DOCUMENT_BYTES."""


def _capped(size: int) -> None:
    if size > MAX_DOCUMENT_BYTES:
        raise _TooLarge(f"a document of more than {MAX_DOCUMENT_BYTES >> 20} MiB")


class _ZstdReader:
    """Streams zstd frames, raising _Truncated when the input ends inside a frame (zstandard's own stream reader
    returns a silent short read there)."""

    def __init__(self, raw):
        self._zstd = zstandard
        self._raw = raw
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._started = False  # a frame is in progress

    def read(self, n: int) -> bytes:
        while True:
            chunk = self._raw.read(n)
            if not chunk:
                if self._started and not self._obj.eof:
                    raise _Truncated("input ends inside a zstd frame")
                return b""
            out = []
            while chunk:
                try:
                    out.append(self._obj.decompress(chunk))
                except self._zstd.ZstdError as exc:
                    raise _Truncated(str(exc)) from None
                self._started = True
                if self._obj.eof:  # next frame, if any
                    chunk = self._obj.unused_data
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                    self._started = False
                else:
                    chunk = b""
            data = b"".join(out)
            if data:
                return data


def _decompressing(raw, compression: str | None):
    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    return _ZstdReader(raw)


def _read_checked(stream, n: int) -> bytes:
    try:
        return stream.read(n)
    except (EOFError, OSError, zlib.error) as exc:
        raise _Truncated(str(exc) or type(exc).__name__) from None


def _read_whole(stream) -> bytes:
    """All of a (decompressed) stream, as one document: at most MAX_DOCUMENT_BYTES."""
    chunks, size = [], 0
    while data := _read_checked(stream, _READ_CHUNK):
        size += len(data)
        _capped(size)
        chunks.append(data)
    return b"".join(chunks)


def _lines(stream, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without newline) for lines that start in [start, end); end=-1: to the end."""
    pos = 0
    skip_first = start > 0
    if start > 0:
        stream.seek(start - 1)  # the line holding byte start-1 belongs to the previous range
        pos = start - 1
    buf = b""
    while True:
        data = _read_checked(stream, _READ_CHUNK)
        if not data:
            if buf and not skip_first and (end < 0 or pos < end):
                yield pos, buf
            return
        buf += data
        parts = buf.split(b"\n")
        buf = parts.pop()
        _capped(len(buf))
        for line in parts:
            _capped(len(line))
            if skip_first:
                skip_first = False
            elif end >= 0 and pos >= end:
                return
            else:
                yield pos, line
            pos += len(line) + 1


class _LineNumbers:
    """File line numbers for byte offsets, computed only when a location is reported."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self.base: int | None = None if segment.start > 0 else 1
        self.first_offset: int | None = None

    def __call__(self, offset: int, relative: int) -> str:
        if self.base is None:  # count the newlines before this range, a chunk at a time
            newlines, left = 0, self.first_offset
            with filesystem(self.segment.fs_uri).open_input_file(self.segment.path) as f:
                while left > 0:
                    chunk = f.read(min(left, _READ_CHUNK))
                    if not chunk:
                        break
                    newlines += chunk.count(b"\n")
                    left -= len(chunk)
            self.base = 1 + newlines
        return f"{self.segment.name}:{self.base + relative}"


def _decode(data: bytes, where, skips: SkipLog, on_error: str) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if on_error == "skip":
            skips.skip("undecodable", where(), f"invalid UTF-8 at byte {exc.start}")
            return None
        skips.repair("decode_replaced")
        return data.decode("utf-8", errors="replace")


class Location:
    """Where a record is: its segment, and "file:line", "file:row N" or "file:[i]", formatted only when asked (a line
    number in a later byte range costs a count of the newlines before it)."""

    __slots__ = ("segment", "_text")

    def __init__(self, segment: Segment, text):
        self.segment = segment
        self._text = text  # the text, or a callable that makes it

    def __str__(self) -> str:
        if callable(self._text):
            self._text = self._text()
        return self._text


class RecordReader:
    """Reads the records of a work unit, in order, as `(record, Location)` pairs; testable without Ray.

    A record is a document's text (plain text: a whole file or a paragraph), a parsed JSON value (JSON Lines, a JSON
    array), a Parquet or Hugging Face dataset row as a dict (only `columns`, when given), or a built-in corpus's
    record (python-docs: its text; python-qa: a dict with prompt and response; python-prefs: prompt, chosen and
    rejected). What a record means is its consumer's business: the text of a document (`ember.data.steps.Texts`), a
    conversation (`ember.data.chat.to_messages`) or a preference pair (`ember.data.pairs.to_pair`). Unreadable input
    goes to the SkipLog with its location."""

    def __init__(self, source: SourceSpec, skips: SkipLog, columns: list[str] | None = None):
        self.source = source
        self.skips = skips
        self.columns = columns

    def __call__(self, unit: WorkUnit) -> Iterator[tuple[object, Location]]:
        for segment in unit.segments:
            yield from self.read_segment(segment)

    def read_segment(self, seg: Segment) -> Iterator[tuple[object, Location]]:
        if seg.fmt == "builtin":
            yield from self._builtin(seg)
        elif seg.fmt == "parquet":
            yield from self._parquet(seg)
        elif seg.fmt == "hf":
            yield from self._arrow(seg)
        else:
            fs = filesystem(seg.fs_uri)
            try:
                # Ember decompresses itself (pyarrow's own would guess from the name and hide truncation).
                raw = fs.open_input_file(seg.path) if seg.compression is None else \
                    fs.open_input_stream(seg.path, compression=None)
            except (pa.ArrowException, OSError) as exc:
                self.skips.skip("unreadable", seg.name, f"cannot open: {exc}")
                return
            with raw:
                stream = _decompressing(raw, seg.compression)
                try:
                    if seg.fmt == "jsonl":
                        yield from self._jsonl(seg, stream)
                    elif self.source.text_unit == "paragraph":
                        yield from self._paragraphs(seg, stream)
                    else:
                        yield from self._whole_text(seg, stream)
                except _Truncated as exc:
                    self.skips.skip("truncated", seg.name, f"compressed file is truncated or corrupt ({exc}); "
                                    "records before this point were kept")
                except _TooLarge as exc:
                    self.skips.skip("too_large", seg.name, f"{exc} (a corrupt file or a decompression bomb); the "
                                    "rest of the file was skipped, records before this point were kept")

    def _builtin(self, seg: Segment) -> Iterator[tuple[object, Location]]:
        corpus, _, split = seg.path.partition(":")
        if corpus == builtin.PYTHON_DOCS:
            for doc in builtin.python_docs(seg.start):
                yield doc.text, Location(seg, doc.where)
        else:
            records = builtin.python_prefs if corpus == builtin.PYTHON_PREFS else builtin.python_qa
            for rec in records(seg.start, split or "train"):
                where = rec.pop("where")
                yield rec, Location(seg, where)

    def _whole_text(self, seg: Segment, stream) -> Iterator[tuple[object, Location]]:
        data = _read_whole(stream)
        if not data:
            self.skips.skip("empty_file", seg.name, "empty file")
            return
        text = _decode(data, lambda: seg.name, self.skips, self.source.on_decode_error)
        if text is not None:
            yield text.replace("\r\n", "\n"), Location(seg, seg.name)

    def _paragraphs(self, seg: Segment, stream) -> Iterator[tuple[object, Location]]:
        where = _LineNumbers(seg)
        lines: list[bytes] = []
        first_line = first_pos = 0
        skipping = False
        seen_any = False
        for n, (pos, line) in enumerate(_lines(stream, seg.start, -1)):
            if n == 0:
                where.first_offset = pos
                skipping = seg.start > 0 and not _previous_line_blank(seg, pos)
            seen_any = True
            blank = not line.strip()
            if skipping:  # the paragraph in progress at our start belongs to the previous range
                skipping = not blank
                continue
            if blank:
                if lines:
                    yield from self._text_doc(seg, b"\n".join(lines), partial(where, first_pos, first_line))
                    lines = []
                if seg.end >= 0 and pos >= seg.end:
                    return
                continue
            if not lines:
                if seg.end >= 0 and pos >= seg.end:
                    return
                first_line, first_pos = n, pos
            _capped(pos - first_pos)
            lines.append(line.rstrip(b"\r"))
        if lines:
            yield from self._text_doc(seg, b"\n".join(lines), partial(where, first_pos, first_line))
        if not seen_any and seg.start == 0:
            self.skips.skip("empty_file", seg.name, "empty file")

    def _text_doc(self, seg: Segment, data: bytes, where) -> Iterator[tuple[object, Location]]:
        text = _decode(data, where, self.skips, self.source.on_decode_error)
        if text is not None:
            yield text, Location(seg, where)

    def _jsonl(self, seg: Segment, stream) -> Iterator[tuple[object, Location]]:
        if _strip_compression(seg.path).endswith(".json"):
            # .json holds either one JSON array or JSON Lines; it is never split, so read it whole and look.
            data = _read_whole(stream)
            if data.lstrip()[:1] == b"[":
                yield from self._json_array(seg, data)
                return
            stream = pa.BufferReader(data)
        where = _LineNumbers(seg)
        seen_any = False
        for n, (pos, line) in enumerate(_lines(stream, seg.start, seg.end)):
            if n == 0:
                where.first_offset = pos
            seen_any = True
            if not line.strip():
                continue
            at = partial(where, pos, n)  # the location, formatted only if something is wrong here
            text = _decode(line, at, self.skips, self.source.on_decode_error)
            if text is None:
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                self.skips.skip("malformed_json", at(), f"malformed JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                self.skips.skip("malformed_json", at(), "JSON nested too deeply")
                continue
            yield record, Location(seg, at)
        if not seen_any and seg.start == 0:
            self.skips.skip("empty_file", seg.name, "empty file")

    def _json_array(self, seg: Segment, data: bytes) -> Iterator[tuple[object, Location]]:
        text = _decode(data, lambda: seg.name, self.skips, self.source.on_decode_error)
        if text is None:
            return
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            self.skips.skip("malformed_json", f"{seg.name}:{exc.lineno}", f"malformed JSON ({exc.msg})")
            return
        except RecursionError:
            self.skips.skip("malformed_json", seg.name, "JSON nested too deeply")
            return
        for i, record in enumerate(records):
            yield record, Location(seg, f"{seg.name}:[{i}]")

    def _parquet(self, seg: Segment) -> Iterator[tuple[object, Location]]:
        try:
            pfile = pq.ParquetFile(filesystem(seg.fs_uri).open_input_file(seg.path))
        except (pa.ArrowException, OSError) as exc:
            self.skips.skip("unreadable", seg.name, f"not a readable Parquet file: {exc}")
            return
        row = sum(pfile.metadata.row_group(rg).num_rows for rg in range(seg.start))
        groups = list(range(seg.start, seg.end if seg.end >= 0 else pfile.num_row_groups))
        batches = pfile.iter_batches(batch_size=1024, row_groups=groups, columns=self.columns) if groups else ()
        yield from self._rows(seg, pfile.schema_arrow.names, batches, lambda: row)

    def _arrow(self, seg: Segment) -> Iterator[tuple[object, Location]]:
        """The rows of a Hugging Face dataset's Arrow stream file: all of it, or the record batches in [start, end)."""
        rows = _RowNumbers(seg)
        try:
            with filesystem(seg.fs_uri).open_input_file(seg.path) as f:
                schema, batches = _stream_batches(seg, f)
                if self.columns:
                    batches = (b.select(self.columns) for b in batches)
                for record, where in self._rows(seg, schema.names, batches, rows):
                    rows.read += 1
                    yield record, where
        except (pa.ArrowException, OSError) as exc:
            self.skips.skip("unreadable", f"{seg.name}:row {rows(rows.read)}", f"not a readable Arrow stream "
                            f"({exc}); rows before it were kept")

    def _rows(self, seg: Segment, names: list[str], batches, first_row) -> Iterator[tuple[object, Location]]:
        """A table's rows as dicts located as `file:row N` (`first_row()`: the segment's first, asked only when a
        location is shown); nothing, and one skip, when a wanted column is missing."""
        missing = [c for c in self.columns or () if c not in names]
        if missing:
            self.skips.skip("missing_field", seg.name, f"no column {missing[0]!r}; has: {', '.join(names)}")
            return
        n = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield record, Location(seg, partial(_row_location, seg.name, first_row, n))
                n += 1


def _row_location(name: str, first_row, n: int) -> str:
    return f"{name}:row {first_row() + n}"


class _RowNumbers:
    """The number of an Arrow stream segment's first row, counted from the batch headers before it only when a
    location is shown; `read` counts the rows read so far."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self.first: int | None = 0 if segment.start <= 0 else None
        self.read = 0

    def __call__(self, n: int = 0) -> int:
        if self.first is None:
            with filesystem(self.segment.fs_uri).open_input_file(self.segment.path) as f:
                batches = _arrow_batches(f) or []
            self.first = sum(rows for start, _, rows in batches if start < self.segment.start)
        return self.first + n


def _stream_batches(seg: Segment, f) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """The schema and record batches of an Arrow stream segment: the whole stream, or the batches in the byte range
    [start, end) (read at once: a unit's worth), decoded with the schema at the file's start."""
    if seg.end < 0:
        reader = pa.ipc.open_stream(pa.BufferedInputStream(f, _READ_CHUNK))
        return reader.schema, iter(reader)
    schema = pa.ipc.read_schema(pa.ipc.read_message(f))
    body = pa.BufferReader(f.read_at(seg.end - seg.start, seg.start))

    def batches() -> Iterator[pa.RecordBatch]:
        while body.tell() < body.size():
            yield pa.ipc.read_record_batch(pa.ipc.read_message(body), schema)

    return schema, batches()


def _previous_line_blank(seg: Segment, line_start: int) -> bool:
    """Whether the line before `line_start` is blank (so a paragraph starts at `line_start`)."""
    if line_start == 0:
        return True
    lo = max(0, line_start - 4096)
    with filesystem(seg.fs_uri).open_input_file(seg.path) as f:
        f.seek(lo)
        window = f.read(line_start - lo)[:-1]  # drop the newline that ends the previous line
    cut = window.rfind(b"\n")
    if cut < 0 and lo > 0:
        return False  # a line over 4 KiB long is not blank
    return not window[cut + 1:].strip()
