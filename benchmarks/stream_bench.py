"""Streaming shards from a bucket: time to the first batch and the node cache's peak as the dataset grows past the
cache's budget, and training throughput streaming from the bucket against the same dataset on local disk.

The bucket is a real S3 API on 127.0.0.1 (moto's server, in a process of its own). The datasets are random token
rows (seq_len 256, vocab 4096) in 1 MiB shards, of 1x and 8x the node cache's budget (`--budget-mb`, default 64).

(1) Time to the first batch, and the cache's peak while reading twice the budget's worth of rows:
    (a) baseline: what the reader did before streaming, fetching the whole split into the node cache before the
        first sample (every shard through `NodeCache.fetch`, with a budget that holds them);
    (b) Ember: `ShardReader` on the bucket (blocks of `--block-mb` shuffled together), the first batch of 16.
(2) Training throughput: a plain PyTorch loop (a small Llama, AdamW, batch 16) over batches from (a) the local
    dataset and (b) the same dataset streamed from the bucket with a cache of `--budget-mb`; tokens/s over the
    steps after a warm-up, crossing several blocks; interleaved, best of `--repeat`.

    python benchmarks/stream_bench.py [--budget-mb 64] [--block-mb 2] [--steps 600] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SEQ_LEN, VOCAB, SHARD_BYTES = 256, 4096, 1 << 20
MiB = 1 << 20


def moto_bucket() -> tuple[subprocess.Popen, str]:
    """A moto S3 server (a process of its own, as a real store is not in this one) on a free port of 127.0.0.1 with
    a bucket; (the process, a URI template of the bucket)."""
    import boto3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # moto takes any
        os.environ.setdefault(key, "bench")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    deadline = time.time() + 60
    while True:
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - any failure is "not up yet" until the deadline
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    return server, f"s3://bench/{{}}?endpoint_override=127.0.0.1:{port}&scheme=http"


def write_dataset(out: Path, total_bytes: int, seed: int) -> None:
    from ember.data.shards import FORMAT, FORMAT_VERSION, ShardWriter
    from ember.storage import write_json

    rng = np.random.default_rng(seed)
    (out / "val").mkdir(parents=True)
    writer = ShardWriter(out / "train", "u000000", SEQ_LEN + 1, np.dtype(np.uint16), SHARD_BYTES)
    (out / "train").mkdir(exist_ok=True)
    rows = total_bytes // ((SEQ_LEN + 1) * 2)
    for start in range(0, rows, 4096):
        writer.write(rng.integers(0, VOCAB, (min(4096, rows - start), SEQ_LEN + 1), dtype=np.uint16))
    shards = writer.close()
    write_json(out / "manifest.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "pretrain", "seq_len": SEQ_LEN,
        "dtype": "uint16", "vocab_size": VOCAB, "eos_id": 0,
        "splits": {"train": {"shards": shards, "rows": rows}, "val": {"shards": [], "rows": 0}}})


class CachePeak:
    """The most bytes of files a node cache dir held, sampled every 20 ms in a thread."""

    def __init__(self, cache: Path):
        self.cache, self.peak, self.done = cache, 0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            total = 0
            for f in self.cache.glob("files/*/*"):
                try:
                    total += f.stat().st_size if not f.name.endswith((".json", ".lock")) else 0
                except FileNotFoundError:
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(0.02)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def fresh_cache(budget: int) -> Path:
    cache = Path(tempfile.mkdtemp(prefix="ember-bench-cache-"))
    os.environ["EMBER_CACHE_DIR"], os.environ["EMBER_CACHE_BYTES"] = str(cache), str(budget)
    return cache


def fetch_whole_split(uri: str) -> float:
    """The baseline: seconds to fetch every shard of the split into a cache that holds them all."""
    from ember import storage
    from ember.data.shards import load_manifest

    fresh_cache(1 << 40)
    t0 = time.perf_counter()
    for shard in load_manifest(uri)["splits"]["train"]["shards"]:
        storage.NodeCache().fetch(storage.join(uri, "train", shard["file"]), size=shard["bytes"],
                                  sha256=shard["sha256"])
    return time.perf_counter() - t0


def first_batch_and_peak(uri: str, budget: int, block: int) -> tuple[float, int, int]:
    """(seconds to the first batch, the cache's peak bytes while reading rows worth twice the budget, rows read)."""
    from ember.data.shards import ShardReader

    cache = fresh_cache(budget)
    watch = CachePeak(cache)
    t0 = time.perf_counter()
    reader = ShardReader(uri, seed=0, block_bytes=block)
    batches = reader.batches(16)
    next(batches)
    first = time.perf_counter() - t0
    rows = min(2 * budget // ((SEQ_LEN + 1) * 2), len(reader))
    for _ in range(rows // 16):
        next(batches)
    reader.close()
    return first, watch.stop(), rows


def train_tokens_per_s(location: str, steps: int, block: int, warmup: int = 5) -> float:
    import torch
    import torch.nn.functional as F

    from ember.data.shards import ShardReader
    from ember.model import Transformer, preset

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, max_position_embeddings=SEQ_LEN))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reader = ShardReader(location, seed=1, block_bytes=block)
    batches = reader.batches(16)
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        x = torch.from_numpy(next(batches)[0])
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    reader.close()
    return steps * 16 * SEQ_LEN / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=int, default=64)
    parser.add_argument("--block-mb", type=float, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from ember import storage

    budget, block = args.budget_mb * MiB, int(args.block_mb * MiB)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; node cache budget {args.budget_mb} MiB, shuffle "
          f"blocks of {args.block_mb} MiB, shards of 1 MiB, rows of {SEQ_LEN + 1} uint16 ids")
    server, root = moto_bucket()
    work = Path(tempfile.mkdtemp(prefix="ember-stream-bench-"))
    try:
        uris = {}
        for scale in (1, 8):
            write_dataset(work / f"x{scale}", scale * budget, seed=scale)
            uris[scale] = root.format(f"x{scale}")
            storage.upload_dir(work / f"x{scale}", uris[scale])
        print("\n(1) time to the first batch; the node cache's peak while reading rows worth 2x the budget")
        for scale, uri in uris.items():
            whole = fetch_whole_split(uri)
            first, peak, rows = first_batch_and_peak(uri, budget, block)
            print(f"  dataset {scale}x the budget ({scale * args.budget_mb} MiB): (a) fetch the split first "
                  f"{whole:6.2f}s   (b) streaming {first:5.2f}s   b/a = {first / whole:.3f};   cache peak "
                  f"{peak / MiB:5.1f} MiB of {args.budget_mb} MiB over {rows:,} rows")
        print(f"\n(2) training tokens/s, {args.steps} steps of 16 x {SEQ_LEN} after a warm-up, the 8x dataset "
              f"(interleaved, best of {args.repeat})")
        local, streamed = [], []
        for _ in range(args.repeat):
            fresh_cache(1 << 40)
            local.append(train_tokens_per_s(str(work / "x8"), args.steps, block))
            fresh_cache(budget)
            streamed.append(train_tokens_per_s(uris[8], args.steps, block))
        a, b = max(local), max(streamed)
        print(f"  (a) local disk {a:,.0f} tokens/s   (b) streamed from the bucket {b:,.0f} tokens/s   "
              f"b/a = {b / a:.3f}   (target >= 0.95)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
