"""`ember demo` end to end as a user runs it (its own Ray instance, a real server, the OpenAI API), with the shipped
demo specs shrunk by --set so each run takes a minute or two: the demo (its fine-tune on the real SmolLM2 model), a
longer pretraining kept serving, and a rerun that reuses the finished stages and stops at a failing one, keeping the
rest."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import EMBER, OPS_AT_START, free_port, greedy, rebuilt_deepspeed_ops

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]  # `ember demo` starts its own Ray instance

SMALL = [
    "tokenize.tokenizer.vocab_size=512", "tokenize.pack.seq_len=128",
    "pretrain.model.num_hidden_layers=1", "pretrain.model.hidden_size=64", "pretrain.model.intermediate_size=176",
    "pretrain.train.max_steps=6", "pretrain.train.log_every=3", "pretrain.train.eval_every=6",
    "pretrain.train.checkpoint_every=6", "pretrain.train.global_batch_size=8",
    "finetune.train.max_steps=4", "finetune.train.log_every=2", "finetune.train.eval_every=4",
    "finetune.train.checkpoint_every=4", "finetune.train.global_batch_size=8", "finetune.data.seq_len=128",
    "evaluate.generation.max_examples=3", "evaluate.generation.max_new_tokens=8",
    "evaluate.data.max_conversations=8", "evaluate.lm_eval.limit=4",
]


def demo_args(*extra, port=None) -> list[str]:
    args = [EMBER, "demo", "--port", str(port or free_port())]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args


def demo(cwd, *extra, timeout=600):
    return subprocess.run(demo_args(*extra), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": ""})


def greedy_chat(model_dir, question: str, max_tokens: int = 48) -> str:
    """What `ember generate --chat --temperature 0` answers."""
    from ember.data.chat import ChatTemplate
    from ember.data.tokenizer import load_tokenizer, tokenizer_config
    from ember.model import SamplingParams, TextStream, generation_stops, load_model

    tok, config = load_tokenizer(model_dir), tokenizer_config(model_dir)
    prompt = ChatTemplate.of(config).render(
        [{"role": "user", "content": question}], add_generation_prompt=True)
    stream = TextStream(load_model(model_dir), tok, prompt, SamplingParams(max_new_tokens=max_tokens, temperature=0),
                        generation_stops(tok, chat=True, model_dir=model_dir))
    return "".join(stream).strip()


def test_the_demo_runs_every_stage_then_trains_on_keeps_serving_reuses_and_stops_at_a_failing_stage(tmp_path):
    """Three runs in one directory, as a user would make them: the demo; then README's longer pretraining
    (`--set pretrain.train.max_steps=600 --set finetune.output.dir=runs/finetune-600`, here 6 → 9 steps) with
    `--keep-serving`, which trains on from the last step, fine-tunes, evaluates and serves the new model until Ctrl-C;
    then the same again with a stage that fails: the finished stages are reused and said to be, the failing one stops
    the demo with its own error, and what the earlier stages made stays."""
    first = demo(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for n, stage in enumerate(("tokenize", "pretrain", "finetune", "evaluate", "report", "serve"), 1):
        assert f"=== [{n}/6] {stage} " in out and f"--- {stage} done in" in out
    answer = next(line[3:] for line in out.splitlines() if line.startswith("A: "))  # the fine-tuned SmolLM2's
    assert "json" in answer.lower() or "JSON" in answer, answer  # on topic after 4 steps: the real weights answer
    assert "app shut down" in out
    # Ember's lines, without other libraries' set-up and progress lines (ember.runtime.quiet_libraries).
    chatter = ("FutureWarning", "real_accelerator.py", "Requesting resources", "Started training worker group",
               "Setting up process group", "Execution plan of Dataset", "Progress will be logged", "Running Dataset",
               "Token authentication is enabled")
    shown = [line for line in (out + first.stderr).splitlines() if any(text in line for text in chatter)]
    assert not shown, shown
    summary = out[out.index("=== summary"):]
    for words in ("dataset:", "fine-tuned model:", "evaluation:", "tokens:", "pretrain: loss", "finetune: loss",
                  "evaluate base:", "evaluate finetuned:", "python_qa_choice acc ", "serving: first token after"):
        assert words in summary, words
    runs = tmp_path / "runs"
    assert (runs / "pretrain-demo" / "report" / "loss.png").is_file()
    assert (runs / "finetune-demo" / "model" / "model.safetensors").is_file()
    assert "builtin:smollm2-135m-instruct" in (runs / "finetune-demo" / "spec.yaml").read_text()
    results = json.loads((runs / "evaluate-demo" / "results.json").read_text())
    assert set(results) == {"base", "finetuned"}
    for figures in results.values():
        assert set(figures["lm_eval"]["results"]) == {"python_qa_choice"}
    # Even 4 LoRA steps move the real model toward the held-out answers.
    assert results["finetuned"]["conversations"]["assistant_loss"] < results["base"]["conversations"]["assistant_loss"]

    longer = ("pretrain.train.max_steps=9",)
    kept_serving(tmp_path, longer)

    broken = demo(tmp_path, *longer, "evaluate.models.base=runs/not-there/model")
    assert broken.returncode == 1
    assert "already holds this dataset" in broken.stdout
    assert broken.stdout.count("already holds this run, finished at step") == 2
    assert "demo stopped at stage 4/6 (evaluate): models.base: model directory not found" in broken.stderr
    assert "kept from the earlier stages (tokenize, pretrain, finetune)" in broken.stderr
    # No training run of the demo's or the cluster's (which ran before it) rebuilt the ops that
    # `make install` prebuilt.
    assert not (OPS_AT_START and rebuilt_deepspeed_ops())


def kept_serving(tmp_path, longer: tuple[str, ...]) -> None:
    """The longer run with --keep-serving: pretraining restores its step-6 checkpoint and trains to 9; the fine-tune
    (of SmolLM2, not of the pretrained model) and its evaluation are reused, and the kept server serves the fine-tuned
    model; Ctrl-C deletes the app."""
    import signal
    import time

    import requests

    from ember.demo import QUESTION, ask

    runs, port = tmp_path / "runs", free_port()
    # Ctrl-C reaches a process whose SIGINT is not ignored: a test run started in the background ignores it, and
    # its children would inherit that.
    kept = subprocess.Popen(demo_args(*longer, port=port) + ["--keep-serving"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, line, deadline = [], "", time.time() + 600
    try:
        while time.time() < deadline:
            line = kept.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("kept serving at "):
                break
        out = "".join(lines)
        assert "kept serving at " in out, out[-3000:]
        base = line.split()[3].removesuffix("/v1")
        assert base == f"http://127.0.0.1:{port}"
        assert "already holds this dataset" in out and "already holds these results" in out
        assert out.count("already holds this run, finished at step") == 1  # the fine-tune; pretraining trains on
        restores = [json.loads(x) for x in (runs / "pretrain-demo" / "restores.jsonl").read_text().splitlines()]
        assert [(r["step"], r["source"]) for r in restores] == [(6, "latest")]
        steps = [json.loads(x)["step"] for x in (runs / "pretrain-demo" / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 9 and steps == sorted(set(steps))
        answer, _ = ask(base, "ember-demo", QUESTION)
        assert answer == greedy_chat(runs / "finetune-demo" / "model", QUESTION)
        served = requests.post(f"{base}/v1/completions", timeout=60, json={
            "model": "ember-demo", "prompt": "The json module", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}).json()["choices"][0]["text"]
        assert served == greedy(runs / "finetune-demo" / "model", "The json module", 8, stop_ids=())
        assert kept.poll() is None  # still serving
    finally:
        kept.send_signal(signal.SIGINT)  # Ctrl-C: the app is deleted and the demo exits
        try:
            code = kept.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kept.kill()
            code = "still running 120 s after Ctrl-C"
        rest = kept.stdout.read()
    assert code == 0, rest[-3000:]
    try:
        gone = requests.get(f"{base}/v1/models", timeout=5).status_code
    except requests.RequestException:
        gone = "refused"
    assert gone != 200
