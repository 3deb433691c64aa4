"""Preference pairs for preference tuning: records → two conversations sharing a prompt → chat-template ids and answer
masks → one pair per row, on Ray Data.

- A record is ``{prompt, chosen, rejected}`` strings (format ``texts``: the prompt is the user's turn, each answer the
  assistant's), or ``chosen`` and ``rejected`` lists of ``{role, content}`` (or ShareGPT's ``{from, value}``) that
  share every turn but the last, the assistant's answer (format ``conversations``; ``prompt`` unused); ``auto``
  decides per record by the type of ``chosen``. `to_pair` checks a record and raises `BadRecord` with a reason:
  ``not_a_pair`` (not an object, a field missing or of the wrong type), ``empty_side`` (an empty answer),
  ``same_answer``, ``no_shared_prompt`` (an empty prompt, or conversations whose turns before the answer differ),
  ``last_turn_not_assistant``, and chat's own ``unknown_role`` and ``lone_surrogate``.
- `encode_pair` renders each side with a chat template (`ember.data.chat.ChatEncoder`) and masks its answer alone:
  the final assistant turn's tokens as the template writes them (with its end marker); earlier assistant turns are
  part of the prompt. It needs no Ray: evaluation calls it with each model's own tokenizer and template, on the
  pairs `read_pairs` gives.
- `prepare_pair_dataset` writes a dataset dir in the shard format of `kind: tokenize` with manifest kind
  ``preference``: one pair per row, unpacked, the chosen side as ``input_ids`` and ``loss_mask``, the rejected side as
  ``rejected_ids`` and ``rejected_mask`` (see `ember.data.shards`), both padded with the manifest's ``pad_id``. A pair
  goes to val/ by a stable hash of its two conversations; a side longer than a row (``seq_len + 1`` tokens) is
  skipped as ``too_long``; every skip is counted with its ``file:line``. The work is the unit executor's, with the
  fine-tuning data job's tokenizer, template and output-dir rules (`PreferenceJob` extends
  `ember.data.sft.ConversationJob`); what differs is the encoder, `PairEncoder`, and the summary.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from typing import NamedTuple

import numpy as np

from ember import storage
from ember.config.specs import PairDataSpec
from ember.data import shards
from ember.data.chat import BadRecord, ChatEncoder, ChatTemplate, read_records, text_field, to_messages
from ember.data.sft import ConversationJob, pad_id_of
from ember.data.sources import Location, RecordReader, SkipLog, WorkUnit
from ember.data.steps import doc_hash, split_of
from ember.data.tokenizer import load_tokenizer, tokenizer_config
from ember.data.units import UnitJob, run_job, skip_summary
from ember.errors import EmberError

log = logging.getLogger("ember")

SIDES = ("chosen", "rejected")
# chat's reasons for a bad conversation or field, as they read for a pair
_SIDE_REASONS = {"missing_field": "not_a_pair", "wrong_type": "not_a_pair", "not_an_object": "not_a_pair",
                 "empty_conversation": "empty_side", "no_assistant_turn": "last_turn_not_assistant"}


class PreferencePair(NamedTuple):
    """A checked pair: two conversations that differ only in their last turn, the assistant's answer."""

    chosen: list[dict]
    rejected: list[dict]
    where: str  # file:line, file:row N, or a built-in corpus's name


# ---------------------------------------------------------------- records → pairs


def to_pair(record, fmt: str = "auto") -> tuple[list[dict], list[dict]]:
    """The (chosen, rejected) conversations a record holds; raises BadRecord (see the module doc)."""
    if not isinstance(record, dict):
        raise BadRecord("not_a_pair", f"expected a JSON object with chosen and rejected, got {type(record).__name__}")
    missing = [k for k in SIDES if k not in record]
    if missing:
        raise BadRecord("not_a_pair", f"missing field {', '.join(map(repr, missing))} (has: "
                                      f"{', '.join(sorted(record)) or 'none'})")
    kind = fmt if fmt != "auto" else "conversations" if isinstance(record["chosen"], list) else "texts"
    chosen, rejected = _conversations(record) if kind == "conversations" else _texts(record)
    if all(not m["content"].strip() for m in chosen[:-1]):
        raise BadRecord("no_shared_prompt", "the prompt is empty")
    for name, side in zip(SIDES, (chosen, rejected)):
        if not side[-1]["content"].strip():
            raise BadRecord("empty_side", f"the {name} answer is empty")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise BadRecord("same_answer", "the chosen and the rejected answer are the same text")
    return chosen, rejected


def _string(record: dict, key: str) -> str:
    """A string field, checked as a conversation's are (`ember.data.chat.text_field`), its reasons a pair's."""
    try:
        return text_field(record, key)
    except BadRecord as bad:
        raise _as_pair(bad) from None


def _as_pair(bad: BadRecord) -> BadRecord:
    """chat's reason for a bad conversation or field, as it reads for a pair."""
    return BadRecord(_SIDE_REASONS.get(bad.reason, bad.reason), bad.detail)


def _texts(record: dict) -> tuple[list[dict], list[dict]]:
    """The prompt as the user's turn, each answer as the assistant's."""
    prompt = [{"role": "user", "content": _string(record, "prompt")}]
    return tuple(prompt + [{"role": "assistant", "content": _string(record, k)}] for k in SIDES)


def _conversations(record: dict) -> tuple[list[dict], list[dict]]:
    """Two lists of turns, each checked as a conversation is (`to_messages`), sharing all but their last turn. TRL's
    explicit-prompt layout (a `prompt` — a string, the user's turn, or a list of turns — and sides that hold only the
    answer) is the same pair with the prompt before each side."""
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise BadRecord("not_a_pair", f"'prompt' is a {type(prompt).__name__}, not a string or a list of turns")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    sides = []
    for name in SIDES:
        turns = record[name]
        if prompt and isinstance(turns, list) and all(isinstance(t, dict) and t.get("role") == "assistant"
                                                      for t in turns):
            turns = [*prompt, *turns]  # the answer alone: the prompt goes before it
        try:
            side = to_messages({name: turns}, "messages", messages_field=name)
        except BadRecord as bad:
            raise _as_pair(bad) from None
        if side[-1]["role"] != "assistant":
            raise BadRecord("last_turn_not_assistant", f"the last turn of {name!r} is the {side[-1]['role']}'s, not "
                                                       "the assistant's answer")
        sides.append(side)
    chosen, rejected = sides
    if chosen[:-1] != rejected[:-1]:
        turns = min(len(chosen), len(rejected)) - 1
        at = next((i for i in range(turns) if chosen[i] != rejected[i]), turns)
        raise BadRecord("no_shared_prompt", f"'chosen' and 'rejected' differ before their last turn (at turn {at}); "
                                            "they must share every turn but the answer")
    return chosen, rejected


# ---------------------------------------------------------------- pairs → ids


def encode_sides(encoder: ChatEncoder, chosen: list[dict], rejected: list[dict]) -> tuple[np.ndarray, ...]:
    """(chosen ids, chosen mask, rejected ids, rejected mask) of two checked conversations (`to_pair`): ids int64,
    masks uint8 with 1 on the final assistant turn's tokens only. Raises BadRecord when the template fails."""
    if encoder.train_on != "assistant":
        raise ValueError("preference pairs are encoded with train_on='assistant'")
    out = []
    for messages in (chosen, rejected):
        ids, mask = encoder.encode(messages)
        out += [ids, _final_turn(mask)]
    return tuple(out)


def encode_pair(encoder: ChatEncoder, record, fmt: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    """(chosen ids, chosen mask, rejected ids, rejected mask) of one pair record (`to_pair`, `encode_sides`)."""
    return encode_sides(encoder, *to_pair(record, fmt))


def _final_turn(mask: np.ndarray) -> np.ndarray:
    """The mask of the last assistant turn alone: the last run of targets (a template writes at least the next
    turn's header between two turns, so runs are turns)."""
    targets = np.flatnonzero(mask)
    if not len(targets):
        raise BadRecord("template_error", "no token of the answer could be located in the rendered conversation")
    last = targets[-1]
    gaps = np.flatnonzero(mask[:last] == 0)
    final = np.zeros_like(mask)
    final[(gaps[-1] + 1 if len(gaps) else 0): last + 1] = 1
    return final


def read_pairs(inputs: list[str], fmt: str = "auto", limit: int | None = None) -> list[PreferencePair]:
    """The usable pairs of `inputs` (the first `limit` of them), in the order read; bad records are counted and
    skipped."""
    return [PreferencePair(*sides, where) for sides, where in
            read_records(inputs, lambda record: to_pair(record, fmt), "preference pairs", limit)]


def pad_pairs(rows: list[tuple], row_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pairs' (ids, mask, ids, mask) as columns of `row_len`, right-padded (`ember.data.shards.PREFERENCE_COLUMNS`):
    the rows of a shard, and evaluation's batches."""
    out = {}
    for k, (name, fill) in enumerate([("input_ids", pad_id), ("loss_mask", 0), ("rejected_ids", pad_id),
                                      ("rejected_mask", 0)]):
        column = np.full((len(rows), row_len), fill, dtype=rows[0][k].dtype)
        for i, row in enumerate(rows):
            column[i, :len(row[k])] = row[k]
        out[name] = column
    return out


# ---------------------------------------------------------------- the dataset job


class PairEncoder:
    """The preference data job's unit encoder: records → pairs → ids and answer masks → one padded row per pair.
    Loads the dataset's tokenizer and template once."""

    def __init__(self, data: PairDataSpec, dataset_dir: str):
        tok = load_tokenizer(dataset_dir)
        config = tokenizer_config(dataset_dir)
        self.data, self.row_len = data, data.seq_len + 1
        self.encoder = ChatEncoder(tok, ChatTemplate.of(config))
        self.pad_id = pad_id_of(tok, config)

    def __call__(self, unit: WorkUnit, skips: SkipLog, write) -> dict:
        rows: dict[str, list] = {s: [] for s in shards.SPLITS}
        stats = {s: {"pairs": 0, "chosen_tokens": 0, "rejected_tokens": 0} for s in shards.SPLITS}
        for record, where in RecordReader(self.data.source(), skips)(unit):
            encoded = self.encode(record, where, skips)
            if encoded is None:
                continue
            pair, sides = encoded
            split = split_of(doc_hash(json.dumps(pair, sort_keys=True)), self.data.val_fraction)
            rows[split].append(sides)
            stats[split]["pairs"] += 1
            stats[split]["chosen_tokens"] += int(sides[1].sum())
            stats[split]["rejected_tokens"] += int(sides[3].sum())
            if len(rows[split]) >= shards.ROWS_PER_BATCH:
                write(split, self.columns(rows[split]))
                rows[split] = []
        for s in shards.SPLITS:
            if rows[s]:
                write(s, self.columns(rows[s]))
        return {"stats": stats}

    def encode(self, record, where: Location, skips: SkipLog) -> tuple[tuple, tuple] | None:
        """((chosen, rejected) conversations, their four arrays) of one record, or None when it is skipped."""
        if isinstance(record, str) and where.segment.fmt == "builtin":
            raise EmberError(f"{where.segment.name}: a corpus of documents holds no preference pairs; give JSONL, "
                             "JSON or Parquet records (or builtin:python-prefs)")
        try:
            pair = to_pair(record, self.data.format)
            sides = encode_sides(self.encoder, *pair)
        except BadRecord as bad:
            skips.skip(bad.reason, str(where), bad.detail)
            return None
        longest = max(len(sides[0]), len(sides[2]))
        if longest > self.row_len:
            skips.skip("too_long", str(where), f"a side of {longest} tokens, over a row of {self.row_len} "
                                               "(data.seq_len + 1)")
            return None
        return pair, sides

    def columns(self, rows: list[tuple]) -> dict[str, np.ndarray]:
        return pad_pairs(rows, self.row_len, self.pad_id)


class PreferenceJob(ConversationJob):
    """Preference data as the unit executor runs it: `data`'s pairs, with the base model's tokenizer and chat
    template (the tokens the template needs added) as fine-tuning data has them, into the dataset dir `out`."""

    kind, label = "preference", "preference data"
    records = "preference pairs"
    extra_columns = shards.PREFERENCE_COLUMNS

    def identity_parts(self) -> dict:
        return {**super().identity_parts(), "kind": self.kind}

    def prepare(self, units: list[WorkUnit], workers: int, num_cpus: float):
        super().prepare(units, workers, num_cpus)  # the tokenizer and template, into the dataset dir
        return partial(PairEncoder, self.data, self.out)

    def finish(self, job: UnitJob, splits: dict, skips: SkipLog, markers: list[dict]) -> dict:
        kept = sum(splits[s]["pairs"] for s in shards.SPLITS)
        return {"pad_id": pad_id_of(self.tok, self.config), "added_tokens": self.added,
                "pairs": skip_summary(skips, kept)}

    def summarize(self, manifest: dict, seconds: float | None, reused: int) -> None:
        p, splits = manifest["pairs"], manifest["splits"]
        log.info("preference data: %d pairs read, %d kept%s", p["read"], p["kept"],
                 (", skipped: " + ", ".join(f"{k} {v}" for k, v in p["skipped"].items())) if p["skipped"] else "")
        for where in p["examples"]:
            log.info("  bad record: %s", where)
        for s in shards.SPLITS:
            log.info("preference data: %s: %d pairs in rows of %d, %d chosen and %d rejected answer tokens", s,
                     splits[s]["pairs"], self.seq_len + 1, splits[s]["chosen_tokens"], splits[s]["rejected_tokens"])
        if seconds is not None:
            log.info("preference data: %s in %.1fs", storage.display(self.out), seconds)
        if not splits["train"]["rows"]:
            raise EmberError(f"no usable preference pairs in {', '.join(self.data.inputs)} (see the skip counts "
                             "above)")


def prepare_pair_dataset(data: PairDataSpec, base_dir: str | os.PathLike, out: str | os.PathLike, context: int,
                         address: str | None = None, locked_by: str | None = None,
                         progress_dir: str | os.PathLike | None = None) -> dict:
    """Tokenizes `data`'s preference pairs with the base model's tokenizer and chat template into the dataset dir
    `out`; returns its manifest. Bad input paths and a `seq_len` over the model's `context` fail before any Ray
    work. `locked_by` names a run whose checkpoints point into the existing dataset: it must then not change. The
    job's progress record goes to `progress_dir` (the preference run's dir) while the units run."""
    return run_job(PreferenceJob(data, base_dir, out, context, locked_by), address, progress_dir)
