"""Typed job specs: one pydantic model per job kind, every key with a one-line description.

A spec is plain data. The models refuse unknown keys (the loader adds a "did you mean" hint) and check ranges, so a
mistake in a YAML file is reported before any Ray work starts.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

MiB = 1 << 20


class SpecModel(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated, and no value is a URI that
    carries credentials (a spec is written to the run dir and sent to Ray as job metadata)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Keys left out of the section's content (its dump, so its identity) while unset (None): the keys added after
    # datasets and runs were made with this section, so that what was made before keeps its identity.
    OMITTED_WHEN_UNSET: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _unset_keys_left_out(self, handler):
        out = handler(self)
        if not self.OMITTED_WHEN_UNSET or not isinstance(out, dict):
            return out
        return {k: v for k, v in out.items() if v is not None or k not in self.OMITTED_WHEN_UNSET}

    @field_validator("*")
    @classmethod
    def _no_credentials_in_uris(cls, value):
        from ember.storage import CREDENTIALS_HELP, secret_options

        found = sorted({k for text in strings_in(value) for k in secret_options(text)})
        if found:
            raise PydanticCustomError(CREDENTIALS_ERROR, f"credentials in a URI ({', '.join(found)}) do not belong "
                                      f"in a spec: it is written to the run dir and sent to Ray; {CREDENTIALS_HELP}")
        return value


CREDENTIALS_ERROR = "credentials_in_uri"  # the error type whose input the loader never shows


def strings_in(value) -> list[str]:
    """The strings a spec value holds (itself, list items, mapping values), for checks on every one."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in strings_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in strings_in(v)]
    return []


class InputSpec(SpecModel):
    """The inputs of a dataset job and how they are cut into work units: the keys `source` (tokenize) and `data`
    (fine-tuning) share."""

    OMITTED_WHEN_UNSET = ("split",)

    inputs: list[str] = Field(
        min_length=1,
        description="Files, directories, globs (** spans directories) or URIs (s3://, gs://, file://) of text, "
        "JSONL/JSON or Parquet records (conversations: not text), Hugging Face datasets directories written by "
        "save_to_disk (a Dataset, or a DatasetDict: see split), or a built-in corpus: builtin:python-docs "
        "(documents), builtin:python-qa (conversations), builtin:python-prefs (preference pairs); NAME:test is a "
        "built-in set's held-out split.",
    )
    split: Optional[str] = Field(None, min_length=1, description="The split read from a Hugging Face DatasetDict "
                                                                 "input (a subdirectory of it; default train); "
                                                                 "naming the split's directory as the input reads "
                                                                 "that split too.")
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


class SourceSpec(InputSpec):
    """Where the corpus comes from and how to parse it."""

    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = Field(
        "auto", description="Input format; auto picks by extension (.txt, .jsonl/.json, .parquet, plus .gz/.zst/.bz2), "
        "and hf for a directory holding state.json or dataset_dict.json (Hugging Face save_to_disk)."
    )
    text_unit: Literal["file", "paragraph"] = Field(
        "file", description="For .txt: one document per file, or one per blank-line-separated block."
    )
    field: str = Field("text", description="JSON field holding a document's text.")
    column: str = Field("text", description="Parquet or Hugging Face dataset column holding a document's text.")
    on_decode_error: Literal["replace", "skip"] = Field(
        "replace", description="Undecodable UTF-8: replace bad bytes with U+FFFD, or skip the document (both counted)."
    )


_OFF = " (null: rule off)."


class GopherSpec(SpecModel):
    """Gopher's quality rules (Rae et al. 2021, appendix A1) on a document's whitespace-separated words and lines."""

    enabled: bool = Field(False, description="Apply these rules.")
    min_doc_words: Optional[int] = Field(50, ge=0, description="Fewest words (tokens with a letter or digit)" + _OFF)
    max_doc_words: Optional[int] = Field(100_000, ge=0, description="Most words" + _OFF)
    min_mean_word_length: Optional[float] = Field(3, ge=0, description="Smallest mean word length, characters" + _OFF)
    max_mean_word_length: Optional[float] = Field(10, ge=0, description="Largest mean word length, characters" + _OFF)
    max_symbol_word_ratio: Optional[float] = Field(
        0.1, ge=0, description="Most '#' per token, and most ellipses ('...', '…') per token (whitespace-separated, "
                               "symbols included)" + _OFF)
    max_bullet_lines: Optional[float] = Field(
        0.9, ge=0, le=1, description="Largest fraction of lines starting with a bullet (•, -, * …)" + _OFF)
    max_ellipsis_lines: Optional[float] = Field(
        0.3, ge=0, le=1, description="Largest fraction of lines ending with an ellipsis" + _OFF)
    min_alpha_words: Optional[float] = Field(
        0.8, ge=0, le=1, description="Smallest fraction of tokens (symbols included) holding an alphabetic "
                                     "character" + _OFF)
    min_stop_words: Optional[int] = Field(2, ge=0, description="Fewest stop words (any case) in the document" + _OFF)
    stop_words: list[str] = Field(["the", "be", "to", "of", "and", "that", "have", "with"],
                                  description="The stop words min_stop_words counts.")


class GopherRepetitionSpec(SpecModel):
    """Gopher's repetition rules (Rae et al. 2021, table A1): documents whose lines, paragraphs or word n-grams repeat
    too much. The n-gram rules' character fractions count the characters of words, not whitespace."""

    enabled: bool = Field(False, description="Apply these rules.")
    max_dup_lines: Optional[float] = Field(
        0.3, ge=0, le=1, description="Largest fraction of non-blank lines that repeat an earlier line" + _OFF)
    max_dup_line_chars: Optional[float] = Field(
        0.2, ge=0, le=1, description="Largest fraction of characters in repeated lines" + _OFF)
    max_dup_paragraphs: Optional[float] = Field(
        0.3, ge=0, le=1, description="Largest fraction of paragraphs (blank-line separated) repeating one" + _OFF)
    max_dup_paragraph_chars: Optional[float] = Field(
        0.2, ge=0, le=1, description="Largest fraction of characters in repeated paragraphs" + _OFF)
    top_ngram_chars: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="n: largest fraction of characters in the most frequent repeated "
        "word n-gram (leave an n out to skip it).")
    dup_ngram_chars: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, description="n: largest fraction of characters "
        "in word n-grams that repeat an earlier one (leave an n out to skip it).")

    @field_validator("top_ngram_chars", "dup_ngram_chars")
    @classmethod
    def _ngram_fractions(cls, value: dict[int, float]) -> dict[int, float]:
        for n, fraction in value.items():
            if n < 1 or not 0 <= fraction <= 1:
                raise ValueError(f"{n}: {fraction}: n must be at least 1 and the fraction between 0 and 1")
        return value


class C4Spec(SpecModel):
    """C4's rules (Raffel et al. 2020). Line rules drop lines and keep the rest of the document; document rules
    (lorem_ipsum, curly_bracket, min_sentences) drop the whole document."""

    enabled: bool = Field(False, description="Apply these rules.")
    end_punctuation: bool = Field(True, description="Drop lines not ending in . ? ! \" or ' (or ending in '...').")
    min_words_per_line: Optional[int] = Field(3, ge=0, description="Drop lines with fewer words" + _OFF)
    max_word_length: Optional[int] = Field(1000, ge=1, description="Drop lines holding a longer word" + _OFF)
    javascript: bool = Field(True, description="Drop lines mentioning 'javascript'.")
    policy: bool = Field(True, description="Drop lines about cookies, terms of use or privacy policy.")
    lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    curly_bracket: bool = Field(True, description="Drop documents containing '{' (code, templates).")
    min_sentences: Optional[int] = Field(5, ge=0, description="Drop documents with fewer sentences in the lines "
                                                              "kept" + _OFF)


class QualitySpec(SpecModel):
    """Heuristic quality filters on each normalised document, before dedup and tokenization; each removal is counted
    in the manifest's documents.skipped as quality:<section>.<rule> (the spec key that removed it)."""

    gopher_repetition: GopherRepetitionSpec = Field(default_factory=GopherRepetitionSpec,
                                                    description="Gopher's repetition rules (applied first).")
    gopher: GopherSpec = Field(default_factory=GopherSpec, description="Gopher's quality rules.")
    c4: C4Spec = Field(default_factory=C4Spec, description="C4's line and document rules (applied last).")

    def enabled(self) -> bool:
        return self.gopher_repetition.enabled or self.gopher.enabled or self.c4.enabled


class NearDedupSpec(SpecModel):
    """Near-duplicate removal: MinHash signatures of each document's shingles, LSH bands, one document kept per
    cluster of candidates (the first in input order). Two documents are candidates when all `rows` values of any
    band agree: likely above a Jaccard similarity of about (1/bands)^(1/rows)."""

    enabled: bool = Field(False, description="Drop near-duplicate documents, keeping the first in input order.")
    shingle: Literal["word", "char"] = Field("word", description="Shingles: word n-grams (lowercased, split on "
                                             "whitespace) or character n-grams (whitespace runs as one space).")
    ngram: int = Field(5, ge=1, le=100, description="Words or characters per shingle.")
    num_perm: int = Field(128, ge=2, le=4096, description="MinHash permutations (signature length).")
    bands: int = Field(16, ge=1, description="LSH bands; bands × rows must equal num_perm.")
    rows: int = Field(8, ge=1, description="Signature values per band; more rows = a higher similarity threshold.")
    seed: int = Field(1, ge=0, le=2**32 - 1, description="Seed of the MinHash permutations.")

    @model_validator(mode="after")
    def _bands_cover_the_signature(self):
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands × rows ({self.bands} × {self.rows} = {self.bands * self.rows}) must equal "
                             f"num_perm ({self.num_perm})")
        return self


class FilterSpec(SpecModel):
    """Normalisation and filtering applied to each document before tokenization."""

    OMITTED_WHEN_UNSET = ("quality", "near_dedup")

    normalize: Literal["nfc", "nfkc", "none"] = Field("nfc", description="Unicode normalisation form applied to text.")
    min_chars: int = Field(16, ge=0, description="Documents shorter than this (after stripping) are skipped.")
    quality: Optional[QualitySpec] = Field(None, description="Heuristic quality filters (none unless a rule set in "
                                                             "it is enabled).")
    dedup: bool = Field(False, description="Drop exact duplicate documents, keeping the first in input order.")
    near_dedup: Optional[NearDedupSpec] = Field(None, description="MinHash-LSH near-duplicate removal (off unless "
                                                                  "enabled).")

    def quality_rules(self) -> QualitySpec | None:
        """The quality rule sets, where one is enabled."""
        return self.quality if self.quality is not None and self.quality.enabled() else None

    def near_dedup_on(self) -> NearDedupSpec | None:
        """The near-dedup settings, where it is enabled."""
        return self.near_dedup if self.near_dedup is not None and self.near_dedup.enabled else None


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

    dir: str = Field(description="Dataset directory (manifest.json, tokenizer.json, train/, val/): a path or a "
                                 "bucket URI (s3://bucket/prefix).")
    overwrite: bool = Field(False, description="Replace a directory that holds a different dataset.")


class JobSpec(SpecModel):
    """What every job spec has besides its `kind`."""

    name: Optional[str] = Field(None, description="A name for logs and job metadata.")


class TokenizeSpec(JobSpec):
    """`kind: tokenize` — corpus to tokenizer and packed Arrow shards, with Ray Data."""

    kind: Literal["tokenize"] = Field(description="Job kind.")
    source: SourceSpec = Field(description="Input corpus.")
    filter: FilterSpec = Field(default_factory=FilterSpec, description="Normalisation and filtering.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer to train or load.")
    pack: PackSpec = Field(default_factory=PackSpec, description="Row packing and shard size.")
    output: OutputSpec = Field(description="Output dataset directory.")
    workers: Optional[int] = Field(
        None, ge=1, description="Parallel tokenize workers (Ray actors); default: one per CPU of the Ray cluster."
    )


# A mixture source's name: a metric name's part (tokens/NAME) and a fine-tune source's dataset dir (DATA_DIR/NAME).
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RESERVED_SOURCE_NAMES = ("train", "val")  # a dataset dir's own
EXHAUSTED_HELP = ("When a mix source has given every row once: stop the run at that step (default), or recycle it (a "
                  "new order).")


def check_mixture(data, single: str, names: list[str] | None) -> None:
    """A data section's choice between one source (its key `single`) and `mix` (with its sources' `names`): exactly
    one of them; `exhausted` only with a mix (stop by default); each source's name once."""
    if (getattr(data, single) is None) == (data.mix is None):
        raise ValueError(f"set exactly one of data.{single} and data.mix")
    if data.mix is None and data.exhausted is not None:
        raise ValueError("data.exhausted applies to data.mix")
    if data.mix is not None:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.mix: sources named {', '.join(map(repr, twice))} more than once (give each a "
                             "name of its own)")
        if data.exhausted is None:
            data.exhausted = "stop"


class MixSourceSpec(SpecModel):
    """One dataset of a weighted mixture."""

    dir: str = Field(description="A dataset directory written by `kind: tokenize`; a path or a URI.")
    weight: float = Field(gt=0, allow_inf_nan=False, description="Its share of the samples, relative to the other "
                                                                 "sources' weights.")
    name: Optional[str] = Field(None, pattern=SOURCE_NAME, description="Its name in logs, metrics and result.json "
                                                                      "(default: the last part of dir).")


class DataSpec(SpecModel):
    """The dataset a training job reads: one dataset dir, or several mixed by weight."""

    OMITTED_WHEN_UNSET = ("dir", "mix", "exhausted", "shuffle_block_bytes")

    dir: Optional[str] = Field(None, description="A dataset directory written by `kind: tokenize` (manifest.json, "
                                                 "train/, val/); a path or a URI.")
    mix: Optional[list[MixSourceSpec]] = Field(None, min_length=1, description="Instead of dir: datasets sharing a "
                                                                             "tokenizer and seq_len, drawn by weight "
                                                                             "(the same mixture at every prefix of "
                                                                             "training).")
    exhausted: Optional[Literal["stop", "recycle"]] = Field(None, description=EXHAUSTED_HELP)
    shuffle_block_bytes: Optional[int] = Field(None, ge=4096, description="Shards shuffled together: a split larger "
                                                                         "than this is read a block of shards at a "
                                                                         "time, streamed through the node cache "
                                                                         "(default 1 GiB).")

    @model_validator(mode="after")
    def _one_source(self):
        from ember.storage import name, normalize

        names = [m.name or name(normalize(m.dir)) for m in self.mix] if self.mix is not None else None
        unfit = [n for n in names or () if not re.match(SOURCE_NAME, n)]
        if unfit:
            raise ValueError(f"data.mix: {unfit[0]!r} (the last part of its dir) is not a source name (letters, "
                             "digits, '_', '.', '-'): give the source a name:")
        check_mixture(self, "dir", names)
        return self



class ModelSpec(SpecModel):
    """The network: a preset, explicit fields over it, or the weights of an existing model dir."""

    preset: Optional[str] = Field("tiny", description="A shape from ember.model.PRESETS (tiny, small, 125m, 350m, 1b, "
                                                      "3b, 8b); vocab_size comes from the dataset's tokenizer.")
    init_from: Optional[str] = Field(None, description="A model dir to start from (its family, shape and weights: "
                                                       "Llama, Qwen2, Qwen3 or Mistral); a path or a URI.")
    hidden_size: Optional[int] = Field(None, ge=8, description="Override the preset's hidden size.")
    intermediate_size: Optional[int] = Field(None, ge=8, description="Override the preset's SwiGLU width.")
    num_hidden_layers: Optional[int] = Field(None, ge=1, description="Override the preset's layer count.")
    num_attention_heads: Optional[int] = Field(None, ge=1, description="Override the preset's query heads.")
    num_key_value_heads: Optional[int] = Field(None, ge=1, description="Override the preset's key/value heads.")
    max_position_embeddings: Optional[int] = Field(None, ge=8, description="Override the context length.")
    tie_word_embeddings: Optional[bool] = Field(None, description="Share the embedding and output matrices.")


class MlflowSpec(SpecModel):
    """An MLflow tracking server (or local store) the run is logged to."""

    tracking_uri: str = Field(description="The tracking server (http://HOST:5000) or a local store (a path, "
                                          "sqlite:///FILE); credentials only from the environment "
                                          "(MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and _PASSWORD).")
    experiment: str = Field("ember", min_length=1, description="The experiment (created when missing).")
    run_name: Optional[str] = Field(None, description="The run's name (default: the spec's name, else the run "
                                                      "dir's).")
    log_model: bool = Field(True, description="Upload the exported model dir as the run's artifacts (else only "
                                              "its location, as the tag ember.model).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        from urllib.parse import urlsplit

        if urlsplit(uri).password is not None or (urlsplit(uri).username and "@" in uri):
            raise PydanticCustomError(
                CREDENTIALS_ERROR, "credentials in the URI do not belong in a spec (it is written to the run dir): "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the "
                "environment (ember submit --env NAME passes them to a job)")
        return uri


class WandbSpec(SpecModel):
    """A Weights & Biases project the run is logged to."""

    project: str = Field(min_length=1, description="The W&B project.")
    entity: Optional[str] = Field(None, description="The W&B team or user (default: the API key's).")
    mode: Literal["online", "offline"] = Field("online", description="online sends to W&B (WANDB_API_KEY from the "
                                                                     "environment); offline writes the run under "
                                                                     "dir and sends nothing (`wandb sync` later).")
    dir: Optional[str] = Field(None, description="Where W&B writes its run files on rank 0's node (default: the run "
                                                 "dir when local, else the worker's working dir).")
    run_name: Optional[str] = Field(None, description="The run's name (default: the spec's name, else the run "
                                                      "dir's).")


class TrackingSpec(SpecModel):
    """Experiment tracking of a run: its parameters, every reported metric at its step, the model and result."""

    mlflow: Optional[MlflowSpec] = Field(None, description="Log the run to MLflow.")
    wandb: Optional[WandbSpec] = Field(None, description="Log the run to Weights & Biases (training runs).")
    required: bool = Field(False, description="Stop before training when the tracking server cannot be reached "
                                              "(default: one warning, and the run trains untracked).")


class TrainSpec(SpecModel):
    """The optimisation: batch, length, learning rate schedule, evaluation, logging and checkpoints."""

    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, over all workers.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward/backward on one worker; gradient "
                                                        "accumulation = global / (micro × workers), must divide.")
    max_steps: Optional[int] = Field(None, ge=1, description="Optimizer steps to train (this or max_tokens).")
    max_tokens: Optional[int] = Field(None, ge=1, description="Training tokens to consume (this or max_steps; a "
                                                              "preference pair's two sides both count).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0, description="Floor of the cosine decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps from 0 to lr.")
    decay_steps: Optional[int] = Field(None, ge=1, description="Step at which the cosine decay reaches min_lr "
                                                               "(default: the run's last step); fix it to extend a "
                                                               "run later without changing its schedule.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping (0 = off).")
    max_overflow_steps: int = Field(20, ge=0, description="fp16: steps in a row skipped for a loss-scale overflow "
                                                          "before the run stops (each one is counted and logged).")
    seed: int = Field(0, description="Seed of the initial weights and of the data order.")
    eval_every: int = Field(50, ge=0, description="Evaluate on val/ every N steps (0 = only at the end).")
    eval_batches: int = Field(4, ge=1, description="Micro batches per worker in one evaluation.")
    log_every: int = Field(5, ge=1, description="Report metrics every N steps.")
    tensorboard: bool = Field(False, description="Also write the metrics as TensorBoard event files in "
                                                 "RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`).")
    checkpoint_every: int = Field(50, ge=0, description="Save a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest K).")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking (MLflow).")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("set exactly one of train.max_steps and train.max_tokens")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) is above train.lr ({self.lr})")
        return self


class DeepSpeedSpec(SpecModel):
    """The DeepSpeed engine: ZeRO stage, offload, precision, activation checkpointing."""

    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, "
                                                       "3 + parameters partitioned over workers.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = Field(
        None, description="Training precision (default: bf16 with scaling.use_gpu, with TF32 matmuls; fp32 on CPU).")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    fp16_initial_scale_power: int = Field(16, ge=0, le=40, description="fp16: the dynamic loss scale starts at "
                                                                      "2^N and halves at each overflow.")
    overlap_comm: Optional[bool] = Field(
        None, description="Overlap the gradient reduction with the backward pass (default: on with scaling.use_gpu "
                          "and ZeRO 1-3; DeepSpeed's own default on CPU).")
    grad_accum_dtype: Optional[Literal["fp32", "bf16", "fp16"]] = Field(
        None, description="What gradients are summed in across micro-batches (default: fp32 with bf16/fp16 and ZeRO "
                          "1-2; the training precision otherwise).")
    reduce_bucket_size: Optional[int] = Field(
        None, ge=1, description="ZeRO 1-3: gradient elements reduced at once (default: hidden_size², Hugging Face's "
                                "`auto`; DeepSpeed's own 5e8 exceeds models under a few billion parameters).")
    allgather_bucket_size: Optional[int] = Field(
        None, ge=1, description="ZeRO 1-2: parameter elements gathered at once after the step (default: "
                                "hidden_size²).")
    stage3_prefetch_bucket_size: Optional[int] = Field(
        None, ge=1, description="ZeRO 3: parameter elements fetched ahead of use (default: 0.9 × hidden_size²).")
    stage3_param_persistence_threshold: Optional[int] = Field(
        None, ge=0, description="ZeRO 3: parameters with fewer elements stay whole on every worker (default: 10 × "
                                "hidden_size).")
    stage3_max_live_parameters: Optional[int] = Field(
        None, ge=1, description="ZeRO 3: gathered parameter elements kept at once (default: two decoder layers' "
                                "worth; DeepSpeed's own 1e9 keeps every layer of a smaller model gathered).")
    stage3_max_reuse_distance: Optional[int] = Field(
        None, ge=0, description="ZeRO 3: a parameter used again within this many elements stays gathered (default: "
                                "one decoder layer's worth).")


class ScalingSpec(SpecModel):
    """How many Ray Train workers, and what each needs."""

    workers: int = Field(2, ge=1, description="Training workers (one per GPU with use_gpu).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL, fused attention.")
    cpus_per_worker: Optional[float] = Field(
        None, gt=0, description="CPUs reserved per worker, and the threads of its CPU work (data loading, offloaded "
                                "Adam) (default: 8 with use_gpu, 1 on CPU).")
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (PACK fills nodes first; SPREAD one per node if it "
                            "can).")

    def worker_resources(self) -> dict[str, float]:
        """What Ray reserves for each worker (its placement group bundle)."""
        return {"CPU": self.cpus_per_worker, **self.resources_per_worker, **({"GPU": 1} if self.use_gpu else {})}


class FailureSpec(SpecModel):
    """What to do when a worker dies."""

    max_failures: int = Field(0, ge=-1, description="Restarts from the latest checkpoint before giving up (-1 = "
                                                    "always).")


class RunOutputSpec(SpecModel):
    """Where a run keeps its checkpoints, metrics and final model."""

    dir: str = Field(description="Run directory: checkpoints, metrics.jsonl, spec.yaml, model/; a path or a bucket "
                                 "URI, which a multi-node run needs (Ray Train stores its checkpoints there).")


class TrainingJobSpec(JobSpec):
    """What pretraining and fine-tuning share: the optimisation, the engine, the workers and the run dir."""

    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers and resources.")
    failure: FailureSpec = Field(default_factory=FailureSpec, description="Worker failure handling.")
    output: RunOutputSpec = Field(description="Run directory.")
    resume: str = Field("auto", description="auto: continue the latest checkpoint in the run dir (of this spec: "
                                            "another is refused, a longer train.max_steps or max_tokens continues "
                                            "it); never: refuse a run dir that has one; or the path (or URI) of a "
                                            "checkpoint to start from.")
    trust_checkpoint: bool = Field(False, description="Unpickle checkpoints whole, any Python object in them: only "
                                                      "for checkpoints from writers you trust (unpickling can run "
                                                      "code). Default: only tensors and DeepSpeed's training state "
                                                      "load, anything else is refused.")

    @model_validator(mode="after")
    def _defaults_follow_the_device(self):
        """Unset engine settings become the device's. On GPUs: bf16 (what Ampere and later train in), gradients
        summed in fp32 across micro-batches (ZeRO 1-2, where DeepSpeed can), the gradient reduction overlapped with
        the backward pass, and 8 CPUs per worker (Ray sets a worker's OpenMP threads, which DeepSpeed's CPU Adam of
        an offloaded optimizer uses, to its CPUs). On CPU: fp32 and one CPU per worker."""
        ds, gpu = self.deepspeed, self.scaling.use_gpu
        if ds.precision is None:
            ds.precision = "bf16" if gpu else "fp32"
        if ds.grad_accum_dtype is None and ds.precision != "fp32" and ds.zero_stage in (1, 2):
            ds.grad_accum_dtype = "fp32"
        if ds.grad_accum_dtype not in (None, ds.precision) and ds.zero_stage in (0, 3):
            raise ValueError(f"deepspeed.grad_accum_dtype: {ds.grad_accum_dtype} differs from the precision "
                             f"({ds.precision}), which DeepSpeed supports with ZeRO 1 and 2 only (zero_stage is "
                             f"{ds.zero_stage})")
        if ds.overlap_comm is None and gpu and ds.zero_stage >= 1:
            ds.overlap_comm = True
        if self.scaling.cpus_per_worker is None:
            self.scaling.cpus_per_worker = 8 if gpu else 1
        return self


class PretrainSpec(TrainingJobSpec):
    """`kind: pretrain` — train a Llama-architecture model on a tokenized dataset with Ray Train and DeepSpeed."""

    kind: Literal["pretrain"] = Field(description="Job kind.")
    data: DataSpec = Field(description="Dataset.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Network shape or starting weights.")


class ChatMixSourceSpec(InputSpec):
    """One set of conversations of a weighted mixture (tokenized with the mixture's settings into a dataset of its
    own, DATA_DIR/NAME)."""

    format: Literal["auto", "messages", "prompt_response", "alpaca"] = Field(
        "auto", description="Record layout, as data.format.")
    weight: float = Field(gt=0, allow_inf_nan=False, description="Its share of the samples, relative to the other "
                                                                 "sources' weights.")
    name: str = Field(pattern=SOURCE_NAME, description="Its name in logs, metrics and result.json, and its "
                                                       "dataset's dir under data.dir (not train or val).")

    @field_validator("name")
    @classmethod
    def _not_a_dataset_dirs_own(cls, name: str) -> str:
        if name in RESERVED_SOURCE_NAMES:
            raise ValueError(f"{name!r} names a dataset dir's own subdirectory; choose another name")
        return name


class ChatDataSpec(InputSpec):
    """Conversations to fine-tune on, tokenized with the base model's chat template into packed rows with a loss
    mask (by the same Ray Data pipeline and shard format as `kind: tokenize`). Inputs are JSONL/JSON/Parquet records
    of conversations, Hugging Face datasets directories, or builtin:python-qa (builtin:python-qa:test is its held-out
    split)."""

    OMITTED_WHEN_UNSET = ("inputs", "mix", "exhausted", "split", "messages_field")
    inputs: Optional[list[str]] = Field(None, min_length=1, description=InputSpec.model_fields["inputs"].description)
    mix: Optional[list[ChatMixSourceSpec]] = Field(None, min_length=1, description="Instead of inputs: sets of "
                                                                                 "conversations drawn by weight (the "
                                                                                 "same mixture at every prefix of "
                                                                                 "training).")
    exhausted: Optional[Literal["stop", "recycle"]] = Field(None, description=EXHAUSTED_HELP)

    format: Literal["auto", "messages", "prompt_response", "alpaca"] = Field(
        "auto", description="Record layout: messages [{role, content}] (or ShareGPT conversations [{from, value}]), "
        "prompt/response, or Alpaca instruction/input/output; auto decides per record.")
    messages_field: Optional[str] = Field(
        None, min_length=1, description="The field (JSON) or column (Parquet, Hugging Face) holding a conversation's "
        "list of turns, when it is neither messages nor conversations (the default looks for those two).")
    seq_len: int = Field(512, ge=8, description="Row length in tokens (rows hold seq_len + 1 ids); at most the "
                                                "base model's context.")
    train_on: Literal["assistant", "all"] = Field("assistant", description="Which tokens carry loss: the assistant "
                                                                           "turns only, or every token.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="A conversation longer than a row: cut "
                                                                          "it to the row, or drop it (both counted).")
    pack: bool = Field(True, description="Pack several whole conversations into one row (kept apart by segment "
                                         "ids); false: one conversation per row.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of conversations sent to val/, chosen by a "
                                                                  "stable hash of their text.")
    shard_bytes: int = Field(64 * MiB, ge=4096, description="Target size of one Arrow shard file.")
    dir: Optional[str] = Field(None, description="Where the tokenized conversations go (default: RUN_DIR/data); "
                                                 "reused when inputs and settings are unchanged.")
    overwrite: bool = Field(False, description="Replace a data.dir that holds a different dataset (the default, "
                                               "RUN_DIR/data, is the run's own: rebuilt when the data settings "
                                               "change, unless the run has checkpoints).")

    @model_validator(mode="after")
    def _inputs_or_a_mix(self):
        check_mixture(self, "inputs", [m.name for m in self.mix] if self.mix is not None else None)
        return self

    def source(self) -> SourceSpec:
        """The inputs as the readers take them (records parsed by extension: a conversation's `format` is its
        layout, read by `ember.data.chat.to_messages`)."""
        return SourceSpec(**self.model_dump(include=set(InputSpec.model_fields)))

    def sources(self) -> list[tuple[str, float, ChatDataSpec]]:
        """A mixture's sources as (name, weight, the data settings with that source's inputs)."""
        own = set(ChatMixSourceSpec.model_fields) - {"weight", "name"}  # the inputs, how they are read and cut
        shared = self.model_dump(exclude={"mix", "exhausted", "dir", "overwrite", *own})
        return [(m.name, m.weight, ChatDataSpec(**shared, **m.model_dump(exclude={"weight", "name"}),
                                                overwrite=self.overwrite)) for m in self.mix]


class LoraSpec(SpecModel):
    """Low-rank adapters (method: lora): the base weights stay frozen; only the adapters train."""

    rank: int = Field(8, ge=1, description="Adapter rank r.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is (alpha / rank) · B · A.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = \
        Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
              description="Projections that get adapters (Llama names).")


class FinetuneSpec(TrainingJobSpec):
    """`kind: finetune` — supervised fine-tuning on conversations (full or LoRA) from a Llama, Qwen2, Qwen3 or
    Mistral model dir."""

    kind: Literal["finetune"] = Field(description="Job kind.")
    base: str = Field(description="The model dir to start from: an Ember export or a Llama, Qwen2, Qwen3 or Mistral "
                                  "dir (config.json, safetensors weights, tokenizer.json); a path or a URI.")
    data: ChatDataSpec = Field(description="Conversations.")
    method: Literal["full", "lora"] = Field("full", description="full: train every weight; lora: train low-rank "
                                                                "adapters on a frozen base.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (method: lora).")


class PairDataSpec(InputSpec):
    """Preference pairs to tune on: `{prompt, chosen, rejected}` texts, or two conversations (`chosen: [messages]`,
    `rejected: [messages]`) that share every turn but the last; rendered with the base model's chat template, one
    pair per row, loss on the answer tokens only (by the same Ray Data pipeline and shard format as `kind:
    tokenize`). Inputs are JSONL/JSON/Parquet records, Hugging Face datasets directories, or builtin:python-prefs
    (builtin:python-prefs:test is its held-out split)."""

    inputs: list[str] = Field(min_length=1, description="Files, directories, globs or URIs of JSONL/JSON or Parquet "
                                                        "pair records, Hugging Face datasets directories, or "
                                                        "builtin:python-prefs (builtin:python-prefs:test is its "
                                                        "held-out split).")
    format: Literal["auto", "texts", "conversations"] = Field(
        "auto", description="Pair layout: texts (prompt, chosen and rejected strings: the prompt is the user turn), "
        "conversations (chosen and rejected lists of {role, content} sharing all but their last turn, the prompt "
        "key unused); auto decides per record.")
    seq_len: int = Field(512, ge=8, description="Row length in tokens (rows hold seq_len + 1 ids); a side (prompt and "
                                                "answer) longer than this is skipped, with its location.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of pairs sent to val/, chosen by a stable "
                                                                  "hash of the pair.")
    shard_bytes: int = Field(64 * MiB, ge=4096, description="Target size of one Arrow shard file.")
    dir: Optional[str] = Field(None, description="Where the tokenized pairs go (default: RUN_DIR/data); reused when "
                                                 "inputs and settings are unchanged.")
    overwrite: bool = Field(False, description="Replace a data.dir that holds a different dataset (the default, "
                                               "RUN_DIR/data, is the run's own).")

    def source(self) -> SourceSpec:
        """The inputs as the readers take them (records parsed by extension)."""
        return SourceSpec(**self.model_dump(include=set(InputSpec.model_fields)))


PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo")


class PreferenceLossSpec(SpecModel):
    """The preference loss and its hyper-parameters, as TRL defines them (`DPOTrainer` for dpo and ipo, `CPOTrainer`
    for simpo, `ORPOTrainer` for orpo)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)
    OMITTED_WHEN_UNSET = ("gamma", "lambda")  # keys as dumped (by alias)

    loss: Literal["dpo", "ipo", "simpo", "orpo"] = Field(
        "dpo", description="dpo: -log σ(β·(chosen - rejected log-ratio against the reference)); ipo: its squared "
        "form on length-averaged log-probabilities; simpo: reference-free, length-averaged, with a margin γ; orpo: "
        "reference-free, the chosen side's cross-entropy minus λ·log σ(log-odds ratio).")
    beta: float = Field(0.1, gt=0, allow_inf_nan=False, description="β: how far the policy may move from the "
                                                                    "reference (dpo, ipo), the reward scale (simpo; "
                                                                    "orpo's rewards scale by λ, as TRL's do).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, allow_inf_nan=False,
                                   description="dpo, simpo: the assumed share of pairs whose labels are flipped "
                                               "(conservative DPO); 0 for plain DPO.")
    gamma: Optional[float] = Field(None, ge=0, allow_inf_nan=False,
                                   description="simpo: the target reward margin γ (default 0.5).")
    lambda_: Optional[float] = Field(None, alias="lambda", gt=0, allow_inf_nan=False,
                                     description="orpo: the weight λ of the odds-ratio term (default 0.1).")

    @model_validator(mode="after")
    def _settings_of_the_loss(self):
        if self.gamma is not None and self.loss != "simpo":
            raise ValueError(f"preference.gamma is SimPO's margin; loss is {self.loss}")
        if self.lambda_ is not None and self.loss != "orpo":
            raise ValueError(f"preference.lambda is ORPO's weight; loss is {self.loss}")
        if self.label_smoothing and self.loss not in ("dpo", "simpo"):
            raise ValueError(f"preference.label_smoothing applies to dpo and simpo; loss is {self.loss}")
        if self.loss == "orpo" and self.beta != PreferenceLossSpec.model_fields["beta"].default:
            raise ValueError("preference.beta is not ORPO's: its odds-ratio term and rewards are weighted by "
                             "preference.lambda")
        return self

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference model (dpo, ipo) or is reference-free (simpo, orpo)."""
        return self.loss in ("dpo", "ipo")

    @property
    def margin(self) -> float:
        return 0.5 if self.gamma is None else self.gamma

    @property
    def odds_weight(self) -> float:
        return 0.1 if self.lambda_ is None else self.lambda_


class PreferenceSpec(TrainingJobSpec):
    """`kind: preference` — preference tuning (DPO, IPO, SimPO, ORPO) on chosen/rejected pairs, full or LoRA, from a
    Llama, Qwen2, Qwen3 or Mistral model dir (usually a supervised fine-tune)."""

    kind: Literal["preference"] = Field(description="Job kind.")
    base: str = Field(description=FinetuneSpec.model_fields["base"].description)
    data: PairDataSpec = Field(description="Preference pairs.")
    method: Literal["full", "lora"] = Field("full", description="full: train every weight (the reference's "
                                                                "log-probabilities computed once before training); "
                                                                "lora: adapters on a frozen base, which with the "
                                                                "adapters off is the reference.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (method: lora).")
    preference: PreferenceLossSpec = Field(default_factory=PreferenceLossSpec, description="The loss.")


class EvalDataSpec(SpecModel):
    """What to evaluate on."""

    OMITTED_WHEN_UNSET = ("pairs", "max_pairs")

    dir: Optional[str] = Field(None, description="A dataset dir: perplexity (pretrain datasets) or the loss on "
                                                 "assistant tokens (fine-tuning datasets).")
    split: Literal["train", "val"] = Field("val", description="Which split of data.dir.")
    batches: int = Field(50, ge=1, description="Rows of data.dir evaluated, in batches of batch_size: at most "
                                               "batches × batch_size.")
    batch_size: int = Field(8, ge=1, description="Rows (or conversations, or answers generated together) per "
                                                 "forward pass.")
    conversations: list[str] = Field(default_factory=list, description="Conversation files or builtin:python-qa:test:"
                                                                       " assistant-token loss with each model's own "
                                                                       "template, and a generation score.")
    max_conversations: Optional[int] = Field(None, ge=1, description="Score at most this many of the conversations "
                                                                     "(the first ones read; default: all).")
    pairs: Optional[list[str]] = Field(None, min_length=1, description="Preference pair files or "
                                                               "builtin:python-prefs:test: preference accuracy (how "
                                                               "often the chosen answer is the likelier) and the "
                                                               "mean log-probability margin, with each model's own "
                                                               "template.")
    max_pairs: Optional[int] = Field(None, ge=1, description="Score at most this many pairs (the first ones read; "
                                                             "default: all).")


class GenerationEvalSpec(SpecModel):
    """The generation-based score on `data.conversations`: greedy answers to each prompt against the reference."""

    max_examples: int = Field(200, ge=0, description="Conversations answered (0 = no generation score).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")


class EvalOutputSpec(SpecModel):
    """Where the results go."""

    file: str = Field(description="A JSON file with every figure per model (a path or a URI).")


class LmEvalSpec(SpecModel):
    """Standard benchmarks through lm-evaluation-harness, scored by Ember's model on Ray actors."""

    tasks: list[str] = Field(min_length=1, description="Harness task or group names (e.g. hellaswag, or the tasks "
                                                       "of include_path).")
    num_fewshot: Optional[int] = Field(None, ge=0, description="Few-shot examples per request (default: each "
                                                               "task's own).")
    limit: Optional[int] = Field(None, ge=1, description="At most this many documents per task.")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass on each actor.")
    actors: int = Field(1, ge=1, description="Ray actors the requests are spread over, one model each (one CPU "
                                             "each).")
    gpus_per_actor: float = Field(0, ge=0, le=8, description="GPUs each actor asks Ray for (1 on GPU nodes: its "
                                                             "model on that GPU; 0: on CPU).")
    include_path: Optional[str] = Field(None, description="A directory of the harness's YAML task files (local "
                                                          "JSONL data works without network access); needs "
                                                          "allow_code.")
    allow_code: bool = Field(False, description="Trust include_path's task files: they may run Python on the "
                                                "cluster (`!function`, `process_results`).")
    apply_chat_template: bool = Field(False, description="Write each request with the model's chat template (as "
                                                     "the harness's --apply_chat_template).")
    fewshot_as_multiturn: bool = Field(False, description="With the chat template: few-shot examples as earlier "
                                                          "turns of the conversation.")
    system_instruction: Optional[str] = Field(None, description="A system message before every request.")
    chat_template_kwargs: dict[str, bool | int | str] = Field(default_factory=dict, description="The chat "
                                                              "template's own switches (Qwen3's enable_thinking).")

    @model_validator(mode="after")
    def _multiturn_needs_the_template(self):
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("lm_eval.fewshot_as_multiturn needs lm_eval.apply_chat_template: true")
        if self.include_path and not self.allow_code:
            raise ValueError("lm_eval.include_path: the harness's task files can run Python on the cluster "
                             "(`!function`); set lm_eval.allow_code: true if you trust this directory")
        return self


class EvaluateSpec(JobSpec):
    """`kind: evaluate` — compare model dirs: perplexity, assistant-token loss, and a generation score."""

    kind: Literal["evaluate"] = Field(description="Job kind.")
    models: dict[str, str] = Field(min_length=1, description="Model dirs to evaluate, by a name for the report "
                                                             "(e.g. base: …, finetuned: …); paths or URIs.")
    data: EvalDataSpec = Field(default_factory=EvalDataSpec, description="Datasets.")
    generation: GenerationEvalSpec = Field(default_factory=GenerationEvalSpec, description="Generation score.")
    output: EvalOutputSpec = Field(description="Results file.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Log the figures to MLflow too (one "
                                                                             "run per evaluation).")
    lm_eval: Optional[LmEvalSpec] = Field(None, description="Also score every model on lm-evaluation-harness "
                                                            "tasks.")

    @model_validator(mode="after")
    def _something(self):
        if not self.data.dir and not self.data.conversations and not self.data.pairs and self.lm_eval is None:
            raise ValueError("set data.dir, data.conversations, data.pairs or lm_eval")
        return self


# The job kinds Ember knows, by the value of their `kind` key.
SPEC_KINDS: dict[str, type[SpecModel]] = {"tokenize": TokenizeSpec, "pretrain": PretrainSpec,
                                          "finetune": FinetuneSpec, "preference": PreferenceSpec,
                                          "evaluate": EvaluateSpec}
