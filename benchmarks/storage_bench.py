"""Training from object storage: the same pretraining run reading its dataset from a local directory and from an
S3 API (moto's server on 127.0.0.1) through the node cache.

(a) baseline: `data.dir` a local directory;
(b) the same dataset uploaded to the bucket, `data.dir` its URI, the node cache empty (cold) when the run starts.

Tokens/s average the `tokens_per_s` the workers log, leaving out the first interval (engine start, the first steps).
Time to the first logged step: wall time from calling the run to its first `metrics.jsonl` row (Ray Train's start,
the workers' imports and engine, and in (b) the download of the shards into the cold cache). The runs alternate
twice; the better of each is used.

    python benchmarks/storage_bench.py [--steps 40] [--mb 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from ember import storage  # noqa: E402 (after the credentials above, which Ray's workers inherit)
from ember.config import parse_spec  # noqa: E402 (same)

MODEL = {"preset": "small", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokenize(work: Path, mb: int) -> Path:
    from ember.data import builtin
    from ember.data.pipeline import run_tokenize

    corpus = work / "corpus.jsonl"
    docs = [d.text for p in range(builtin.num_parts(builtin.PYTHON_DOCS)) for d in builtin.python_docs(p)]
    with open(corpus, "w") as f:
        written, copy = 0, 0
        while written < mb << 20:
            for text in docs:
                line = json.dumps({"text": f"[{copy}] {text}"}) + "\n"
                f.write(line)
                written += len(line)
            copy += 1
    out = work / "data"
    run_tokenize(parse_spec({"kind": "tokenize", "source": {"inputs": [str(corpus)]},
                             "tokenizer": {"vocab_size": 4096}, "pack": {"seq_len": 256, "shard_bytes": 4 << 20},
                             "output": {"dir": str(out)}}))
    return out


def train(data: str, run_dir: Path, steps: int) -> float:
    """Tokens/s of a pretraining run on `data`, after its first logged interval."""
    from ember.train.pretrain import run_pretrain

    run_pretrain(parse_spec({"kind": "pretrain", "data": {"dir": data}, "model": MODEL,
                             "train": {"global_batch_size": 16, "micro_batch_size": 4, "max_steps": steps,
                                       "log_every": 5, "eval_every": 0, "checkpoint_every": 0},
                             "scaling": {"workers": 2}, "output": {"dir": str(run_dir)}}))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["tokens_per_s"] for r in rows) / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mb", type=int, default=8, help="corpus size in MB of JSONL (the dataset is ~half)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    work = Path(tempfile.mkdtemp(prefix="ember-storage-bench-"))
    os.environ["EMBER_CACHE_DIR"] = str(work / "cache")  # before Ray starts: its workers inherit it
    ray.init(num_cpus=2, logging_level=logging.WARNING)
    logging.getLogger("ember").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's request lines
    try:
        data = tokenize(work, args.mb)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="bench")
        uri = f"s3://bench/data?endpoint_override=127.0.0.1:{port}&scheme=http"
        storage.upload_dir(data, uri, marker="manifest.json")
        size = sum(p.stat().st_size for p in data.rglob("*.arrow"))
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; dataset {size / 2**20:.1f} MiB of shards; "
              f"model {MODEL}; {args.steps} steps of 16 x 256 tokens, 2 workers")
        local, remote = [], []
        for attempt in range(2):
            local.append(timed(str(data), work / f"run-local-{attempt}", args.steps))
            shutil.rmtree(work / "cache", ignore_errors=True)  # cold
            remote.append(timed(uri, work / f"run-s3-{attempt}", args.steps))
        (a, a_first), (b, b_first) = max(local), max(remote)
        print(f"(a) data.dir local:                  {a:,.0f} tokens/s, {a_first:.1f}s to the first logged step")
        print(f"(b) data.dir s3:// (cold node cache): {b:,.0f} tokens/s, {b_first:.1f}s to the first logged step")
        print(f"ratio b/a = {b / a:.2f}   (target >= 0.95 after the first interval); cold-cache start-up "
              f"+{b_first - a_first:.1f}s")
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def timed(data: str, run_dir: Path, steps: int) -> tuple[float, float]:
    """(tokens/s after the first interval, wall seconds from launch to the first logged step)."""
    import threading

    first: dict = {}

    def watch():
        start = time.perf_counter()
        metrics = run_dir / "metrics.jsonl"
        while "t" not in first:
            if metrics.exists() and metrics.stat().st_size:
                first["t"] = time.perf_counter() - start
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rate = train(data, run_dir, steps)
    watcher.join(timeout=1)
    return rate, first.get("t", float("nan"))


if __name__ == "__main__":
    sys.exit(main())
