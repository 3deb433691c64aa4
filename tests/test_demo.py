"""`ember demo` end to end as a user runs it (its own Ray instance, a real server, the OpenAI API), with the shipped
demo specs shrunk by --set so it takes a minute and a half; then a rerun that reuses the finished stages and stops
at a failing one, keeping the rest."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import EMBER, free_port

pytestmark = pytest.mark.slow

SMALL = [
    "tokenize.tokenizer.vocab_size=512", "tokenize.pack.seq_len=128",
    "pretrain.model.num_hidden_layers=1", "pretrain.model.hidden_size=64", "pretrain.model.intermediate_size=176",
    "pretrain.train.max_steps=6", "pretrain.train.log_every=3", "pretrain.train.eval_every=6",
    "pretrain.train.checkpoint_every=6", "pretrain.train.global_batch_size=8",
    "finetune.train.max_steps=4", "finetune.train.log_every=2", "finetune.train.eval_every=4",
    "finetune.train.checkpoint_every=4", "finetune.train.global_batch_size=8", "finetune.data.seq_len=128",
    "evaluate.generation.max_examples=3", "evaluate.generation.max_new_tokens=8",
]


def demo(cwd, *extra, timeout=600):
    args = [EMBER, "demo", "--port", str(free_port())]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})


def test_the_demo_runs_every_stage_then_reuses_them_and_stops_at_a_failing_one(tmp_path):
    first = demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for n, stage in enumerate(("tokenize", "pretrain", "finetune", "evaluate", "report", "serve"), 1):
        assert f"=== [{n}/6] {stage} " in out and f"--- {stage} done in" in out
    answer = next(line[3:] for line in out.splitlines() if line.startswith("A: "))  # this tiny model's answer
    assert answer.strip()
    assert "app shut down" in out
    summary = out[out.index("=== summary"):]
    for words in ("dataset:", "fine-tuned model:", "evaluation:", "tokens:", "pretrain: loss", "finetune: loss",
                  "evaluate base:", "evaluate finetuned:", "serving: first token after"):
        assert words in summary, words
    runs = tmp_path / "runs"
    assert (runs / "pretrain-demo" / "report" / "loss.png").is_file()
    assert (runs / "finetune-demo" / "model" / "model.safetensors").is_file()
    results = json.loads((runs / "evaluate-demo" / "results.json").read_text())
    assert set(results) == {"base", "finetuned"}

    # Again, with a stage that fails: the finished stages are reused and said to be, the failing one stops the demo
    # with its own error, and what the earlier stages made stays. (Evaluation results are reused like runs: see
    # test_pretrain.py::test_evaluate_gives_the_perplexity_of_a_model_on_a_dataset.)
    broken = demo(tmp_path, "evaluate.models.base=runs/not-there/model")
    assert broken.returncode == 1
    assert "already holds this dataset" in broken.stdout
    assert broken.stdout.count("already holds this run, finished at step") == 2
    assert "demo stopped at stage 4/6 (evaluate): models.base: model directory not found" in broken.stderr
    assert "kept from the earlier stages (tokenize, pretrain, finetune)" in broken.stderr
    assert (runs / "finetune-demo" / "model" / "model.safetensors").is_file()
    assert json.loads((runs / "evaluate-demo" / "results.json").read_text()) == results
