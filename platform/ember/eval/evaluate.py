"""`kind: evaluate`: compares model dirs on the same data.

- `data.dir`, a dataset dir: the mean next-token loss and perplexity over its first rows (pretrain datasets), or
  the loss on assistant tokens only (fine-tuning datasets, whose rows carry a loss mask). The model's tokenizer must
  give the same ids as the dataset's.
- `data.conversations` (JSONL/Parquet conversations or builtin:python-qa:test): each model renders them with its own
  chat template and tokenizer; the loss on the assistant tokens, and, for the first `generation.max_examples`, a
  greedy answer to the conversation up to its last assistant turn scored against that turn by exact match and token
  F1 (SQuAD-style: lower case, punctuation and articles dropped).
- `data.pairs` (preference pairs, or builtin:python-prefs:test): each model renders both sides with its own template;
  its preference accuracy (the share of pairs whose chosen answer it gives the higher log-probability) and the mean
  margin (chosen minus rejected answer log-probability).

The evaluation runs in the job's driver process (CPU or one GPU); results go to `output.file` and the log.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections import Counter

import torch

from ember import storage
from ember.config.specs import EvaluateSpec, SourceSpec
from ember.data.chat import (
    BadRecord,
    ChatEncoder,
    ChatTemplate,
    chat_tokenizer,
    read_records,
    to_messages,
)
from ember.data.pairs import PreferencePair, encode_sides, pad_pairs, read_pairs
from ember.data.shards import ShardReader, load_manifest
from ember.data.sources import resolve_inputs, source_fingerprint
from ember.data.tokenizer import load_tokenizer, tokenizer_config
from ember.errors import EmberError
from ember.eval.harness import run_harness
from ember.identity import identity_of, spec_without, stamp_matches, write_stamp
from ember.model import SamplingParams, builtin, generate_ids, generation_stops, load_model
from ember.model.hf import weights_fingerprint
from ember.runs.tracking import log_evaluation, settle_tracking
from ember.runtime import ensure_ray
from ember.train.recipes import RECIPES, dataset_recipe, evaluation_losses

log = logging.getLogger("ember")


def _normalize(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(_normalize(prediction) == _normalize(reference))


def _check_same_ids(model_dir: str, dataset_dir: str) -> None:
    """The model's tokenizer must map the dataset's tokens to the same ids."""
    data_vocab = load_tokenizer(dataset_dir).get_vocab(with_added_tokens=True)
    model_vocab = load_tokenizer(model_dir).get_vocab(with_added_tokens=True)
    differing = [t for t, i in data_vocab.items() if model_vocab.get(t) != i]
    if differing:
        raise EmberError(f"the tokenizer of {model_dir} differs from the dataset's in {dataset_dir} "
                         f"({len(differing)} tokens, e.g. {differing[0]!r}); evaluate each model on data "
                         "tokenized with its own tokenizer, or use data.conversations")


@torch.no_grad()
def dataset_loss(model, dataset_dir: str, split: str, batches: int, batch_size: int) -> dict:
    """Mean loss over the first rows of a split, weighted by target tokens (file order: the same rows each time),
    by the loss of the dataset's recipe (`ember.train.recipes.evaluation_losses`)."""
    manifest = load_manifest(dataset_dir)
    reader = ShardReader(dataset_dir, split)
    rows = min(len(reader), batches * batch_size)

    def in_file_order():  # fine-tuning rows as a dict of columns, pretraining rows as one tensor
        for start in range(0, rows, batch_size):
            picked = [reader.columns(i) for i in range(start, min(rows, start + batch_size))]
            columns = {c: torch.stack([torch.from_numpy(r[c].astype("int64")) for r in picked]) for c in picked[0]}
            yield columns if reader.extra_columns else columns["input_ids"]

    loss, count = _weighted_mean(*evaluation_losses(dataset_recipe(manifest, storage.display(dataset_dir)), model,
                                                    in_file_order()))
    kind = "assistant_loss" if manifest.get("kind") == "sft" else "loss"
    return {kind: loss, "perplexity": math.exp(min(loss, 50.0)), "rows": rows, "target_tokens": count}


def _weighted_mean(losses: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """The mean loss per target token of batches' mean losses, and the number of targets (summed in batch order, in
    Python floats: the same figure whatever the device)."""
    total, count = 0.0, 0
    for loss, n in zip(losses.tolist(), targets.tolist()):
        total += loss * n
        count += int(n)
    return total / max(count, 1), count


def read_conversations(inputs: list[str]) -> list[tuple[list[dict], str]]:
    """(messages, file:line) of every usable conversation in `inputs`; bad records are counted and skipped."""
    return read_records(inputs, to_messages, "conversations")


def model_encoder(model_dir: str) -> ChatEncoder:
    """The chat encoder of a model dir: its tokenizer and template (Ember's default template only where the
    tokenizer already has its tokens)."""
    tok, config, added = chat_tokenizer(load_tokenizer(model_dir), tokenizer_config(model_dir))
    if added:
        raise EmberError(f"{model_dir} has no chat template and its tokenizer lacks the tokens of Ember's default "
                         f"one ({', '.join(added)}); fine-tune it first or give it a chat_template")
    return ChatEncoder(tok, ChatTemplate.of(config))


@torch.no_grad()
def pair_scores(model, model_dir: str, pairs: list[PreferencePair], batch_size: int = 8) -> dict:
    """Preference accuracy and mean margin over `pairs`, each side rendered with the model's own template: the
    answers' summed log-probabilities compared, pair by pair."""
    from ember.train.preference_loss import pair_logps

    encoder, context = model_encoder(model_dir), model.config.max_position_embeddings + 1
    rows, too_long = [], []
    for pair in pairs:
        try:
            encoded = encode_sides(encoder, pair.chosen, pair.rejected)
        except BadRecord as bad:
            raise EmberError(f"{pair.where}: {bad.detail} (model {model_dir})") from None
        if max(len(encoded[0]), len(encoded[2])) <= context:
            rows.append(encoded)
        else:
            too_long.append(pair.where)
    if too_long:
        log.info("evaluate: %d pairs longer than the context of %s (%d tokens) left out, the first %s",
                 len(too_long), model_dir, context - 1, too_long[0])
    if not rows:
        raise EmberError(f"no pair fits the context of {model_dir} ({context - 1} tokens)")
    margins = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(max(len(r[0]), len(r[2])) for r in chunk)
        batch = {k: torch.from_numpy(v.astype("int64")) for k, v in pad_pairs(chunk, width, 0).items()}
        logps = pair_logps(model, batch)
        margins.extend((logps["chosen_logps"] - logps["rejected_logps"]).float().tolist())
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "mean_margin": sum(margins) / len(margins), "pairs": len(margins), "too_long": len(too_long)}


@torch.no_grad()
def conversation_scores(model, model_dir: str, conversations: list[tuple[list[dict], str]], max_examples: int,
                        max_new_tokens: int, batch_size: int = 8) -> dict:
    encoder = model_encoder(model_dir)
    tok, template = encoder.tok, encoder.template
    context = model.config.max_position_embeddings
    rows = []
    for messages, where in conversations:
        try:
            ids, mask = encoder.encode(messages)
        except BadRecord as bad:
            raise EmberError(f"{where}: {bad.detail} (model {model_dir})") from None
        if mask[1:context].any():
            rows.append((ids[:context], mask[:context]))
    batches = (_padded_batch(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size))
    loss, count = _weighted_mean(*evaluation_losses(RECIPES["finetune"], model, batches))
    result = {"assistant_loss": loss, "assistant_tokens": count}
    if max_examples:
        result.update(_answer_scores(model, model_dir, tok, template, conversations[:max_examples], max_new_tokens,
                                     batch_size))
    return result


def _padded_batch(rows: list[tuple]) -> dict:
    """Rows of (ids, loss mask) right-padded into one batch: causal attention keeps the padding out of every real
    position, and the padding carries no loss."""
    width = max(len(ids) for ids, _ in rows)
    ids_out = torch.zeros(len(rows), width, dtype=torch.long)
    mask_out = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (ids, mask) in enumerate(rows):
        ids_out[row, :len(ids)] = torch.from_numpy(ids.astype("int64"))
        mask_out[row, :len(mask)] = torch.from_numpy(mask.astype("int64"))
    return {"input_ids": ids_out, "loss_mask": mask_out, "segments": torch.ones_like(ids_out)}


def _answer_scores(model, model_dir: str, tok, template, conversations: list, max_new_tokens: int,
                   batch_size: int) -> dict:
    """Token F1 and exact match of greedy answers to each conversation's last question, `batch_size` at a time."""
    context = model.config.max_position_embeddings
    stops = generation_stops(tok, chat=True, model_dir=model_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0).validate()
    asked = []
    for messages, where in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tok.encode(template.render(messages[:last], add_generation_prompt=True), add_special_tokens=False).ids
        asked.append((prompt[-(context - max_new_tokens):] if len(prompt) + max_new_tokens > context else prompt,
                      messages, last, where))
    f1, em, examples = [], [], []
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        for (_, messages, last, where), new in zip(chunk, generate_ids(model, [c[0] for c in chunk], params, stops)):
            answer, reference = tok.decode(new).strip(), messages[last]["content"]
            f1.append(token_f1(answer, reference))
            em.append(exact_match(answer, reference))
            if len(examples) < 3:
                examples.append({"where": where, "question": messages[last - 1]["content"] if last else "",
                                 "answer": answer, "reference": reference})
    return {"token_f1": sum(f1) / len(f1), "exact_match": sum(em) / len(em), "answered": len(f1),
            "examples": examples}


def _identity(spec: EvaluateSpec) -> str:
    """What the results depend on: the spec (not where the figures are logged), each model's weights, the
    conversations' content (`source_fingerprint`: every file of a directory or glob, an object, a built-in corpus's
    build) and the dataset's manifest."""
    models = {name: weights_fingerprint(builtin.resolve(path)) for name, path in spec.models.items()}
    data = load_manifest(spec.data.dir) if spec.data.dir else None
    inputs = [*spec.data.conversations, *(spec.data.pairs or [])]
    files = source_fingerprint(resolve_inputs(SourceSpec(inputs=inputs))) if inputs else None
    return identity_of({"spec": spec_without(spec, ("tracking",)), "models": models, "files": files, "data": data})


def _check_models(models: dict[str, str]) -> None:
    """Every model named is a model dir, or a built-in model (imported on this node now)."""
    for name, path in models.items():
        try:
            found = storage.is_dir(builtin.resolve(path))
        except EmberError as exc:  # an unknown built-in model, or its package missing
            raise EmberError(f"models.{name}: {exc}") from None
        if not found:
            raise EmberError(f"models.{name}: model directory not found: {storage.display(path)}")


def _model_figures(spec: EvaluateSpec, path: str, conversations: list, pairs: list) -> dict:
    """One model's figures: its dataset loss, conversation scores and harness results, as the spec asks."""
    model_dir = builtin.resolve(path)
    model = load_model(model_dir).eval()
    figures: dict = {"model": storage.display(model_dir)}
    if spec.data.dir:
        _check_same_ids(model_dir, spec.data.dir)
        figures["dataset"] = dataset_loss(model, spec.data.dir, spec.data.split, spec.data.batches,
                                          spec.data.batch_size)
    if conversations:
        figures["conversations"] = conversation_scores(model, model_dir, conversations, spec.generation.max_examples,
                                                       spec.generation.max_new_tokens, spec.data.batch_size)
    if pairs:
        figures["pairs"] = pair_scores(model, model_dir, pairs, spec.data.batch_size)
    if spec.lm_eval is not None:
        figures["lm_eval"] = run_harness(path if builtin.is_builtin(path) else model_dir, spec.lm_eval)
    return figures


def _figures_line(figures: dict, split: str) -> str:
    """One model's figures for the log."""
    parts = []
    if "dataset" in figures:
        d = figures["dataset"]
        key = "assistant_loss" if "assistant_loss" in d else "loss"
        parts.append(f"{split} {key.replace('_', ' ')} {d[key]:.4f} (ppl {d['perplexity']:.1f})")
    if "conversations" in figures:
        c = figures["conversations"]
        parts.append(f"held-out assistant loss {c['assistant_loss']:.4f}")
        if "token_f1" in c:
            parts.append(f"token F1 {c['token_f1']:.3f}, exact match {c['exact_match']:.3f} "
                         f"over {c['answered']} answers")
    if "pairs" in figures:
        p = figures["pairs"]
        parts.append(f"preference accuracy {p['preference_accuracy']:.3f}, mean margin {p['mean_margin']:.3f} over "
                     f"{p['pairs']} pairs")
    if "lm_eval" in figures:
        from lm_eval.utils import make_table

        parts.append(f"lm-evaluation-harness:\n{make_table(figures['lm_eval'])}")
    return "; ".join(parts)


def run_evaluate(spec: EvaluateSpec, address: str | None = None) -> dict:
    """Evaluates every model of the spec; writes and returns {model name: figures}."""
    t0 = time.perf_counter()
    spec = spec.model_copy(deep=True)
    settle_tracking(spec.tracking, "tracking")
    _check_models(spec.models)
    if spec.data.dir:
        load_manifest(spec.data.dir)
    out = storage.normalize(spec.output.file)
    identity = _identity(spec)
    stamp = storage.join(storage.parent(out), storage.name(out) + ".identity")
    if storage.is_file(out) and stamp_matches(stamp, identity):
        log.info("evaluate: %s already holds these results (same spec, models and data): reusing them",
                 storage.display(out))
        return json.loads(storage.read_bytes(out))
    conversations = read_conversations(spec.data.conversations) if spec.data.conversations else []
    conversations = conversations[:spec.data.max_conversations]
    pairs = read_pairs(spec.data.pairs, limit=spec.data.max_pairs) if spec.data.pairs else []
    if spec.lm_eval is not None:
        ensure_ray(address)  # the harness's requests go to Ray actors
    results: dict[str, dict] = {}
    for name, path in spec.models.items():
        results[name] = _model_figures(spec, path, conversations, pairs)
        log.info("evaluate: %-10s %s", name, _figures_line(results[name], spec.data.split))
    storage.write_text(out, json.dumps(results, indent=2) + "\n")
    write_stamp(stamp, identity)
    if spec.tracking.mlflow is not None:
        log_evaluation(spec, results)
    log.info("evaluate: results in %s (%.1fs)", storage.display(out), time.perf_counter() - t0)
    return results
