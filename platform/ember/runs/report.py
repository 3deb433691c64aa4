"""`ember report RUN_DIR`: plots and a short summary of a training run, read from its `metrics.jsonl`.

Writes RUN_DIR/report/loss.png (training and validation loss), learning_rate.png, tokens_per_second.png and
summary.txt, and returns the summary text. RUN_DIR may be a bucket prefix (`ember.storage`): the report is written
locally first and uploaded beside the run.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import yaml

from ember import storage
from ember.errors import EmberError
from ember.identity import read_stamp
from ember.runs.run_dir import RunDir

PLOTS = {
    # file: (title, [(metrics key, legend)], y label, log scale)
    "loss.png": ("Loss", [("loss", "train"), ("val_loss", "validation")], "loss", True),
    "learning_rate.png": ("Learning rate", [("lr", "learning rate")], "lr", False),
    "tokens_per_second.png": ("Throughput", [("tokens_per_s", "tokens/s, all workers")], "tokens/s", False),
    # a preference run's (drawn only where the rows have them)
    "rewards.png": ("Rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                                ("rewards/margins", "margin")], "reward", False),
    "reward_accuracy.png": ("Reward accuracy", [("rewards/accuracies", "chosen above rejected")], "share", False),
}


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of metrics.jsonl; a malformed line is named by its number."""
    location = RunDir(run_dir).metrics
    path = storage.display(location)
    try:
        text = storage.read_text(location)
    except FileNotFoundError:
        raise EmberError(f"{storage.display(run_dir)}: no metrics.jsonl (is it a training run dir, and did it reach "
                         "its first log step?)") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EmberError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise EmberError(f"{path}:{n}: a metrics row is an object with an integer 'step'")
        rows.append(row)
    if not rows:
        raise EmberError(f"{path}: empty")
    return rows


def _plot(rows: list[dict], title: str, series: list[tuple[str, str]], ylabel: str, out: Path, log_y: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in series:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def summarize(run_dir: str, rows: list[dict]) -> str:
    try:
        spec = yaml.safe_load(storage.read_text(RunDir(run_dir).spec)) or {}
    except FileNotFoundError:
        spec = {}
    last = rows[-1]
    kind = f" ({spec.get('kind')}{' ' + spec['name'] if spec.get('name') else ''})" if spec else ""
    lines = [f"run: {storage.display(run_dir)}{kind}"]
    total = (read_stamp(RunDir(run_dir).result) or {}).get("total_steps")
    lines.append(f"steps: {last['step']}" + (f" of {total}" if total else "")
                 + (f", {last['tokens']:,} tokens seen" if "tokens" in last else ""))
    lines.append(f"training loss: {rows[0]['loss']:.4f} at step {rows[0]['step']} -> {last['loss']:.4f} at step "
                 f"{last['step']}")
    vals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        ppl = f" (ppl {math.exp(min(vals[-1]['val_loss'], 50)):.1f})" if "val_ppl" in vals[-1] else ""
        lines.append(f"validation loss: {vals[-1]['val_loss']:.4f}{ppl} at step {vals[-1]['step']}; best "
                     f"{best['val_loss']:.4f} at step {best['step']}")
    if isinstance(last.get("rewards/accuracies"), (int, float)):
        lines.append(f"rewards: accuracy {rows[0]['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, "
                     f"margin {rows[0]['rewards/margins']:.4f} -> {last['rewards/margins']:.4f} (chosen "
                     f"{last['rewards/chosen']:.4f}, rejected {last['rewards/rejected']:.4f})")
    rates = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if rates:
        lines.append(f"tokens/s: median {sorted(rates)[len(rates) // 2]:,.0f}, last {rates[-1]:,.0f}"
                     + (f"; MFU {last['mfu']:.1%}" if isinstance(last.get("mfu"), (int, float)) else ""))
    lrs = [r["lr"] for r in rows if isinstance(r.get("lr"), (int, float))]
    if lrs:
        lines.append(f"learning rate: peak {max(lrs):.2e}, last {lrs[-1]:.2e}")
    if RunDir(run_dir).has_model():
        lines.append(f"model: {storage.display(RunDir(run_dir).model)}")
    return "\n".join(lines)


def evaluation_lines(path: str) -> list[str]:
    """An evaluate job's results (`kind: evaluate`'s output.file), a line per model and per harness task."""
    try:
        results = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmberError(f"{storage.display(path)}: not an evaluation's results ({exc})") from None
    if not isinstance(results, dict):
        raise EmberError(f"{storage.display(path)}: not an evaluation's results (not a JSON object)")
    lines = [f"evaluation {storage.display(path)}:"]
    for name, figures in results.items():
        if not isinstance(figures, dict):
            continue
        parts = []
        for section in ("dataset", "conversations"):
            f = figures.get(section) or {}
            key = "assistant_loss" if "assistant_loss" in f else "loss"
            if isinstance(f.get(key), (int, float)):
                parts.append(f"{section} {key.replace('_', ' ')} {f[key]:.4f}")
            if isinstance(f.get("token_f1"), (int, float)):
                parts.append(f"token F1 {f['token_f1']:.3f}")
        pairs = figures.get("pairs") or {}
        if isinstance(pairs.get("preference_accuracy"), (int, float)):
            parts.append(f"preference accuracy {pairs['preference_accuracy']:.3f}, margin {pairs['mean_margin']:.3f}")
        lines.append(f"  {name:<10} {'; '.join(parts) or '-'}")
        for task, metrics in ((figures.get("lm_eval") or {}).get("results") or {}).items():
            shown = [f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))
                     and not k.startswith(("alias", "sample_len")) and "stderr" not in k]
            lines.append(f"  {'':<10} {task}: {', '.join(shown)}")
    return lines


def write_report(run_dir: str | Path, evaluations: list[str] = ()) -> str:
    """Writes the plots and summary.txt under RUN_DIR/report; returns the summary. The evaluations shown next to the
    curves: the files named, and any results under RUN_DIR/eval/."""
    run_dir = storage.normalize(run_dir)
    if not storage.is_dir(run_dir):
        raise EmberError(f"{storage.display(run_dir)}: no such run directory")
    rows = read_metrics(run_dir)
    out = RunDir(run_dir).report
    with tempfile.TemporaryDirectory(prefix="ember-report-") as staging:
        local = Path(out) if not storage.is_uri(out) else Path(staging)
        local.mkdir(exist_ok=True)
        drawn = [name for name, (_, series, _, _) in PLOTS.items()
                 if any(isinstance(r.get(key), (int, float)) for r in rows for key, _ in series)]
        for name in drawn:
            title, series, ylabel, log_y = PLOTS[name]
            _plot(rows, title, series, ylabel, local / name, log_y)
        text = summarize(run_dir, rows)
        text += f"\nplots: {', '.join(storage.display(storage.join(out, n)) for n in drawn)}"
        eval_dir = RunDir(run_dir).eval
        found = sorted(storage.join(eval_dir, rel) for rel, _ in storage.list_files(eval_dir)
                       if rel.endswith(".json")) if storage.is_dir(eval_dir) else []
        for path in [*map(storage.normalize, evaluations), *found]:
            if not storage.is_file(path):
                raise EmberError(f"--eval {storage.display(path)}: no such results file")
            text += "\n" + "\n".join(evaluation_lines(path))
        (local / "summary.txt").write_text(text + "\n")
        if storage.is_uri(out):
            storage.upload_dir(local, out)
    return text
