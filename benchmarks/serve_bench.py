"""Serving throughput and latency of the real model (SmolLM2-135M-Instruct, `builtin:`), in one run, same prompts
and output lengths:

(a) `transformers` `generate`, one request at a time (the baseline);
(b) vLLM offline (`vllm.LLM`), every prompt at once, in a process of its own: the engine's ceiling on this machine;
(c) Ember's server (Ray Serve, `EmberIngress` in front of vLLM's `LLMServer`, HTTP, server-sent events read by a
    light aiohttp client) at concurrency 1, 8 and 32.

Prints output tokens/s, time to first token (TTFT) p50/p99 and time per output token (TPOT) p50/p99 for each, then
c/a and c/b at concurrency 32 (the median of --repeat runs of (c)). Every request generates exactly --new-tokens
tokens (end of text ignored). Two more lines at concurrency 32 show where the server's CPU goes on a small machine:
the same requests not streamed (one response each), and streamed with vLLM's `stream_interval` at 4 (a chunk per 4
tokens; `engine_kwargs: {stream_interval: 4}` in a serve spec). With --prefix, then: 32 chat requests at once
sharing a ~400-token system prompt, against the server with prefix caching off and on; prints the TTFT p50 of each
and their ratio.

    python benchmarks/serve_bench.py [--requests 32] [--new-tokens 64] [--repeat 3] [--prefix] [--gpu]

With --gpu, (a), (b) and (c) run on the GPU in bf16 (the replica with num_gpus: 1, its default dtype there).
Targets (issue 31): c/b >= 0.9 and c/a >= 15 at concurrency 32 on this 2-CPU machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time

import torch

MODEL = "builtin:smollm2-135m-instruct"


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def line(name, tokens, seconds, ttft, tpot):
    print(f"{name:<34} {tokens / seconds:>8,.0f} tok/s   TTFT p50 {pct(ttft, 50) * 1e3:7.1f} ms  "
          f"p99 {pct(ttft, 99) * 1e3:7.1f} ms   TPOT p50 {pct(tpot, 50) * 1e3:6.1f} ms  "
          f"p99 {pct(tpot, 99) * 1e3:6.1f} ms", flush=True)
    return tokens / seconds


def prompts_of(n: int) -> list[str]:
    """Questions about Python's standard library, ~43 tokens each with SmolLM2's tokenizer."""
    from ember.data import builtin

    docs = [d.text for _, d in zip(range(400), builtin.python_docs(0))]
    return [" ".join(d.split()[:32]) for d in docs if len(d.split()) >= 32][:n]


def bench_transformers(model_dir, prompts, new_tokens, device, dtype):
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from ember.data.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()

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
        ids = torch.tensor([tok.encode(p, add_special_tokens=False).ids], device=device)
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


def _vllm_offline(model_dir, prompts, new_tokens, gpu, out):
    """(b) in a spawned process (vLLM's engine holds memory and threads that the server must not share)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    kwargs = {"dtype": "bfloat16"} if gpu else {"dtype": "float32", "enforce_eager": True,
                                                "kv_cache_memory_bytes": 1 << 30}
    if not gpu:  # every core computes, as in Ember's CPU replicas (ember.serve.app.llm_config)
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    llm = LLM(model=str(model_dir), max_model_len=2048, max_num_seqs=len(prompts), load_format="safetensors",
              **kwargs)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    done = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    out.put((sum(len(d.outputs[0].token_ids) for d in done), seconds))


def bench_vllm_offline(model_dir, prompts, new_tokens, gpu) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_vllm_offline, args=(model_dir, prompts, new_tokens, gpu, out))
    proc.start()
    tokens, seconds = out.get(timeout=900)
    proc.join(60)
    print(f"{'(b) vLLM offline, all at once':<34} {tokens / seconds:>8,.0f} tok/s", flush=True)
    return tokens / seconds


def bench_server(base, prompts, new_tokens, concurrency, show=True):
    """`concurrency` clients (one asyncio loop, aiohttp: a light client, so the CPU goes to the server) each stream
    completions; tokens are counted from the usage chunk, times taken as the text chunks arrive."""
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
                text = raw.strip()
                if not text.startswith(b"data: {"):
                    continue
                chunk = json.loads(text[6:])
                if chunk.get("usage"):
                    count = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
        return t0, times, count

    async def run():
        queue = list(work)
        results = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            async def client():
                while queue:
                    results.append(await ask(session, queue.pop()))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        return results

    start = time.perf_counter()
    results = asyncio.run(run())
    seconds = time.perf_counter() - start
    ttft = [times[0] - t0 for t0, times, _ in results]
    tpot = [(times[-1] - times[0]) / max(1, n - 1) for _, times, n in results]
    tokens = sum(n for _, _, n in results)
    if not show:
        return tokens / seconds
    return line(f"(c) Ember server, concurrency {concurrency}", tokens, seconds, ttft, tpot)


def bench_unstreamed(base, prompts, new_tokens, concurrency) -> float:
    """Output tokens/s of the same work as `bench_server`, each completion returned whole."""
    import aiohttp

    work = (prompts * ((concurrency * 2) // len(prompts) + 1))[: max(len(prompts), concurrency * 2)]

    async def run():
        queue, counts = list(work), []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            async def client():
                while queue:
                    body = {"model": "bench", "prompt": queue.pop(), "max_tokens": new_tokens, "temperature": 0,
                            "ignore_eos": True}
                    async with session.post(f"{base}/v1/completions", json=body) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
                        counts.append((await resp.json())["usage"]["completion_tokens"])

            await asyncio.gather(*(client() for _ in range(concurrency)))
        return sum(counts)

    start = time.perf_counter()
    tokens = asyncio.run(run())
    rate = tokens / (time.perf_counter() - start)
    print(f"{f'(c) concurrency {concurrency}, not streamed':<34} {rate:>8,.0f} tok/s", flush=True)
    return rate


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
                                                      for c in json.loads(raw[6:]).get("choices", [])):
                    return time.perf_counter() - t0
        raise RuntimeError("no token came back")

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            await ask(session, "warm up")
            return await asyncio.gather(*(ask(session, u) for u in users))

    return pct(asyncio.run(run()), 50)


def deploy(args, port: int, **options) -> str:
    from ray import serve

    from ember.serve.app import build_app
    from ember.serve.launch import wait_ready

    serve.run(build_app({"model_dir": MODEL, "model_name": "bench", "num_replicas": 1, "ingress_num_cpus": 0,
                         "num_cpus": 1, "num_gpus": 1 if args.gpu else 0, "max_num_seqs": 32,
                         "max_ongoing_requests": 64, "max_queue": 256, "max_model_len": 2048,
                         "kv_cache_memory_gb": 1, **options}),
              name="bench", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, app="bench")
    return base


def bench_prefix(args, port, prompts) -> None:
    from ray import serve

    from ember.data.tokenizer import load_tokenizer
    from ember.model.hf import local_model_dir

    tok = load_tokenizer(local_model_dir(MODEL))
    system = tok.decode(tok.encode(" ".join(" ".join(prompts).split()[:400])).ids[:400])
    users = [" ".join(p.split()[:12]) for p in prompts[:32]]
    users = (users * (32 // len(users) + 1))[:32]
    ttft = {}
    for cache, on in (("off", False), ("on", True)):
        serve.delete("bench")
        base = deploy(args, port, enable_prefix_caching=on)
        ttft[cache] = bench_shared_prefix(base, system, users)
        print(f"shared 400-token system prompt, 32 chat requests at once, prefix cache {cache:<3}: "
              f"TTFT p50 {ttft[cache] * 1e3:7.1f} ms", flush=True)
    print(f"TTFT p50 cache off / on: {ttft['off'] / ttft['on']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--gpu", action="store_true", help="everything on the GPU in bf16")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (c) at concurrency 32; the ratios use their "
                                                              "median")
    parser.add_argument("--prefix", action="store_true", help="also the shared-prefix TTFT, prefix caching off/on")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device (torch sees none)", file=sys.stderr)
        return 1
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    from ember.model.hf import local_model_dir

    model_dir = local_model_dir(MODEL)
    prompts = prompts_of(args.requests)
    gpu = f", GPU: {torch.cuda.get_device_name()}" if args.gpu else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}; SmolLM2-135M-"
          f"Instruct {'bf16' if args.gpu else 'fp32'}; {len(prompts)} prompts of ~43 tokens, {args.new_tokens} new "
          "tokens each", flush=True)
    a = bench_transformers(model_dir, prompts, args.new_tokens, device, dtype)
    b = bench_vllm_offline(model_dir, prompts, args.new_tokens, args.gpu)

    import ray
    from ray import serve

    port = 8765
    ray.init(num_cpus=os.cpu_count(), num_gpus=1 if args.gpu else 0, include_dashboard=False, logging_level="ERROR")
    # Serve's access log and INFO lines off, as `ember serve --quiet` has them: a line per request costs CPU here.
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    base = deploy(args, port)
    bench_server(base, prompts[:4], args.new_tokens, 1, show=False)  # warm-up
    rates = {c: bench_server(base, prompts, args.new_tokens, c) for c in (1, 8)}
    at_32 = sorted(bench_server(base, prompts, args.new_tokens, 32) for _ in range(max(1, args.repeat)))
    c = at_32[len(at_32) // 2]
    print(f"c/a at concurrency 32: {c / a:.2f} (target >= 15); c/b: {c / b:.2f} (target >= 0.9)  (median of "
          f"{len(at_32)} runs: {', '.join(f'{r:.0f}' for r in at_32)} tok/s; c/a at 1 and 8: {rates[1] / a:.2f}, "
          f"{rates[8] / a:.2f})")
    unstreamed = bench_unstreamed(base, prompts, args.new_tokens, 32)
    serve.delete("bench")
    base = deploy(args, port, engine_kwargs={"stream_interval": 4})
    bench_server(base, prompts[:4], args.new_tokens, 1, show=False)
    interval = sorted(bench_server(base, prompts, args.new_tokens, 32, show=False) for _ in range(max(1, args.repeat)))
    chunked = interval[len(interval) // 2]
    print(f"{'(c) concurrency 32, stream_interval 4':<34} {chunked:>8,.0f} tok/s (median of {len(interval)})")
    print(f"c/b at concurrency 32: not streamed {unstreamed / b:.2f}, stream_interval 4 {chunked / b:.2f}; the most "
          f"c/a can be here is b/a = {b / a:.2f}", flush=True)
    if args.prefix:
        bench_prefix(args, port, prompts)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
