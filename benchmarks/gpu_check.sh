#!/usr/bin/env bash
# The one script a session with a GPU runs first (under 10 minutes on one H200). In order:
#   1. the CUDA, torch, DeepSpeed and Ray versions and the GPUs torch sees;
#   2. the DeepSpeed ops prebuilt for CUDA with a toolkit of torch's CUDA version (ember.train.ops);
#   3. the attention kernel each of the model's call shapes gets (benchmarks/attention_kernels.py);
#   4. `pytest -m gpu` (the demo spec in bf16 with MFU, an fp16 run through loss-scale overflows, ...);
#   5. a bf16 pretrain of the 125m preset on one GPU, printing its tokens/s and MFU;
#   6. serving SmolLM2 on the GPU in bf16: transformers, vLLM offline and Ember's server on vLLM, tokens/s and the
#      ratios (benchmarks/serve_bench.py --gpu);
#   7. benchmarks/train_bench.py --gpu (Ember against a plain PyTorch loop, MFU).
# Each step's output goes to the log; its last lines and its exit status to the summary. With $OUT set, both are
# written there (gpu_check.txt, gpu_check.log). On a machine without CUDA it says so and exits 2.
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EMBER="$PY -m ember.cli"
WORK=$(mktemp -d -t ember-gpu-check-XXXXXX)
SUMMARY="$WORK/gpu_check.txt"
LOG="$WORK/gpu_check.log"
failed=0 ran=0

say() { echo "$*" | tee -a "$SUMMARY"; }
finish() {  # finish LINE: the summary's last line, then both files to $OUT
    say "$1"
    if [ -n "${OUT:-}" ]; then cp "$SUMMARY" "$LOG" "$OUT"/ 2>/dev/null || true; fi
}
step() {  # step NAME COMMAND...: runs it, its output to the log, its tail and status to the summary
    local name=$1 start rc
    shift
    say "=== $name"
    start=$(date +%s)
    "$@" >>"$LOG" 2>&1
    rc=$?
    tail -n "${TAIL:-12}" "$LOG" | sed 's/^/    /' | tee -a "$SUMMARY"
    say "--- $name: exit $rc, $(( $(date +%s) - start )) s"
    ran=$((ran + 1))
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    finish "gpu_check: no CUDA: torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) sees no GPU \
on $(hostname); nothing checked"
    exit 2
fi

TAIL=8 step "versions" "$PY" -c "
import torch, deepspeed, ray, transformers
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())
print('deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}')
"
TAIL=2 step "DeepSpeed ops for CUDA" env DS_ACCELERATOR=cuda "$PY" -m ember.train.ops
TAIL=4 step "attention kernels" "$PY" benchmarks/attention_kernels.py
TAIL=6 step "pytest -m gpu" "$PY" -m pytest -q -m gpu -p no:cacheprovider

cat >"$WORK/pretrain-125m.yaml" <<EOF
kind: pretrain
name: gpu-check-125m
data: {dir: $WORK/data}
model: {preset: 125m}
train: {global_batch_size: 32, micro_batch_size: 32, max_steps: 120, lr: 6.0e-4, min_lr: 6.0e-5, warmup_steps: 10,
        log_every: 20, eval_every: 0, checkpoint_every: 0}
scaling: {workers: 1, use_gpu: true}
output: {dir: $WORK/run-125m}
EOF
TAIL=3 step "tokenize the built-in corpus" $EMBER run jobs/tokenize-demo.yaml --set "output.dir=$WORK/data"
TAIL=4 step "bf16 pretrain of the 125m preset" $EMBER run "$WORK/pretrain-125m.yaml"
TAIL=3 step "125m: tokens/s and MFU" "$PY" -c "
import json, sys
rows = [json.loads(l) for l in open('$WORK/run-125m/metrics.jsonl')][1:]  # past the first interval (start-up)
assert rows, 'no metrics past the first interval'
print(f\"125m bf16, 1 GPU: {sum(r['tokens_per_s'] for r in rows) / len(rows):,.0f} tokens/s, MFU \"
      f\"{sum(r.get('mfu', 0) for r in rows) / len(rows):.1%} (mean of steps {rows[0]['step']}-{rows[-1]['step']})\")
"
TAIL=9 step "serving on the GPU" "$PY" benchmarks/serve_bench.py --gpu --requests 32 --new-tokens 64
TAIL=8 step "train_bench --gpu" "$PY" benchmarks/train_bench.py --gpu
finish "gpu_check: $failed of $ran steps failed"
[ "$failed" -eq 0 ]
