"""Serving throughput and latency on CPU, in one run, same model, prompts and output lengths:

(a) `transformers` `generate`, one request at a time (the baseline);
(b) Ember's engine in-process with batching off (max_batch_size 1), one request at a time;
(c) Ember's full server (Ray Serve, HTTP, the `openai` client streaming) with continuous batching, at concurrency
    1, 8 and 32;
(d) Ember's engine in-process with all prompts at once (32 rows), greedy and sampled (temperature 0.8, top-p 0.95,
    a seed each): the ceiling of (c) on this machine, and what sampling costs a batched step (run before (c)).

Prints output tokens/s, time to first token (TTFT) p50/p99 and time per output token (TPOT) p50/p99 for each, and
the ratio c/a at concurrency 32 (the median of --repeat runs of (c)). Every request generates exactly --new-tokens
tokens (end-of-text ignored).

Then prefix caching: 32 chat requests at once that share a ~400-token system prompt (each its own user message),
against the server with `prefix_cache_tokens: 0` and with the default, after one request that puts the system prompt
in the cache; prints the TTFT p50 of each and the ratio.

    python benchmarks/serve_bench.py [--requests 32] [--new-tokens 64] [--threads 2] [--repeat 3] [--gpu]

With `--gpu` all three run on the GPU in bf16 (the replica with num_gpus: 1, its default dtype there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

# The shape of benchmarks/model_bench.py (about 25M parameters): big enough that compute, not Python, sets the pace.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1024)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def line(name, tokens, seconds, ttft, tpot):
    print(f"{name:<34} {tokens / seconds:>10,.0f} tok/s   TTFT p50 {pct(ttft, 50) * 1e3:7.1f} ms  "
          f"p99 {pct(ttft, 99) * 1e3:7.1f} ms   TPOT p50 {pct(tpot, 50) * 1e3:6.1f} ms  "
          f"p99 {pct(tpot, 99) * 1e3:6.1f} ms")
    return tokens / seconds


def make_model(root: Path):
    from ember.data import builtin
    from ember.data.tokenizer import save_tokenizer, train_tokenizer
    from ember.model import Transformer, preset, save_model

    docs = [d.text for _, d in zip(range(400), builtin.python_docs(0))]
    tok = train_tokenizer(docs, 8192)
    save_tokenizer(tok, root / "tok", model_max_length=SHAPE["max_position_embeddings"])
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.get_vocab_size(), **SHAPE))
    save_model(model, root / "model", tokenizer_dir=root / "tok", eos_token_id=0)
    prompts = [" ".join(d.split()[:48]) for d in docs[:400] if len(d.split()) >= 48]
    return root / "model", prompts


DEVICE, DTYPE = "cpu", torch.float32  # --gpu: cuda, bf16


def bench_transformers(model_dir, prompts, new_tokens):
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from ember.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=DTYPE).to(DEVICE).eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ttft, tpot, tokens = [], [], 0
    start = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([tok.encode(p).ids], device=DEVICE)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              streamer=clock, pad_token_id=0)
        n = out.shape[1] - ids.shape[1]
        tokens += n
        ttft.append(clock.times[1] - t0)  # the first put() is the prompt
        tpot.append((clock.times[-1] - clock.times[1]) / max(1, n - 1))
    return line("(a) transformers, one at a time", tokens, time.perf_counter() - start, ttft, tpot)


def bench_engine(model_dir, prompts, new_tokens):
    from ember.data.tokenizer import load_tokenizer
    from ember.model import SamplingParams, load_model
    from ember.serve.engine import Engine, Request

    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir, dtype=DTYPE, device=DEVICE), max_batch_size=1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    async def run():
        ttft, tpot, tokens = [], [], 0
        for p in prompts:
            r = Request(tok.encode(p).ids, params, frozenset())
            r.attach(asyncio.get_running_loop())
            t0 = time.perf_counter()
            engine.submit(r)
            times = [time.perf_counter() async for e in r.events() if e.token is not None]
            tokens += len(times)
            ttft.append(times[0] - t0)
            tpot.append((times[-1] - times[0]) / max(1, len(times) - 1))
        return tokens, ttft, tpot

    start = time.perf_counter()
    tokens, ttft, tpot = asyncio.run(run())
    rate = line("(b) Ember engine, batching off", tokens, time.perf_counter() - start, ttft, tpot)
    engine.shutdown()
    return rate


def bench_engine_batch(model_dir, prompts, new_tokens, sampled: bool) -> float:
    """Ember's engine in-process with every prompt submitted at once (max_batch_size 32, no Ray, no HTTP): the
    ceiling of the server's throughput. `sampled`: temperature 0.8 and top-p 0.95, a seed per request."""
    from ember.data.tokenizer import load_tokenizer
    from ember.model import SamplingParams, load_model
    from ember.serve.engine import Engine, Request

    tok = load_tokenizer(model_dir)
    engine = Engine(load_model(model_dir, dtype=DTYPE, device=DEVICE), max_batch_size=32)

    def params(i):
        if sampled:
            return SamplingParams(max_new_tokens=new_tokens, temperature=0.8, top_p=0.95, seed=i)
        return SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    async def run():
        requests = [Request(tok.encode(p).ids, params(i), frozenset()) for i, p in enumerate(prompts)]
        for r in requests:
            r.attach(asyncio.get_running_loop())
        engine.submit(*requests)
        counts = await asyncio.gather(*(count(r) for r in requests))
        return sum(counts)

    async def count(r):
        return sum([1 async for e in r.events() if e.token is not None])

    asyncio.run(run())  # warm-up
    start = time.perf_counter()
    tokens = asyncio.run(run())
    seconds = time.perf_counter() - start
    engine.shutdown()
    kind = "temperature 0.8, top-p 0.95" if sampled else "greedy"
    print(f"{'(d) Ember engine, 32 at once, ' + kind:<48} {tokens / seconds:>10,.0f} tok/s")
    return tokens / seconds


def bench_server(base, prompts, new_tokens, concurrency, show=True):
    """`concurrency` clients (one asyncio loop, aiohttp: a light client, so the server's CPU is the server's) each
    stream completions; tokens are counted from the usage chunk, times taken as the text chunks arrive."""
    import aiohttp

    work = (prompts * ((concurrency * 2) // len(prompts) + 1))[: max(len(prompts), concurrency * 2)]

    async def ask(session, p):
        body = {"model": "bench", "prompt": p, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        t0, times, count = time.perf_counter(), [], 0
        async with session.post(f"{base}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                if b'"usage"' in line:
                    count = json.loads(line[6:])["usage"]["completion_tokens"]
                elif b'"finish_reason": null' in line:
                    times.append(time.perf_counter())
        return t0, times, count

    async def run():
        queue = list(work)
        results = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def client():
                while queue:
                    results.append(await ask(session, queue.pop()))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    # Tokens from each response's usage; time to the first text chunk; per-token time over the rest of the stream.
    ttft = [times[0] - t0 for t0, times, _ in results]
    tpot = [(times[-1] - times[0]) / max(1, n - 1) for _, times, n in results]
    tokens = sum(n for _, _, n in results)
    if not show:
        return tokens / seconds
    return line(f"(c) Ember server, concurrency {concurrency}", tokens, seconds, ttft, tpot)


def bench_shared_prefix(base, system: str, users: list[str], new_tokens: int = 8) -> float:
    """TTFT p50 of one chat request per user message, all at once, each with the same system message (after one
    request of it alone, so a prefix cache holds it)."""
    import aiohttp

    async def ask(session, user):
        body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        t0 = time.perf_counter()
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for raw in resp.content:  # the first chunk with text (the one before it names the role)
                if raw.startswith(b"data: {") and any(c["delta"].get("content")
                                                      for c in json.loads(raw[6:])["choices"]):
                    return time.perf_counter() - t0
        raise RuntimeError("no token came back")

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            await ask(session, "warm up")
            return await asyncio.gather(*(ask(session, u) for u in users))

    return pct(asyncio.run(run()), 50)


def deploy(model_dir, args, port: int, **options) -> str:
    from ray import serve

    from ember.serve.app import build_app
    from ember.serve.launch import wait_ready

    serve.run(build_app({"model_dir": str(model_dir), "model_name": "bench", "num_replicas": 1,
                         "num_cpus": args.threads, "num_gpus": 1 if args.gpu else 0,
                         "max_batch_size": 32, "max_queue": 256,
                         "torch_threads": args.server_threads or args.threads, **options}),
              name="bench", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base)
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads everywhere")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads of the replica (default: --threads)")
    parser.add_argument("--gpu", action="store_true", help="everything on the GPU in bf16")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (c) at concurrency 32; c/a is their median")
    args = parser.parse_args()
    global DEVICE, DTYPE
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device (torch sees none)", file=sys.stderr)
            return 1
        DEVICE, DTYPE = "cuda", torch.bfloat16
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        model_dir, prompts = make_model(Path(d))
        prompts = prompts[: args.requests]
        from ember.model import load_model, num_parameters

        gpu = f", GPU: {torch.cuda.get_device_name()}" if args.gpu else ""
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}, {args.threads} "
              f"torch threads; model {num_parameters(load_model(model_dir).config) / 1e6:.1f}M parameters "
              f"{'bf16' if args.gpu else 'fp32'}; "
              f"{len(prompts)} prompts of ~64 tokens, {args.new_tokens} new tokens each")
        a = bench_transformers(model_dir, prompts, args.new_tokens)
        bench_engine(model_dir, prompts, args.new_tokens)
        greedy = bench_engine_batch(model_dir, prompts, args.new_tokens, sampled=False)
        sampled = bench_engine_batch(model_dir, prompts, args.new_tokens, sampled=True)
        print(f"engine at 32 / a: {greedy / a:.2f} (the ceiling of c/a here); sampled / greedy: {sampled / greedy:.2f}")

        import ray
        from ray import serve

        from ember.data.tokenizer import load_tokenizer

        port = 8765
        ray.init(num_cpus=args.threads, num_gpus=1 if args.gpu else 0, include_dashboard=False, logging_level="ERROR")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = deploy(model_dir, args, port)
        bench_server(base, prompts[:4], args.new_tokens, 1, show=False)  # warm-up
        rates = {c: bench_server(base, prompts, args.new_tokens, c) for c in (1, 8)}
        at_32 = sorted(bench_server(base, prompts, args.new_tokens, 32) for _ in range(max(1, args.repeat)))
        print(f"c/a at concurrency 32: {at_32[len(at_32) // 2] / a:.2f}  (median of {len(at_32)} runs: "
              f"{', '.join(f'{r / a:.2f}' for r in at_32)}; c/a at 1 and 8: {rates[1] / a:.2f}, {rates[8] / a:.2f})")

        tok = load_tokenizer(model_dir)
        system = " ".join(" ".join(prompts).split()[:400])
        system = tok.decode(tok.encode(system).ids[:400])
        users = [" ".join(p.split()[:12]) for p in prompts[:32]]
        users = (users * (32 // len(users) + 1))[:32]
        ttft = {}
        for cache, options in (("off", {"prefix_cache_tokens": 0}), ("on", {})):
            serve.delete("bench")
            base = deploy(model_dir, args, port, **options)
            ttft[cache] = bench_shared_prefix(base, system, users)
            print(f"shared 400-token system prompt, 32 chat requests at once, prefix cache {cache:<3}: "
                  f"TTFT p50 {ttft[cache] * 1e3:7.1f} ms")
        print(f"TTFT p50 cache off / on: {ttft['off'] / ttft['on']:.2f}  (target >= 3)")
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
