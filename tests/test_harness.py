"""lm-evaluation-harness tasks scored by Ember's model class on Ray actors, against the harness's own `hf` class on
the same model dir: local YAML tasks over JSONL files this test writes (multiple choice, generate-until, rolling
loglikelihood), no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_model_dir
from ember.config import parse_spec
from ember.errors import EmberError

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

WORDS = "the fox is red and the crow is black while the whale lives in the sea near the quiet shore".split()
TASKS = {
    "ember_mc": """task: ember_mc
dataset_path: json
dataset_kwargs: {data_files: {test: %(dir)s/mc.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}]
""",
    "ember_gen": """task: ember_gen
dataset_path: json
dataset_kwargs: {data_files: {test: %(dir)s/gen.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: [" sea"], max_gen_toks: 12, do_sample: false}
metric_list: [{metric: exact_match}]
""",
    "ember_ppl": """task: ember_ppl
dataset_path: json
dataset_kwargs: {data_files: {test: %(dir)s/ppl.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{text}}"
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: bits_per_byte}]
""",
}
# Multiple choice whose answer the assistant's turn starts with a prefix: with the chat template, the context ends
# inside that turn (transformers' continue_final_message).
PREFIXED = """task: ember_mc_prefixed
include: ember_mc.yaml
gen_prefix: "Answer:"
"""


@pytest.fixture(scope="module")
def model_and_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model = tiny_model_dir(root, [" ".join(WORDS)] * 50, 300, 64, hidden_size=64, intermediate_size=128)
    tasks = root / "tasks"
    tasks.mkdir()
    mc = [{"question": f"The {a} is", "choices": [" red", " black", " in the sea"], "answer": i % 3}
          for i, a in enumerate(["fox", "crow", "whale", "shore", "sea", "fox and the crow"])]
    gen = [{"prompt": f"the {a} is", "answer": " red"} for a in ("fox", "crow", "whale")]
    ppl = [{"text": " ".join(WORDS[i:] + WORDS[:i]) * 3} for i in (0, 5)]  # longer than the 64-token context
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text % {"dir": tasks})
    (tasks / "ember_mc_prefixed.yaml").write_text(PREFIXED)
    return model, tasks


def evaluate(model, tasks: Path, names=tuple(TASKS), options: dict | None = None, **model_args) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args or None, tasks=list(names),
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True, bootstrap_iters=0,
                           **(options or {}))


def per_sample(results: dict) -> dict:
    """task -> the model's raw answers, in document and request order."""
    return {task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def flat(value) -> list:
    """The numbers and flags of a sample's nested responses, in order."""
    return [x for item in value for x in flat(item)] if isinstance(value, (list, tuple)) else [value]


def test_ember_s_harness_class_gives_the_hf_class_s_numbers_over_one_or_two_actors(model_and_tasks):
    from ember.eval.harness import _harness_class

    model_dir, tasks = model_and_tasks
    theirs = evaluate("hf", tasks, pretrained=str(model_dir), dtype="float32", batch_size=1, device="cpu")
    EmberLM = _harness_class()
    ours = evaluate(EmberLM(model_dir=str(model_dir), actors=1, batch_size=4), tasks)
    two = evaluate(EmberLM(model_dir=str(model_dir), actors=2, batch_size=3), tasks)
    expected = per_sample(theirs)
    for got in (per_sample(ours), per_sample(two)):
        for task in ("ember_mc", "ember_ppl"):
            for a, b in zip(got[task], expected[task], strict=True):
                flat_a, flat_b = flat(a), flat(b)
                assert len(flat_a) == len(flat_b) > 0
                for x, y in zip(flat_a, flat_b):
                    if isinstance(y, bool):
                        assert x == y, task
                    else:
                        assert abs(float(x) - float(y)) < 1e-4, (task, x, y)
        assert got["ember_gen"] == expected["ember_gen"]  # the generated texts, exactly
    for results in (ours, two):
        assert results["results"]["ember_mc"]["acc,none"] == theirs["results"]["ember_mc"]["acc,none"]
        assert results["results"]["ember_gen"]["exact_match,none"] == \
            theirs["results"]["ember_gen"]["exact_match,none"]
        assert results["results"]["ember_ppl"]["word_perplexity,none"] == pytest.approx(
            theirs["results"]["ember_ppl"]["word_perplexity,none"], rel=1e-4)


def test_with_the_chat_template_the_requests_and_numbers_are_the_hf_class_s(model_and_tasks, tmp_path):
    """Qwen2.5's template on the same model: a system instruction, one few-shot example as an earlier turn, and a
    task whose answers follow an assistant prefix. The harness's requests (the templated texts) are the same for
    both classes, and so are the numbers."""
    import shutil

    from conftest import REPO
    from ember.eval.harness import _harness_class

    model_dir, tasks = model_and_tasks
    plain, chat = tmp_path / "plain-model", tmp_path / "chat-model"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]  # Ember's ChatML default, which the model was saved with
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(plain, chat)
    (chat / "chat_template.jinja").write_text((REPO / "tests" / "templates" / "qwen2.5.jinja").read_text())
    options = {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": "Answer briefly.",
               "num_fewshot": 1}
    names = ("ember_mc_prefixed", "ember_gen")
    theirs = evaluate("hf", tasks, names, options, pretrained=str(chat), dtype="float32", batch_size=1,
                      device="cpu")
    ours = evaluate(_harness_class()(model_dir=str(chat), actors=1, batch_size=4), tasks, names, options)
    for task in names:
        requests = [s["arguments"] for s in sorted(ours["samples"][task], key=lambda s: s["doc_id"])]
        expected = [s["arguments"] for s in sorted(theirs["samples"][task], key=lambda s: s["doc_id"])]
        assert requests == expected, task
    context = requests[0]["gen_args_0"]["arg_0"] if isinstance(requests[0], dict) else requests[0][0][0]
    assert context.startswith("<|im_start|>system\nAnswer briefly.")
    mc = [s["arguments"] for s in ours["samples"]["ember_mc_prefixed"]]
    assert all("<|im_start|>assistant\nAnswer:" in flat(a)[0] and not flat(a)[0].endswith("<|im_end|>\n")
               for a in mc)  # the prefixed turn is continued, not closed
    for a, b in zip(flat(per_sample(ours)["ember_mc_prefixed"]), flat(per_sample(theirs)["ember_mc_prefixed"]),
                    strict=True):
        assert a == b if isinstance(b, bool) else abs(float(a) - float(b)) < 1e-4
    assert per_sample(ours)["ember_gen"] == per_sample(theirs)["ember_gen"]
    with pytest.raises(EmberError, match=r"lm_eval\.apply_chat_template: the model .* has no chat template"):
        evaluate(_harness_class()(model_dir=str(plain)), tasks, ("ember_gen",), {"apply_chat_template": True})


def test_kind_evaluate_scores_every_model_on_the_tasks_and_refuses_unknown_ones(model_and_tasks, tmp_path, capsys):
    from ember.eval.evaluate import run_evaluate

    model_dir, tasks = model_and_tasks
    spec = {"kind": "evaluate", "models": {"tiny": str(model_dir)},
            "lm_eval": {"tasks": ["ember_mc", "ember_gen"], "include_path": str(tasks), "allow_code": True,
                        "actors": 2},
            "output": {"file": str(tmp_path / "results.json")}}
    results = run_evaluate(parse_spec(spec))
    harness = results["tiny"]["lm_eval"]
    assert set(harness["results"]) == {"ember_mc", "ember_gen"} and "acc,none" in harness["results"]["ember_mc"]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    with pytest.raises(EmberError, match=r"lm_eval asks for 1 GPU in all \(1 × \{CPU 1, GPU 1\}\) but the Ray "
                                         r"cluster has 0 and no autoscaler"):
        run_evaluate(parse_spec({**spec, "lm_eval": {**spec["lm_eval"], "actors": 1, "gpus_per_actor": 1},
                                 "output": {"file": str(tmp_path / "gpu.json")}}))
    with pytest.raises(EmberError, match=r"lm_eval\.fewshot_as_multiturn needs lm_eval\.apply_chat_template"):
        parse_spec({**spec, "lm_eval": {**spec["lm_eval"], "fewshot_as_multiturn": True}})
    with pytest.raises(EmberError, match=r"lm_eval\.tasks: unknown task 'no_such_task'"):
        run_evaluate(parse_spec({**spec, "lm_eval": {**spec["lm_eval"], "tasks": ["no_such_task"]},
                                 "output": {"file": str(tmp_path / "other.json")}}))


@pytest.mark.gpu
def test_on_a_gpu_the_actors_score_as_on_cpu(model_and_tasks):
    from ember.eval.harness import _harness_class

    model_dir, tasks = model_and_tasks
    EmberLM = _harness_class()
    cpu = per_sample(evaluate(EmberLM(model_dir=str(model_dir), actors=1), tasks))
    gpu = per_sample(evaluate(EmberLM(model_dir=str(model_dir), actors=1, gpus_per_actor=1), tasks))
    for task in ("ember_mc", "ember_ppl"):
        for a, b in zip(flat(gpu[task]), flat(cpu[task]), strict=True):
            assert a == b if isinstance(b, bool) else abs(float(a) - float(b)) < 1e-3, task


def test_the_built_in_python_qa_choice_task_runs_offline_on_the_real_model(tmp_path):
    """`tasks: [python_qa_choice]` needs no include_path: Ember writes the task (builtin:python-qa's held-out
    questions, each answer among three others) into the node cache. SmolLM2 picks the right docstring summary far
    more often than chance (0.25), and the harness's figures are in the results."""
    from ember.data.builtin import python_qa_choices
    from ember.eval.evaluate import run_evaluate
    from ember.eval.harness import builtin_task_dir

    docs = python_qa_choices()
    assert [d["question"] for d in docs] == [d["question"] for d in python_qa_choices()]  # deterministic
    assert all(len(set(d["choices"])) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert len({d["label"] for d in docs[:40]}) == 4  # the right answer is not always in one place
    lines = (builtin_task_dir() / "python_qa_choice.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == docs
    spec = {"kind": "evaluate", "models": {"smollm2": "builtin:smollm2-135m-instruct"},
            "lm_eval": {"tasks": ["python_qa_choice"], "limit": 24, "batch_size": 16},
            "output": {"file": str(tmp_path / "results.json")}}
    figures = run_evaluate(parse_spec(spec))["smollm2"]["lm_eval"]["results"]["python_qa_choice"]
    assert figures["acc_norm,none"] > 0.5 and figures["acc,none"] > 0.4, figures
