"""Standard benchmarks through EleutherAI's lm-evaluation-harness, scored by Ember's own model on Ray actors.

`EmberLM` is a harness model class (registered as ``ember``): the harness builds the requests of each task and
computes the metrics; Ember answers the requests. It follows the harness's `hf` class request by request, so the
numbers are the harness's numbers: the same tokenization (`TemplateLM._encode_pair`, the tokenizer's own special
tokens, an empty context scored after the BOS token or else the end-of-text one), the same left truncation to the
model's context, the same rolling windows for perplexity tasks, greedy generation cut at the stop strings.

The requests are spread over Ray actors (`ScoringActor`, one model each: one per GPU, or per CPU slot) in contiguous
slices and gathered back in the harness's order, so the result is the same for any number of actors.

    kind: evaluate
    lm_eval: {tasks: [hellaswag], num_fewshot: 0, limit: 100, actors: 2, include_path: ./my-tasks, allow_code: true}

With `apply_chat_template`, each request is written with the model's chat template as the hf class writes it
(`ScoringPool.chat`: transformers' `continue_final_message` where the harness asks for no generation prompt).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ember import storage
from ember.errors import EmberError

log = logging.getLogger("ember.train")


def score_pairs(model, pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int,
                device="cpu") -> list[tuple[float, bool]]:
    """(log-probability of the continuation, whether greedy decoding gives it) of each (context, continuation) of
    token ids, as the harness's `hf` class computes them: the last max_length + 1 tokens, the final one dropped as
    input; rows right-padded (causal attention keeps padding out of every real position)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        inputs = [(ctx + cont)[-(max_length + 1):][:-1] for ctx, cont in chunk]
        width = max(len(i) for i in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            logprobs = F.log_softmax(model(batch.to(device)).float(), dim=-1).cpu()
        for row, ((_, cont), ids) in enumerate(zip(chunk, inputs)):
            span = logprobs[row, len(ids) - len(cont):len(ids)]  # the positions that predict the continuation
            target = torch.tensor(cont, dtype=torch.long)
            greedy = bool((span.argmax(-1) == target).all())
            out.append((float(span.gather(1, target[:, None]).sum()), greedy))
    return out


class ScoringActor:
    """One copy of the model, on a Ray actor: scores request slices and generates continuations."""

    def __init__(self, model_dir: str, max_length: int, batch_size: int, stop_ids: list[int], gpu: bool = False):
        from ember.model import load_model
        from ember.model.hf import local_model_dir

        if gpu and not torch.cuda.is_available():
            raise EmberError("lm_eval.gpus_per_actor asks for a GPU but this actor's node has no CUDA device torch "
                             f"{torch.__version__} can use")
        self.device = "cuda" if gpu else "cpu"
        self.model = load_model(local_model_dir(model_dir), device=self.device).eval()
        self.max_length, self.batch_size, self.stop_ids = max_length, batch_size, set(stop_ids)

    def score(self, pairs):
        return score_pairs(self.model, pairs, self.max_length, self.batch_size, self.device)

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy continuations, one prompt at a time (the hf class's batches are left-padded to the same
        tokens)."""
        from ember.model import SamplingParams, generate_ids

        return [generate_ids(self.model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0),
                             self.stop_ids)[0] for prompt, n in zip(prompts, max_new_tokens)]


class ScoringPool:
    """The model dir's tokenizer and limits, and the Ray actors its requests go to (no lm_eval needed here)."""

    def __init__(self, model_dir: str, actors: int, batch_size: int, max_length: int | None, gpus_per_actor: float):
        import ray

        from ember.cluster.capacity import check_fits
        from ember.data.chat import ChatTemplate
        from ember.data.tokenizer import load_tokenizer, token_name, tokenizer_config
        from ember.model.hf import config_from_hf, generation_stops, local_model_dir, read_json

        local, self.model_dir = local_model_dir(model_dir), str(model_dir)
        self.tok = load_tokenizer(local)
        config = tokenizer_config(local)
        self.template = ChatTemplate.of(config)  # None: the model has no chat template
        cfg = config_from_hf(read_json(local / "config.json"), str(local / "config.json"))
        self.max_length = int(max_length or cfg.max_position_embeddings)
        eos, bos = token_name(config.get("eos_token")), token_name(config.get("bos_token"))
        stops = generation_stops(self.tok, chat=False, model_dir=local)
        self.eot = self.tok.token_to_id(eos) if eos else min(stops, default=0)
        bos_id = self.tok.token_to_id(bos) if bos else None
        self.prefix = bos_id if bos_id is not None else self.eot  # what an empty context is scored after
        self.prefix_text = self.tok.decode([self.prefix], skip_special_tokens=False)
        self.eot_text = self.tok.decode([self.eot], skip_special_tokens=False)
        stop_ids = sorted(stops | {self.eot})
        # An actor the cluster can never hold would wait for ever: refused here, naming the numbers.
        waiting = check_fits({"CPU": 1, "GPU": float(gpus_per_actor)}, int(actors), "lm_eval",
                             "lm_eval.actors or lm_eval.gpus_per_actor")
        if waiting:
            log.info("lm_eval: %s", waiting)
        remote = ray.remote(num_cpus=1, num_gpus=float(gpus_per_actor))(ScoringActor)
        self.actors = [remote.remote(str(model_dir), self.max_length, int(batch_size), stop_ids,
                                     float(gpus_per_actor) > 0) for _ in range(int(actors))]

    def encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None) -> list[int]:
        """As the hf class: the tokenizer's special tokens unless the text already starts with the prefix token."""
        special = add_special_tokens if add_special_tokens is not None else not string.startswith(self.prefix_text)
        ids = self.tok.encode(string, add_special_tokens=special).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def chat(self, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
        """A request's conversation as the model's chat template writes it, as the hf class does: a conversation
        the template refuses is tried once more without its system messages; without a generation prompt, the text
        ends inside the last message (transformers' `continue_final_message`)."""
        from ember.data.chat import BadRecord

        if self.template is None:
            raise EmberError(f"lm_eval.apply_chat_template: the model {self.model_dir} has no chat template "
                             "(chat_template in its tokenizer_config.json or chat_template.jinja)")
        render = functools.partial(self.template.render, add_generation_prompt=add_generation_prompt,
                                   continue_final_message=not add_generation_prompt, **variables)
        try:
            return render(messages)
        except BadRecord:
            try:
                return render([m for m in messages if m["role"] != "system"])
            except BadRecord as exc:
                raise EmberError(f"lm_eval.apply_chat_template: {exc.detail}") from None

    def spread(self, method: str, items: list, *extra) -> list:
        """`method` of the actors over contiguous slices of `items` (and of `extra`), gathered back in order."""
        import ray

        size = max(1, math.ceil(len(items) / len(self.actors)))
        slices = [slice(i * size, (i + 1) * size) for i in range(len(self.actors)) if i * size < len(items)]
        calls = [getattr(actor, method).remote(items[s], *[e[s] for e in extra])
                 for actor, s in zip(self.actors, slices)]
        return [out for part in ray.get(calls) for out in part]

    def rolling(self, strings: list[str]) -> list[float]:
        """Each text's log-likelihood over the harness's disjoint rolling windows of the context."""
        from lm_eval import utils

        windows, owners = [], []
        for i, string in enumerate(strings):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.encode(string), prefix_token=self.prefix, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((list(ctx), list(cont)))
                owners.append(i)
        totals = [0.0] * len(strings)
        for owner, (logprob, _) in zip(owners, self.spread("score", windows)):
            totals[owner] += logprob
        return totals

    def generate(self, requests: list[tuple[str, dict]]) -> list[str]:
        """Greedy continuations, left-truncated to leave room for their budget, cut at the stop strings."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        prompts, budgets, stops = [], [], []
        for context, gen_kwargs in requests:
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            if kwargs.get("do_sample"):
                raise EmberError("lm_eval: a task asks for sampling (do_sample: true); Ember scores tasks greedily, "
                                 "as the harness's hf class does by default")
            stops.append(handle_stop_sequences(kwargs.pop("until", None), eos=self.eot_text))
            budgets.append(int(kwargs.pop("max_gen_toks")))
            prompts.append(self.encode(context, left_truncate_len=self.max_length - budgets[-1]))
        texts = []
        for ids, until in zip(self.spread("generate", prompts, budgets), stops):
            text = self.tok.decode(ids, skip_special_tokens=True)
            for stop in filter(None, until):
                text = text.split(stop)[0]
            texts.append(text)
        return texts


@functools.cache
def _harness_class():  # noqa: C901 (one class defined in a function: mccabe adds up its 15 one-line methods)
    """`EmberLM`, defined (and registered) once, when the harness is first needed: lm_eval is imported only there."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("ember")
    class EmberLM(TemplateLM):
        """Ember's model as a harness model (`model_args`: model_dir, actors, batch_size, gpus_per_actor,
        chat_template_kwargs); the requests go to a `ScoringPool`."""

        def __init__(self, model_dir: str, actors: int = 1, batch_size: int = 8, max_length: int | None = None,
                     gpus_per_actor: float = 0, chat_template_kwargs: dict | None = None, **_):
            super().__init__()
            self.pool = ScoringPool(model_dir, actors, batch_size, max_length, gpus_per_actor)
            self.template_variables = dict(chat_template_kwargs or {})

        @property
        def tokenizer_name(self) -> str:
            return self.pool.model_dir.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.pool.template.source if chat_template and self.pool.template is not None else None

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.pool.chat(chat_history, add_generation_prompt, self.template_variables)

        @property
        def eot_token_id(self) -> int:
            return self.pool.eot

        @property
        def prefix_token_id(self) -> int:
            return self.pool.prefix

        @property
        def max_length(self) -> int:
            return self.pool.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None,
                       **kwargs) -> list[int]:
            return self.pool.encode(string, add_special_tokens, left_truncate_len)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)  # its progress bar: Ember logs its own

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self.pool.spread("score", [(list(ctx), list(cont)) for _, ctx, cont in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.pool.rolling([req.args[0] for req in requests])

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return self.pool.generate([req.args for req in requests])

    return EmberLM


# Harness tasks Ember builds from its built-in corpora (`builtin_task_dir`), usable by name in lm_eval.tasks.
BUILTIN_TASKS = {"python_qa_choice": "builtin:python-qa's held-out questions, each with its own answer (a docstring "
                                     "summary) among three others: acc and length-normalized acc_norm"}
_CHOICE_TASK = """task: python_qa_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def builtin_task_dir() -> Path:
    """A directory of the harness's task files for `BUILTIN_TASKS`, written once per node and Python build into the
    node cache (the data is local JSONL: no network)."""
    from ember.data.builtin import corpus_fingerprint, python_qa_choices

    target = storage.cache_dir() / "lm_eval" / f"python-qa-{corpus_fingerprint()[:16]}"
    if (target / "python_qa_choice.yaml").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    data = target / "python_qa_choice.jsonl"
    (staging / data.name).write_text("".join(json.dumps(d) + "\n" for d in python_qa_choices()))
    (staging / "python_qa_choice.yaml").write_text(_CHOICE_TASK.format(data=json.dumps(str(data))))
    try:
        os.replace(staging, target)
    except OSError:  # another process of the node wrote it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run_harness(model_dir: str, spec) -> dict:
    """The harness's results for one model dir (its `results`, `versions`, `n-shot` and `configs` sections)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    include = ([str(builtin_task_dir())] if set(spec.tasks) & set(BUILTIN_TASKS) else []) + \
        ([spec.include_path] if spec.include_path else [])
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in spec.tasks if not manager.match_tasks([t])]
    if unknown:
        raise EmberError(f"lm_eval.tasks: unknown task {', '.join(map(repr, unknown))} (not in the harness"
                         f"{' nor in ' + spec.include_path if spec.include_path else ''})")
    model = _harness_class()(model_dir=model_dir, actors=spec.actors, batch_size=spec.batch_size,
                             gpus_per_actor=spec.gpus_per_actor, chat_template_kwargs=spec.chat_template_kwargs)
    results = simple_evaluate(model=model, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                              task_manager=manager, log_samples=False, batch_size=spec.batch_size,
                              bootstrap_iters=0, apply_chat_template=spec.apply_chat_template,
                              fewshot_as_multiturn=spec.fewshot_as_multiturn,
                              system_instruction=spec.system_instruction)
    return {k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results}
