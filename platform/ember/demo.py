"""`ember demo`: the whole pipeline on the built-in corpus, one stage after another, in one Ray instance.

tokenize → pretrain a small model from scratch (2 workers, ZeRO 2) → fine-tune a real pretrained model
(SmolLM2-135M-Instruct, LoRA) on builtin:python-qa → evaluate it against its base → report → serve the fine-tuned
model with autoscaling → ask it a question through the OpenAI API → shut the app down (or keep it).

Pretraining shows what the platform is for (a corpus to a model of its own); the later stages start from real weights,
so the answer at the end is a real one.

Each stage is the job spec in jobs/ (the same files `ember run` takes), so the demo is what a user would run by hand.
A rerun reuses what is finished: the dataset, finished runs and evaluation results are recognised by their inputs
and spec. A failing stage stops the demo with that stage's error; what earlier stages made stays where it is.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ember.errors import EmberError
from ember.runs.run_dir import RunDir

log = logging.getLogger("ember")

QUESTION = "What does the function `json.dumps` do?"
STAGES = ("tokenize", "pretrain", "finetune", "evaluate", "report", "serve")


def repo_file(relative: str) -> Path:
    """A shipped file (jobs/…, serve/…): next to the current directory, else next to this checkout's package."""
    here = Path(relative)
    if here.is_file():
        return here.resolve()
    shipped = Path(__file__).resolve().parents[2] / relative
    if shipped.is_file():
        return shipped
    raise EmberError(f"{relative} not found here or in the Ember checkout; run `ember demo` from the repository root")


@dataclass
class Demo:
    overrides: dict[str, list[str]] = field(default_factory=dict)  # stage -> spec overrides
    address: str | None = None
    port: int | None = None
    keep_serving: bool = False
    out: object = None  # a text stream; print() when None
    figures: dict = field(default_factory=dict)
    artefacts: dict = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def spec(self, stage: str, follow: dict | None = None):
        """The stage's shipped spec with --set overrides; `follow` points it at what earlier stages made, unless the
        user set those keys."""
        from ember.config import load_spec

        given = self.overrides.get(stage, [])
        keys = {item.split("=", 1)[0] for item in given}
        derived = [f"{k}={v}" for k, v in (follow or {}).items() if k not in keys]
        return load_spec(repo_file(f"jobs/{stage}-demo.yaml"), derived + given)

    def run(self) -> dict:
        from ember.runtime import ensure_ray

        ensure_ray(self.address)
        t_all = time.perf_counter()
        done = []
        for n, stage in enumerate(STAGES, 1):
            self.say(f"\n=== [{n}/{len(STAGES)}] {stage} " + "=" * max(0, 60 - len(stage)))
            t0 = time.perf_counter()
            try:
                getattr(self, f"stage_{stage}")()
            except Exception as exc:
                from ember.runtime import find_ember_error

                found = find_ember_error(exc)
                if found is None:
                    raise
                kept = "; ".join(f"{k}: {v}" for k, v in self.artefacts.items()) or "nothing yet"
                raise EmberError(f"demo stopped at stage {n}/{len(STAGES)} ({stage}): {found}\n  kept from the "
                                 f"earlier stages ({', '.join(done) or 'none'}): {kept}") from None
            done.append(stage)
            self.say(f"--- {stage} done in {time.perf_counter() - t0:.1f}s")
        self.figures["total_seconds"] = round(time.perf_counter() - t_all, 1)
        self.say(self.summary())
        return self.figures

    # --- the stages ------------------------------------------------------------------------------------------------

    def stage_tokenize(self) -> None:
        from ember.data.pipeline import run_tokenize

        spec = self.spec("tokenize")
        manifest = run_tokenize(spec, self.address)
        self.artefacts["dataset"] = str(Path(spec.output.dir).resolve())
        self.figures["tokens"] = {s: manifest["splits"][s]["tokens"] for s in ("train", "val")}
        self.data_dir = Path(spec.output.dir).resolve()

    def stage_pretrain(self) -> None:
        from ember.train.pretrain import run_pretrain

        spec = self.spec("pretrain", {"data.dir": self.data_dir})
        metrics = run_pretrain(spec, self.address)
        self.pretrain_dir = Path(spec.output.dir).resolve()
        self.artefacts["pretrained model"] = RunDir(str(self.pretrain_dir)).model
        self.figures["pretrain"] = _losses(metrics)

    def stage_finetune(self) -> None:
        from ember.train.finetune import run_finetune

        spec = self.spec("finetune")
        metrics = run_finetune(spec, self.address)
        self.finetune_dir = Path(spec.output.dir).resolve()
        self.artefacts["fine-tuned model"] = RunDir(str(self.finetune_dir)).model
        self.figures["finetune"] = _losses(metrics)

    def stage_evaluate(self) -> None:
        from ember.eval.evaluate import run_evaluate

        spec = self.spec("evaluate", {"models.finetuned": RunDir(str(self.finetune_dir)).model})
        results = run_evaluate(spec, self.address)
        self.artefacts["evaluation"] = str(Path(spec.output.file).resolve())
        scores = {}
        for name, figures in results.items():
            c = figures.get("conversations", {})
            scores[name] = {k: round(c[k], 4) for k in ("assistant_loss", "token_f1", "exact_match") if k in c}
            scores[name]["harness"] = {
                task: {k.split(",")[0]: round(v, 4) for k, v in metrics.items()
                       if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, float)}
                for task, metrics in figures.get("lm_eval", {}).get("results", {}).items()}
        self.figures["evaluate"] = scores

    def stage_report(self) -> None:
        from ember.runs.report import write_report

        for name, run_dir in (("pretrain", self.pretrain_dir), ("finetune", self.finetune_dir)):
            self.say(write_report(run_dir))
            self.artefacts[f"{name} report"] = RunDir(str(run_dir)).report

    def stage_serve(self) -> None:
        from ray import serve

        from ember.serve.launch import serve_forever, serve_target

        config = repo_file("serve/demo.yaml")
        apps = yaml.safe_load(config.read_text())["applications"]
        # serve/demo.yaml as shipped, serving the model the fine-tune stage made (wherever --set put it).
        base, names = serve_target(str(config), address=self.address, port=self.port,
                                   args={"model_dir": RunDir(str(self.finetune_dir)).model}, quiet=True)
        self.artefacts["server"] = f"{base}/v1"
        answer, latency = ask(base, apps[0]["args"].get("model_name", "ember"), QUESTION)
        self.say(f"Q: {QUESTION}\nA: {answer or '(nothing: the model ended its turn at once)'}")
        self.figures["serving"] = latency
        self.figures["answer"] = answer
        if self.keep_serving:
            self.say(f"\nkept serving at {base}/v1 (Ctrl-C stops it). Try:\n"
                     f"  curl {base}/v1/chat/completions -H 'content-type: application/json' -d '"
                     + json.dumps({"model": apps[0]["args"].get("model_name", "ember"), "max_tokens": 48,
                                   "messages": [{"role": "user", "content": "What does `os.path.join` do?"}]})
                     + "'")
            self.say(self.summary())
            serve_forever(names)
        else:
            for name in names:
                serve.delete(name)
            self.say("app shut down (--keep-serving keeps it)")

    # --- the summary -----------------------------------------------------------------------------------------------

    def summary(self) -> str:
        f = self.figures
        lines = ["", "=== summary " + "=" * 60]
        for name, where in self.artefacts.items():
            lines.append(f"  {name + ':':20s} {where}")
        if "tokens" in f:
            lines.append(f"  tokens: {f['tokens']['train']:,} train, {f['tokens']['val']:,} validation")
        for stage in ("pretrain", "finetune"):
            if stage in f:
                val = f", val loss {f[stage]['val_loss']:.3f}" if f[stage].get("val_loss") is not None else ""
                lines.append(f"  {stage}: loss {f[stage]['loss']:.3f} after {f[stage]['step']} steps{val}")
        for name, s in f.get("evaluate", {}).items():
            parts = [f"{k.replace('_', ' ')} {v:.3f}" for k, v in s.items() if k != "harness"]
            tasks = [f"{task} " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
                     for task, m in s.get("harness", {}).items()]
            lines.append(f"  evaluate {name}: {'; '.join([', '.join(parts), *tasks])}")
        if "serving" in f:
            s = f["serving"]
            lines.append(f"  serving: first token after {s['ttft_s'] * 1000:.0f} ms, {s['tokens']} tokens in "
                         f"{s['total_s']:.2f}s ({s['tokens_per_s']:.1f} tokens/s)")
        if "total_seconds" in f:
            lines.append(f"  took {f['total_seconds']:.0f}s")
        return "\n".join(lines)


def _losses(metrics: dict) -> dict:
    return {"step": metrics.get("step"), "loss": metrics.get("loss"), "val_loss": metrics.get("val_loss")}


def ask(base: str, model: str, question: str, max_tokens: int = 48) -> tuple[str, dict]:
    """Asks the served model through the OpenAI chat API (streamed); returns the answer and its latency."""
    import requests

    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    parts, tokens = [], 0
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        if r.status_code != 200:
            raise EmberError(f"the served model answered {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    total = time.perf_counter() - t0
    return "".join(parts).strip(), {"ttft_s": round((first or time.perf_counter()) - t0, 3),
                                    "total_s": round(total, 3), "tokens": tokens,
                                    "tokens_per_s": round(tokens / max(total, 1e-9), 1)}


def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """`--set pretrain.train.max_steps=50` → {"pretrain": ["train.max_steps=50"]}."""
    by_stage: dict[str, list[str]] = {}
    for item in items:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in ("tokenize", "pretrain", "finetune", "evaluate"):
            raise EmberError(f"--set {item}: start with the stage whose spec it changes: tokenize., pretrain., "
                             "finetune. or evaluate. (e.g. --set pretrain.train.max_steps=50)")
        by_stage.setdefault(stage, []).append(rest)
    return by_stage
