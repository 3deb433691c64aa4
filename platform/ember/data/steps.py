"""The tokenize pipeline's steps as plain callables: text of records, normalise/filter, split, tokenize, pack.

Each step works on ordinary Python values, so tests drive them on a list of strings without Ray; `pipeline.py`
composes them per work unit and Ray Data runs the units in parallel.
"""

from __future__ import annotations

import hashlib
import unicodedata
from itertools import chain
from typing import Callable, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from ember.config.specs import FilterSpec, SourceSpec
from ember.data.sources import Location, RecordReader, SkipLog, WorkUnit

_SPLIT_BUCKETS = 1_000_000


def doc_hash(text: str) -> int:
    """A stable 64-bit hash of a document's text (split choice and exact-duplicate detection)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def split_of(text_hash: int, val_fraction: float) -> str:
    """'val' for about `val_fraction` of documents, fixed by their hash, so a document never changes split."""
    return "val" if (text_hash % _SPLIT_BUCKETS) < val_fraction * _SPLIT_BUCKETS else "train"


class Texts:
    """The document text of each `(record, Location)`: plain text as it is, a JSON record's `source.field`, a Parquet
    or Hugging Face dataset row's `source.column`, a built-in Q&A record's prompt and response. A record without one
    is skipped with its location."""

    def __init__(self, source: SourceSpec, skips: SkipLog):
        self.source = source
        self.skips = skips

    def __call__(self, records: Iterable[tuple[object, Location]]) -> Iterator[str]:
        for record, where in records:
            if isinstance(record, str):
                yield record
                continue
            fmt = where.segment.fmt
            if fmt == "builtin":
                yield f"{record['prompt']}\n{record['response']}"
                continue
            if not isinstance(record, dict):
                self.skips.skip("not_an_object", str(where), f"expected a JSON object, got {type(record).__name__}")
                continue
            key, what = (self.source.column, "column") if fmt in ("parquet", "hf") else (self.source.field, "field")
            if key not in record:
                self.skips.skip("missing_field", str(where), f"missing {what} {key!r} (source.{what})")
                continue
            value = record[key]
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                self.skips.skip("wrong_type", str(where), f"{what} {key!r} is {kind}, expected a string")
                continue
            if not value.isascii() and not encodable(value):
                self.skips.skip("lone_surrogate", str(where), f"{what} {key!r} holds a lone surrogate (an unpaired "
                                                              "\\ud800-\\udfff escape), not text")
                continue
            yield value


def encodable(text: str) -> bool:
    """Whether the text is valid Unicode (JSON's escapes can spell lone surrogates, which no UTF-8 holds)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_texts(source: SourceSpec, skips: SkipLog) -> Callable[[WorkUnit], Iterator[str]]:
    """unit -> its documents' texts, in order: a RecordReader (Parquet: only the text column) and `Texts`."""
    reader = RecordReader(source, skips, columns=[source.column])
    texts = Texts(source, skips)
    return lambda unit: texts(reader(unit))


def read_sample(units: list[WorkUnit], source: SourceSpec, budget: int) -> Iterator[str]:
    """Documents for tokenizer training: up to `budget` bytes spread evenly over the units, in unit order."""
    per_unit = max(1, budget // max(1, len(units)))
    read = read_texts(source.model_copy(update={"strict": False}), SkipLog())
    for unit in units:
        taken = 0
        for doc in read(unit):
            yield doc
            taken += len(doc)
            if taken >= per_unit:
                break


class Normalizer:
    """Unicode-normalises and strips documents, skipping (and counting) those under `min_chars`."""

    def __init__(self, spec: FilterSpec, skips: SkipLog):
        self.form = None if spec.normalize == "none" else spec.normalize.upper()
        self.min_chars = spec.min_chars
        self.skips = skips

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        for text in docs:
            if self.form:
                text = unicodedata.normalize(self.form, text)
            text = text.strip()
            if len(text) < self.min_chars:
                self.skips.skip("too_short", "", bad_input=False)
                continue
            yield text


class Tokenize:
    """Encodes a batch of texts to token-id lists (no special tokens added; the packer adds EOS)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


class Packer:
    """Joins documents with EOS into a stream and cuts it into rows of `row_len` ids; keeps the remainder."""

    def __init__(self, row_len: int, eos_id: int, dtype: np.dtype):
        self.row_len = row_len
        self.eos = [eos_id]
        self.dtype = np.dtype(dtype)
        self._rest = np.zeros(0, dtype=self.dtype)

    def __call__(self, docs: list[list[int]]) -> np.ndarray:
        """Full rows, shape (n, row_len), from the remainder plus these documents."""
        count = len(self._rest) + sum(len(d) for d in docs) + len(docs)
        stream = np.fromiter(chain(self._rest, *(chain(d, self.eos) for d in docs)), dtype=self.dtype, count=count)
        n = len(stream) // self.row_len
        self._rest = stream[n * self.row_len:].copy()
        return stream[: n * self.row_len].reshape(n, self.row_len)

    def remainder(self) -> np.ndarray:
        """Tokens that did not fill a row yet."""
        return self._rest
