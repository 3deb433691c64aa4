"""lm-evaluation-harness on CPU, in one run, same model, same task, same results:

(a) the harness's own `hf` model class in one process (the baseline);
(b) Ember's harness class (`ember.eval.harness`) with the requests spread over 2 Ray actors.

The task is a local multiple-choice task (the harness's YAML over a JSONL file this script writes; no network):
DOCS documents of 4 choices each, loglikelihood requests. Prints requests/s of each and the ratio b/a, after
checking that both give the same accuracy and per-request loglikelihoods within 1e-4.

    python benchmarks/eval_bench.py [--docs 200] [--actors 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# The shape of benchmarks/model_bench.py (27.8M parameters).
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)
WORDS = ("the fox is red and the crow is black while the whale lives in the sea near the quiet shore of an old "
         "town where horses run and eagles fly over green fields").split()
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs: {data_files: {test: %(file)s}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list: [{metric: acc}]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import random

    import ray
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ember.data.tokenizer import save_tokenizer, train_tokenizer
    from ember.eval.harness import _harness_class
    from ember.model import Transformer, preset, save_model
    from ember.runtime import ensure_ray

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_tokenizer(train_tokenizer([" ".join(WORDS)] * 200, 512), root / "tok", model_max_length=1024)
        torch.manual_seed(0)
        model = Transformer(preset("tiny", vocab_size=512, **SHAPE))
        save_model(model, root / "model", tokenizer_dir=root / "tok", eos_token_id=0)
        docs = [{"question": " ".join(rng.choices(WORDS, k=48)),
                 "choices": [" " + " ".join(rng.choices(WORDS, k=6)) for _ in range(4)], "answer": rng.randrange(4)}
                for _ in range(args.docs)]
        (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / "tasks").mkdir()
        (root / "tasks" / "bench_mc.yaml").write_text(TASK % {"file": root / "docs.jsonl"})
        requests = 4 * args.docs
        print(f"model: 27.8M parameters (model_bench's shape), fp32; task: {args.docs} documents x 4 choices = "
              f"{requests} loglikelihood requests of about 60 tokens")

        def run(model, **model_args):
            manager = TaskManager(include_path=str(root / "tasks"))
            start = time.perf_counter()
            out = simple_evaluate(model=model, model_args=model_args or None, tasks=["bench_mc"],
                                  task_manager=manager, log_samples=True, bootstrap_iters=0,
                                  batch_size=args.batch_size)
            return out, time.perf_counter() - start

        hf, hf_s = run("hf", pretrained=str(root / "model"), dtype="float32", device="cpu")
        ensure_ray(None)
        ember = _harness_class()(model_dir=str(root / "model"), actors=args.actors, batch_size=args.batch_size)
        ours, ours_s = run(ember)
        ray.shutdown()

    def lls(results):
        return [resp[0][0] for s in sorted(results["samples"]["bench_mc"], key=lambda s: s["doc_id"])
                for resp in s["resps"]]

    diff = max(abs(a - b) for a, b in zip(lls(ours), lls(hf), strict=True))
    acc_hf, acc_ours = hf["results"]["bench_mc"]["acc,none"], ours["results"]["bench_mc"]["acc,none"]
    assert acc_hf == acc_ours and diff < 1e-4, (acc_hf, acc_ours, diff)
    print(f"(a) harness hf class, 1 process:      {requests / hf_s:,.1f} requests/s ({hf_s:.1f} s)")
    print(f"(b) Ember's class, {args.actors} Ray actors:       {requests / ours_s:,.1f} requests/s ({ours_s:.1f} s, "
          f"Ray actor start-up included)")
    print(f"ratio b/a {hf_s / ours_s:.2f}x; same accuracy {acc_ours:.4f}, loglikelihoods within {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
