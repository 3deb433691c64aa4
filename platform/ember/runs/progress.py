"""A job's latest progress, written as data: `progress.json` in the job's output directory.

The contract between the jobs that make progress and the commands that show it (`ember jobs status`, `ember status`):

- A writer replaces the whole record each time (`write_progress`: a temporary name, then a rename), so a reader sees
  the previous record or the next one, never half of one. Only one process writes a job's record: training's rank 0,
  the tokenize job's driver.
- A record is one JSON object with `kind` and `time` (seconds since the epoch, added when it is written) and the
  numbers of its kind:
  - `"train"` (pretrain and finetune, in the run directory): `step`, `total_steps`, `loss`, `tokens_per_s`, and
    `val_loss` (null when that step did not evaluate); a run on a mixture adds `source_tokens` (training tokens per
    source so far, by name).
  - `"tokenize"` (in the dataset directory): `units` finished of `total_units`, `tokens` and `tokens_per_s`, counted
    over the units this run works on (units an earlier run finished are reused, not counted); the last record, written
    with the manifest, has `"done": true` and counts the whole dataset (`units` of `total_units`, `tokens` in its
    rows).
- The directory is a local path (a shared file system on a real cluster) or a URI pyarrow opens (`s3://`, `gs://`,
  ...). A reader that cannot read the location, or finds no record, or one it does not understand, shows no numbers
  rather than failing: progress is for people watching a job, never an input to another step.

Log lines say the same for people and may be reworded freely: nothing parses them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ember import storage

FILE = "progress.json"
# The numbers each kind must carry for a reader to show it (others are optional).
REQUIRED = {"train": ("step", "total_steps", "loss", "tokens_per_s"),
            "tokenize": ("units", "total_units", "tokens")}


def write_progress(directory: str | os.PathLike, record: dict) -> None:
    """Replaces the record in the output directory `directory` (a path or a URI) with `record` plus the time it is
    written."""
    storage.write_json(record_path(directory), {**record, "time": record.get("time", time.time())})


def record_path(location: str | os.PathLike) -> str:
    """Where the record of the output directory `location` (a path or a URI) is."""
    return storage.join(location, FILE)


def _read_bytes(location: str) -> bytes | None:
    """The record's bytes; None when there is none (yet). Raises when the location cannot be read from here (no
    such mount, no credentials, no network)."""
    try:
        return storage.read_bytes(record_path(location))
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> dict | None:
    """The record in `data`, or None when it is not one this reader understands."""
    try:
        record = json.loads(data)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(record, dict) or record.get("kind") not in REQUIRED:
        return None
    numbers = [record.get(key) for key in REQUIRED[record["kind"]]]
    if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        return None
    return record


def read_progress(location: str) -> dict | None:
    """The latest record in the output directory `location` (a path or a URI), or None when there is none that can be
    read from here (missing, unreadable, or not a record)."""
    return show_progress(location, shared=True)[0]


def describe_progress(record: dict) -> str:
    """The one line a record reads as, e.g. `step 12/12, loss 3.1234, 1,234 tokens/s` or
    `3/5 units, 12,345 tokens, 6,789 tokens/s`."""
    if record["kind"] == "train":
        text = (f"step {record['step']}/{record['total_steps']}, loss {record['loss']:.4f}, "
                f"{record['tokens_per_s']:,.0f} tokens/s")
        if isinstance(record.get("val_loss"), (int, float)):
            text += f", val loss {record['val_loss']:.4f}"
        sources = record.get("source_tokens")
        if isinstance(sources, dict) and sources:
            text += "; tokens by source: " + ", ".join(f"{name} {count:,}" for name, count in sources.items()
                                                       if isinstance(count, int))
        return text
    text = f"{record['units']}/{record['total_units']} units, {record['tokens']:,} tokens"
    if isinstance(record.get("tokens_per_s"), (int, float)):
        text += f", {record['tokens_per_s']:,.0f} tokens/s"
    return text + (", done" if record.get("done") else "")


def show_progress(location: str, shared: bool) -> tuple[dict | None, str]:
    """(the record, the text to show) for a job whose output directory is `location`: the record and its line; no
    record and "" when there is none yet; no record and a short note when the record cannot be read from here.

    `shared`: this client sees the job's local paths (the cluster runs on this machine), so a directory that is not
    there has not been made yet. Otherwise a missing directory means the job's disk is another machine's.
    """
    path = storage.display(record_path(location))
    uri = "://" in str(location)  # also file://: a location given as a URI is read as one, from anywhere
    elsewhere = f"in {path} (not readable from here)" if uri else \
        f"in {path} on the cluster (not readable from here)"
    try:
        data = _read_bytes(location)
    except Exception:  # noqa: BLE001 (OSError, ArrowException, a URI pyarrow refuses: the answer is a note)
        return None, elsewhere
    if data is None:
        return None, "" if uri or shared or Path(location).is_dir() else elsewhere
    record = _parse(data)
    if record is None:
        return None, f"in {path} (not a progress record this Ember reads)"
    return record, describe_progress(record)
