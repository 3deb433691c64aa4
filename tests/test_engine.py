"""The serving engine without Ray: continuous batching gives each request what it would get alone, chunked prefill,
cancellation frees rows, and a full queue is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ember.model import SamplingParams, Transformer, generate_ids, preset
from ember.serve.engine import Engine, Overloaded, Request


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 97, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


async def collect(engine: Engine, request: Request, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    request.attach(asyncio.get_running_loop())
    engine.submit(request)
    return [e.token async for e in request.events() if e.token is not None]


async def drain(request: Request) -> list:
    return [e async for e in request.events()]


def test_requests_joining_a_running_batch_get_what_they_would_alone(model):
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    # Long prompts are read 4 tokens per step, and at most 8 prompt tokens are read per step in all.
    engine = Engine(model, max_batch_size=4, prefill_chunk=4, prefill_tokens_per_step=8)
    try:
        ps = prompts(10)

        async def main():
            # Staggered arrivals: later requests join between the decoding steps of earlier ones.
            return await asyncio.gather(*(collect(engine, Request(p, params, frozenset()), delay=0.003 * i)
                                          for i, p in enumerate(ps)))

        got = asyncio.run(main())
        for p, out in zip(ps, got):
            assert out == generate_ids(model, [p], params)[0]
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_seeded_sampling_is_per_request_and_repeatable(model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    engine = Engine(model, max_batch_size=3)
    try:
        async def main():
            return await asyncio.gather(*(collect(engine, Request(prompts(1)[0], params, frozenset()))
                                          for _ in range(3)))

        a, b, c = asyncio.run(main())
        assert a == b == c == generate_ids(model, prompts(1), params)[0]
    finally:
        engine.shutdown()


def test_stop_tokens_end_a_request_with_reason_stop(model):
    p = prompts(1)[0]
    free = generate_ids(model, [p], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    engine = Engine(model)
    try:
        async def main():
            r = Request(p, SamplingParams(max_new_tokens=8, temperature=0.0), frozenset({free[3]}))
            r.attach(asyncio.get_running_loop())
            engine.submit(r)
            return [e async for e in r.events()]

        events = asyncio.run(main())
        assert [e.token for e in events[:-1]] == free[: free.index(free[3])]
        assert events[-1].token is None and events[-1].finish_reason == "stop"
    finally:
        engine.shutdown()


def test_a_cancelled_request_frees_its_row_and_a_full_queue_is_refused(model):
    engine = Engine(model, max_batch_size=1, max_queue=1)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            long = Request(prompts(1)[0], SamplingParams(max_new_tokens=50, temperature=0.0), frozenset())
            long.attach(loop)
            engine.submit(long)
            first = await long.events().__anext__()
            assert first.token is not None
            waiting = Request(prompts(2)[1], SamplingParams(max_new_tokens=3, temperature=0.0), frozenset())
            waiting.attach(loop)
            engine.submit(waiting)  # the one queue place
            with pytest.raises(Overloaded, match="at capacity"):
                engine.submit(Request([1, 2], SamplingParams(max_new_tokens=1), frozenset()))
            engine.cancel(long)  # the client went away: its row goes to the waiting request
            return [e.token async for e in waiting.events() if e.token is not None]

        assert len(asyncio.run(main())) == 3
        assert engine.stats() == {"running": 0, "queued": 0, "steps": engine.stats()["steps"]}
    finally:
        engine.shutdown()


def test_incremental_detokenization_equals_decoding_everything_and_honours_stop_strings():
    from ember.data.tokenizer import train_tokenizer
    from ember.serve.app import TextDecoder

    tok = train_tokenizer(["héllo wörld naïve café 日本語 the fox is red"] * 30, 300)
    text = "the café 日本語 is naïve, wörld"
    ids = tok.encode(text).ids
    decoder = TextDecoder(tok, ())
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == text
    decoder = TextDecoder(tok, ("naï",))
    assert "".join(decoder.feed(i) for i in ids) + decoder.flush() == "the café 日本語 is " and decoder.stopped


def test_a_failing_row_ends_alone_and_the_rows_beside_it_are_unchanged(model):
    """Three requests submitted together run in the same steps; the middle one's sampling fails (a NaN temperature
    that validation would refuse over HTTP), and it alone ends with an error."""
    ps = prompts(3)
    good = SamplingParams(max_new_tokens=10, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, seed=5)
    steps = []
    engine = Engine(model, max_batch_size=4, on_step=lambda rows, queued: steps.append(rows))
    try:
        async def main():
            loop = asyncio.get_running_loop()
            rows = [Request(ps[0], good, frozenset()), Request(ps[1], SamplingParams(temperature=float("nan")),
                                                                frozenset()), Request(ps[2], sampled, frozenset())]
            for r in rows:
                r.attach(loop)
            engine.submit(*rows)
            return await asyncio.gather(*(drain(r) for r in rows))

        first, bad, third = asyncio.run(main())
        assert steps[0] == 3  # all three were in the first step
        assert [e.token for e in bad] == [None] and bad[0].finish_reason == "error" and "sampling failed" in bad[0].error
        assert [e.token for e in first[:-1]] == generate_ids(model, [ps[0]], good)[0]
        assert [e.token for e in third[:-1]] == generate_ids(model, [ps[2]], sampled)[0]
        assert first[-1].finish_reason == third[-1].finish_reason == "length"
        assert engine.healthy and engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_the_choices_of_one_request_are_submitted_all_or_none(model):
    engine = Engine(model, max_batch_size=1, max_queue=2)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            long = Request(prompts(1)[0], SamplingParams(max_new_tokens=40, temperature=0.0), frozenset())
            long.attach(loop)
            engine.submit(long)
            await long.events().__anext__()  # decoding: the one row is taken, two queue places are left
            three = [Request([1, 2, 3], SamplingParams(max_new_tokens=2), frozenset()) for _ in range(3)]
            with pytest.raises(Overloaded, match="room for 2 more"):
                engine.submit(*three)
            queued = engine.stats()["queued"]
            with pytest.raises((OverflowError, ValueError)):  # a seed torch refuses: nothing is queued either
                engine.submit(Request([1], SamplingParams(seed=2 ** 70), frozenset()))
            after_bad_seed = engine.stats()["queued"]
            two = three[:2]
            for r in two:
                r.attach(loop)
            engine.submit(*two)
            engine.cancel(long)
            outs = [[e.token for e in events if e.token is not None]
                    for events in await asyncio.gather(*(drain(r) for r in two))]
            return queued, after_bad_seed, outs

        queued, after_bad_seed, outs = asyncio.run(main())
        assert queued == 0 and after_bad_seed == 0
        assert [len(o) for o in outs] == [2, 2]
    finally:
        engine.shutdown()


class Flaky(torch.nn.Module):
    """The model, or a failure: a forward pass that raises, or one whose logits are NaN (a poisoned device)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.mode = model, model.config, None

    def forward(self, *args, **kwargs):
        if self.mode == "raise":
            raise RuntimeError("device lost")
        logits = self.inner(*args, **kwargs)
        return logits * float("nan") if self.mode == "nan" else logits


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_repeated_failed_steps_make_the_engine_unhealthy_and_a_good_step_heals_it(model, mode):
    flaky = Flaky(model)
    engine = Engine(flaky, max_failed_steps=2)

    async def ask():
        r = Request(prompts(1)[0], SamplingParams(max_new_tokens=3, temperature=0.0), frozenset())
        r.attach(asyncio.get_running_loop())
        engine.submit(r)
        return [e async for e in r.events()]

    try:
        flaky.mode = mode
        events = asyncio.run(ask())
        assert [e.token for e in events] == [None] and events[0].finish_reason == "error"
        assert engine.healthy  # one failed step is not yet a broken replica
        asyncio.run(ask())
        assert not engine.healthy and engine.failed_steps == 2
        flaky.mode = None
        events = asyncio.run(ask())
        assert len(events) == 4 and events[-1].finish_reason == "length" and engine.healthy
    finally:
        engine.shutdown()


def test_max_model_len_defaults_to_what_the_kv_memory_budget_holds():
    from ember.errors import EmberError
    from ember.model import preset
    from ember.serve.app import ServeArgs, kv_bytes_per_token, plan_max_model_len

    cfg = preset("1b")  # a 131072-token context: 16 rows of it would take 128 GiB of fp32 KV cache
    assert kv_bytes_per_token(cfg, 4) == 2 * 16 * 8 * 64 * 4
    args = ServeArgs(model_dir="m", max_batch_size=16)
    assert plan_max_model_len(cfg, args, 4) == 4 * 2 ** 30 // (16 * 65536) - 128 == 3968
    assert plan_max_model_len(cfg, args.model_copy(update={"kv_cache_memory_gb": 256}), 4) == 131072
    with pytest.raises(EmberError, match=r"max_model_len: 131072 tokens × max_batch_size 16 need a KV cache of "
                                         r"128\.12 GiB; kv_cache_memory_gb is 4\.0"):
        plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 131072}), 4)
    with pytest.raises(EmberError, match="max_model_len: 200000 is more than the model's context of 131072"):
        plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 200000}), 4)
    with pytest.raises(EmberError, match="kv_cache_memory_gb: 0.001 GiB holds 0 tokens per row"):
        plan_max_model_len(cfg, args.model_copy(update={"kv_cache_memory_gb": 0.001}), 4)
    assert plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 2048}), 2) == 2048


def test_an_engine_with_max_model_len_ends_requests_there(model):
    engine = Engine(model, max_model_len=20)
    try:
        assert engine.cache.k.shape[3] == 20 + engine.prefill_chunk

        async def main():
            r = Request(list(range(1, 16)), SamplingParams(max_new_tokens=50, temperature=0.0), frozenset())
            r.attach(asyncio.get_running_loop())
            engine.submit(r)
            return await drain(r)

        events = asyncio.run(main())
        assert len(events) - 1 == 5 and events[-1].finish_reason == "length"  # 15 prompt + 5 new = 20
    finally:
        engine.shutdown()
