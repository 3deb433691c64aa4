"""One answer to "does this output already hold the result of these inputs?", for every job kind.

- An **identity** is the SHA-256 hex digest of a JSON value holding everything an output depends on
  (`identity_of`): the spec fields that shape it, the fingerprints of its inputs, a format version.
- A **fingerprint** of files is the identity of their names, sizes and modification times (`files_fingerprint`):
  it changes when a file is rewritten, without reading every byte of a corpus or a model. `content_sha256` hashes
  the bytes instead, for the small files whose exact content is the contract (a tokenizer).
- A spec's **content** (`spec_without`) is its JSON data without the keys that do not change results (where the
  figures are logged, how to resume): what identities hold of a spec.
- A **stamp** is a JSON object with an ``identity`` field, published whole (`write_stamp`): the record an output
  writes anyway (a dataset's `manifest.json`, a run's `result.json`) or a small file beside it (the unit executor's
  `.ember/job.json`, a fine-tune's `base_weights.json`, an evaluation's `results.json.identity`). `stamp_matches`
  is the one check: an output is reused only while its stamp holds the identity of the inputs asked for.

Stamps and hashed files are locations (`ember.storage`): a local path or a URI of object storage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from ember import storage


def identity_of(parts) -> str:
    """The identity of a JSON-able value: the same value (whatever its key order) gives the same digest."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def spec_without(spec, keys: Iterable[str]) -> dict:
    """A spec's content as JSON data (a pydantic spec or its dump), without the dotted `keys` (``train.tracking``):
    the settings that do not change what a job computes. Missing keys are ignored."""
    content = json.loads(spec.model_dump_json() if hasattr(spec, "model_dump_json") else json.dumps(spec))
    for key in keys:
        *sections, last = key.split(".")
        section = content
        for name in sections:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(last, None)
    return content


def files_fingerprint(stats: Iterable[tuple[str, int, int]]) -> str:
    """The fingerprint of files given as (name, size in bytes, modification time in ns), in the order given."""
    return identity_of([[name, int(size), int(mtime)] for name, size, mtime in stats])


def path_stats(paths: Iterable[str | os.PathLike]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of local files, for `files_fingerprint`."""
    out = []
    for path in map(Path, paths):
        st = path.stat()
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return out


def content_sha256(location: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (a local file or an object)."""
    if storage.is_uri(location):
        return hashlib.sha256(storage.read_bytes(location)).hexdigest()
    return storage.file_sha256(location)


def read_stamp(location: str | os.PathLike) -> dict | None:
    """The stamp at `location`, or None when there is none or it is not one (not JSON, no identity). A store that
    cannot be read raises its error (`ember.storage`): "no stamp" must not be mistaken for "cannot look"."""
    data = storage.read_json(location)
    return data if isinstance(data, dict) and isinstance(data.get("identity"), str) else None


def stamp_matches(path: str | os.PathLike, identity: str) -> bool:
    """Whether the stamp at `path` records exactly `identity`."""
    stamp = read_stamp(path)
    return stamp is not None and stamp["identity"] == identity


def write_stamp(location: str | os.PathLike, identity: str, **record) -> dict:
    """Publishes a stamp (`identity` and the other fields of `record`) whole (`ember.storage.write_json`), so a crash
    leaves the old stamp or the new one, never half of one. Returns what was written."""
    stamp = {**record, "identity": identity}
    storage.write_json(location, stamp)
    return stamp
