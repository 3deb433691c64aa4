"""Typed job specs: one pydantic model per job kind, every key with a one-line description.

A spec is plain data. The models refuse unknown keys (the loader adds a "did you mean" hint) and check ranges, so a
mistake in a YAML file is reported before any Ray work starts.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

MiB = 1 << 20


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(SpecModel):
    """Where the corpus comes from and how to parse it."""

    inputs: list[str] = Field(
        min_length=1,
        description="Files, directories, globs or URIs (s3://, gs://, file://), or a built-in corpus: "
        "builtin:python-docs, builtin:python-qa, builtin:python-qa:test.",
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = Field(
        "auto", description="Input format; auto picks by extension (.txt, .jsonl/.json, .parquet, plus .gz/.zst/.bz2)."
    )
    text_unit: Literal["file", "paragraph"] = Field(
        "file", description="For .txt: one document per file, or one per blank-line-separated block."
    )
    field: str = Field("text", description="JSON field holding a document's text.")
    column: str = Field("text", description="Parquet column holding a document's text.")
    on_decode_error: Literal["replace", "skip"] = Field(
        "replace", description="Undecodable UTF-8: replace bad bytes with U+FFFD, or skip the document (both counted)."
    )
    strict: bool = Field(False, description="Fail on the first bad record (naming file:line) instead of skipping it.")
    unit_bytes: Optional[int] = Field(
        None,
        ge=4096,
        description="Work-unit size in bytes (files are grouped, large text/JSONL files and Parquet row groups split); "
        "a crashed run redoes only unfinished units. Default: corpus size / 64, between 1 MiB and 64 MiB.",
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class FilterSpec(SpecModel):
    """Normalisation and filtering applied to each document before tokenization."""

    normalize: Literal["nfc", "nfkc", "none"] = Field("nfc", description="Unicode normalisation form applied to text.")
    min_chars: int = Field(16, ge=0, description="Documents shorter than this (after stripping) are skipped.")
    dedup: bool = Field(False, description="Drop exact duplicate documents, keeping the first in input order.")


class TokenizerSpec(SpecModel):
    """Train a byte-level BPE tokenizer on a sample of the corpus, or load an existing one."""

    path: Optional[str] = Field(
        None, description="An existing tokenizer.json (or a directory holding one) to use instead of training."
    )
    vocab_size: int = Field(8192, ge=300, le=1 << 20, description="Vocabulary size of the trained tokenizer.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair count for a BPE merge.")
    sample_bytes: int = Field(
        64 * MiB, ge=1024, description="Bytes of text, spread over all work units, used to train the tokenizer."
    )


class PackSpec(SpecModel):
    """How token streams become fixed-length training rows and shard files."""

    seq_len: int = Field(512, ge=8, le=1 << 20, description="Training context length; each row holds seq_len + 1 ids.")
    val_fraction: float = Field(
        0.01, ge=0.0, lt=1.0, description="Share of documents sent to val/, chosen by a stable hash of their text."
    )
    shard_bytes: int = Field(64 * MiB, ge=4096, description="Target size of one Arrow shard file.")


class OutputSpec(SpecModel):
    """Where the dataset directory goes."""

    dir: str = Field(description="Dataset directory (manifest.json, tokenizer.json, train/, val/); local or shared FS.")
    overwrite: bool = Field(False, description="Replace a directory that holds a different dataset.")


class TokenizeSpec(SpecModel):
    """`kind: tokenize` — corpus to tokenizer and packed Arrow shards, with Ray Data."""

    kind: Literal["tokenize"] = Field(description="Job kind.")
    name: Optional[str] = Field(None, description="A name for logs and job metadata.")
    source: SourceSpec = Field(description="Input corpus.")
    filter: FilterSpec = Field(default_factory=FilterSpec, description="Normalisation and filtering.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer to train or load.")
    pack: PackSpec = Field(default_factory=PackSpec, description="Row packing and shard size.")
    output: OutputSpec = Field(description="Output dataset directory.")
    workers: Optional[int] = Field(
        None, ge=1, description="Parallel tokenize workers (Ray actors); default: one per CPU of the Ray cluster."
    )


# The job kinds Ember knows, by the value of their `kind` key.
SPEC_KINDS: dict[str, type[SpecModel]] = {"tokenize": TokenizeSpec}
