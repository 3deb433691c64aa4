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
