"""The serving engine without Ray: continuous batching gives each request what it would get alone, chunked prefill,
cancellation frees rows, and a full queue is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import tiny_model
from ember.model import SamplingParams, Transformer, generate_ids
from ember.serve.engine import Engine, Overloaded, Request, StepRecord


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model(97, max_position_embeddings=64)


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


async def drain_tokens(events) -> list[int]:
    return [e.token async for e in events if e.token is not None]


@pytest.fixture()
def engines(model):
    """Makes engines of the module's model (`engines(**options)`) and shuts every one down after the test."""
    made = []

    def make(inner=None, **options) -> Engine:
        made.append(Engine(inner or model, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


def test_requests_joining_a_running_batch_get_what_they_would_alone(engines, model):
    """Four requests decode; six more arrive while they do, join the running batch between its steps and read their
    prompts 4 tokens at a time (8 in all per step) beside the decoding rows. Each gets what it gets alone."""
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    steps: list[StepRecord] = []
    engine = engines(max_batch_size=4, prefill_chunk=4, prefill_tokens_per_step=8, on_step=steps.append)
    ps = prompts(10)

    async def main():
        loop = asyncio.get_running_loop()
        rs = [Request(p, params, frozenset()) for p in ps]
        for r in rs:
            r.attach(loop)
        engine.submit(*rs[:4])
        streams = [r.events() for r in rs]
        firsts = [[(await s.__anext__()).token] for s in streams[:4]]  # the first four are decoding now
        engine.submit(*rs[4:])
        rest = await asyncio.gather(*(drain_tokens(s) for s in streams))
        return rs, [first + more for first, more in zip(firsts + [[]] * 6, rest)]

    rs, got = asyncio.run(main())
    for p, out in zip(ps, got):
        assert out == generate_ids(model, [p], params)[0]
    assert engine.stats()["running"] == 0
    late = {r.id for r in rs[4:]}
    # A late request read part of its prompt in a step where rows of the first four decoded: it joined them.
    joined = [s for s in steps if {i for i, _ in s.prefilled} & late and set(s.decoded) - late]
    assert joined, steps
    long_prompts = {r.id for r in rs if len(r.prompt) > 4}
    chunks = [n for s in steps for i, n in s.prefilled if i in long_prompts]
    assert chunks and max(chunks) == 4  # long prompts were read in chunks of 4
    assert all(sum(n for _, n in s.prefilled) <= 8 or len(s.prefilled) == 1 for s in steps)
    assert max(s.rows for s in steps) == 4


def test_seeded_sampling_is_per_request_and_repeatable(engines, model):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7)
    engine = engines(max_batch_size=3)

    async def main():
        return await asyncio.gather(*(collect(engine, Request(prompts(1)[0], params, frozenset()))
                                      for _ in range(3)))

    a, b, c = asyncio.run(main())
    assert a == b == c == generate_ids(model, prompts(1), params)[0]


def test_sampled_rows_of_one_kind_are_drawn_together_and_each_gets_what_it_gets_alone(engines, model):
    """Three top-p requests and two with a repetition penalty (prompts of different lengths), each with its own seed,
    decode in the same steps: each kind is sampled as one group, and each request's tokens are its own run alone."""
    nucleus = [SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)]
    penalized = [SamplingParams(max_new_tokens=8, temperature=0.7, repetition_penalty=1.3, seed=s) for s in (4, 5)]
    ps, kinds = prompts(5), nucleus + penalized
    steps: list[StepRecord] = []
    engine = engines(max_batch_size=5, on_step=steps.append)

    async def main():
        return await asyncio.gather(*(collect(engine, Request(p, k, frozenset())) for p, k in zip(ps, kinds)))

    got = asyncio.run(main())
    assert max(len(s.decoded) for s in steps) == 5  # all five were sampled in one step
    assert got == [generate_ids(model, [p], k)[0] for p, k in zip(ps, kinds)]
    assert len({tuple(g) for g in got[:3]}) > 1  # the seeds differ, and so do the tokens


def test_stop_tokens_end_a_request_with_reason_stop(engines, model):
    p = prompts(1)[0]
    free = generate_ids(model, [p], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    engine = engines()

    async def main():
        r = Request(p, SamplingParams(max_new_tokens=8, temperature=0.0), frozenset({free[3]}))
        r.attach(asyncio.get_running_loop())
        engine.submit(r)
        return [e async for e in r.events()]

    events = asyncio.run(main())
    assert [e.token for e in events[:-1]] == free[: free.index(free[3])]
    assert events[-1].token is None and events[-1].finish_reason == "stop"


def test_a_cancelled_request_frees_its_row_and_a_full_queue_is_refused(engines):
    """A request that could decode ~57 more tokens is cancelled after its first: it takes at most one more step
    (one may be under way), and the one waiting for its row gets the row."""
    steps: list[StepRecord] = []
    engine = engines(max_batch_size=1, max_queue=1, on_step=steps.append)

    async def main():
        loop = asyncio.get_running_loop()
        long = Request([3, 1, 4, 1, 5], SamplingParams(max_new_tokens=60, temperature=0.0), frozenset())
        long.attach(loop)
        engine.submit(long)
        first = await long.events().__anext__()
        assert first.token is not None
        waiting = Request(prompts(2)[1], SamplingParams(max_new_tokens=3, temperature=0.0), frozenset())
        waiting.attach(loop)
        engine.submit(waiting)  # the one queue place
        with pytest.raises(Overloaded, match="at capacity"):
            engine.submit(Request([1, 2], SamplingParams(max_new_tokens=1), frozenset()))
        at_cancel = len(steps)
        engine.cancel(long)  # the client went away: its row goes to the waiting request
        tokens = [e.token async for e in waiting.events() if e.token is not None]
        return long, waiting, at_cancel, tokens

    long, waiting, at_cancel, tokens = asyncio.run(main())
    assert len(tokens) == 3
    after = steps[at_cancel:]
    assert sum(long.id in s.decoded for s in after) <= 1, after
    assert len(long.output) <= at_cancel + 1 < 59  # a token per step until the cancel, one step at most after it
    # The waiting request got the row after the cancel. (Its last step's record may still be on its way: on_step
    # runs after a step's tokens are handed out.)
    assert any(waiting.id in s.decoded or waiting.id in dict(s.prefilled) for s in after)
    assert engine.stats() | {"steps": None, "kv_cache_budget_bytes": None} == {
        "running": 0, "queued": 0, "steps": None, "kv_cache_bytes": 0, "kv_cache_budget_bytes": None}  # idle: freed


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


def test_a_failing_row_ends_alone_and_the_rows_beside_it_are_unchanged(engines, model):
    """Three requests submitted together run in the same steps; the middle one's sampling fails (a NaN temperature
    that validation would refuse over HTTP), and it alone ends with an error."""
    ps = prompts(3)
    good = SamplingParams(max_new_tokens=10, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, seed=5)
    steps: list[StepRecord] = []
    engine = engines(max_batch_size=4, on_step=steps.append)

    async def main():
        loop = asyncio.get_running_loop()
        rows = [Request(ps[0], good, frozenset()), Request(ps[1], SamplingParams(temperature=float("nan")),
                                                            frozenset()), Request(ps[2], sampled, frozenset())]
        for r in rows:
            r.attach(loop)
        engine.submit(*rows)
        return await asyncio.gather(*(drain(r) for r in rows))

    first, bad, third = asyncio.run(main())
    assert steps[0].rows == 3  # all three were in the first step
    assert [e.token for e in bad] == [None] and bad[0].finish_reason == "error" and "sampling failed" in bad[0].error
    assert [e.token for e in first[:-1]] == generate_ids(model, [ps[0]], good)[0]
    assert [e.token for e in third[:-1]] == generate_ids(model, [ps[2]], sampled)[0]
    assert first[-1].finish_reason == third[-1].finish_reason == "length"
    assert engine.healthy and engine.stats()["running"] == 0


def test_the_choices_of_one_request_are_submitted_all_or_none(engines, model):
    engine = engines(max_batch_size=1, max_queue=2)

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
def test_repeated_failed_steps_make_the_engine_unhealthy_and_a_good_step_heals_it(engines, model, mode):
    flaky = Flaky(model)
    engine = engines(flaky, max_failed_steps=2)

    async def ask():
        r = Request(prompts(1)[0], SamplingParams(max_new_tokens=3, temperature=0.0), frozenset())
        r.attach(asyncio.get_running_loop())
        engine.submit(r)
        return [e async for e in r.events()]

    flaky.mode = mode
    events = asyncio.run(ask())
    assert [e.token for e in events] == [None] and events[0].finish_reason == "error"
    assert engine.healthy  # one failed step is not yet a broken replica
    asyncio.run(ask())
    assert not engine.healthy and engine.failed_steps == 2
    flaky.mode = None
    events = asyncio.run(ask())
    assert len(events) == 4 and events[-1].finish_reason == "length" and engine.healthy


def test_max_model_len_defaults_to_what_the_kv_memory_budget_holds():
    """One request of max_model_len (and the prefill slack) must fit the rows' part of kv_cache_memory_gb, the rest
    being the prefix cache's; more requests run together as their lengths allow (the rows grow by need)."""
    from ember.errors import EmberError
    from ember.model import preset
    from ember.serve.app import ServeArgs, kv_budget, plan_max_model_len
    from ember.serve.kv import kv_bytes_per_token

    cfg = preset("1b")  # a 131072-token context: 64 KiB of fp32 keys and values per token
    assert kv_bytes_per_token(cfg, 4) == 2 * 16 * 8 * 64 * 4 == 65536
    args = ServeArgs(model_dir="m", max_batch_size=16, prefix_cache_tokens=8192)
    assert kv_budget(cfg, args, 4) == (4 * 2 ** 30 - 8192 * 65536, 8192 * 65536)
    assert plan_max_model_len(cfg, args, 4) == (4 * 2 ** 30 - 8192 * 65536) // 65536 - 128 == 57216
    assert plan_max_model_len(cfg, args.model_copy(update={"kv_cache_memory_gb": 16}), 4) == 131072
    with pytest.raises(EmberError, match=r"max_model_len: one request of 131072 tokens needs 8\.01 GiB of KV cache; "
                                         r"kv_cache_memory_gb is 4\.0, 0\.50 GiB of it the prefix cache's 8192"):
        plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 131072}), 4)
    with pytest.raises(EmberError, match="max_model_len: 200000 is more than the model's context of 131072"):
        plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 200000}), 4)
    with pytest.raises(EmberError, match=r"kv_cache_memory_gb: 0.5 GiB holds 0 tokens of one request .*prefix "
                                         r"cache's 8192 tokens"):
        plan_max_model_len(cfg, args.model_copy(update={"kv_cache_memory_gb": 0.5}), 4)
    assert plan_max_model_len(cfg, args.model_copy(update={"max_model_len": 2048}), 2) == 2048


def test_an_engine_with_max_model_len_ends_requests_there(engines, model):
    engine = engines(max_model_len=20)
    assert engine.rows.max_len == 20 + engine.prefill_chunk and engine.cache is None  # allocated by need

    async def main():
        r = Request(list(range(1, 16)), SamplingParams(max_new_tokens=50, temperature=0.0), frozenset())
        r.attach(asyncio.get_running_loop())
        engine.submit(r)
        return await drain(r)

    events = asyncio.run(main())
    assert len(events) - 1 == 5 and events[-1].finish_reason == "length"  # 15 prompt + 5 new = 20


def run_all(engine: Engine, waves: list[list[Request]]) -> list[list[int]]:
    """Each wave's requests submitted together once the wave before has finished; their tokens, in order."""
    async def main():
        out = []
        for wave in waves:
            for r in wave:
                r.attach(asyncio.get_running_loop())
            engine.submit(*wave)
            out += await asyncio.gather(*(drain_tokens(r.events()) for r in wave))
        return out

    return asyncio.run(main())


def shared_prefix_waves(params_of) -> list[list[Request]]:
    """A 24-token system prompt shared by 5 requests at once; a conversation's second turn (its first turn and answer
    as the prefix); 3 choices of one prompt. `params_of(i)` gives request i's sampling."""
    g = torch.Generator().manual_seed(7)
    system = torch.randint(1, 97, (24,), generator=g).tolist()
    users = [torch.randint(1, 97, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
             for _ in range(5)]
    first = [Request(system + u, params_of(i), frozenset()) for i, u in enumerate(users)]
    turn = system + users[0] + [5, 6, 7, 8, 9, 10, 11, 12]  # (its answer here is fixed text, as a client sends it)
    second = [Request(turn + [13, 14], params_of(5), frozenset())]
    choices = [Request(system + [20, 21, 22], params_of(6 + i), frozenset()) for i in range(3)]
    return [first, [Request(turn, params_of(9), frozenset())], second, choices]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_prefix_caching_gives_the_same_tokens_and_reads_shared_prefixes_once(engines, sampling):
    """Shared system prompts, a later turn of a conversation and n choices of one prompt, with the prefix cache on
    and off: the same tokens, greedy or sampled with seeds. With it on, the requests that follow read their shared
    blocks from the cache (those arriving together wait for the first to compute them)."""
    def params_of(i):
        if sampling == "greedy":
            return SamplingParams(max_new_tokens=10, temperature=0.0)
        return SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i)

    off = run_all(engines(max_batch_size=8, prefill_chunk=8), shared_prefix_waves(params_of))
    cached = engines(max_batch_size=8, prefill_chunk=8, prefix_cache_tokens=512, block_size=4)
    waves = shared_prefix_waves(params_of)
    assert run_all(cached, waves) == off
    first, turn, second, choices = waves
    assert first[0].cached_tokens == 0 and all(r.cached_tokens == 24 for r in first[1:])  # the system prompt
    assert second[0].cached_tokens >= len(turn[0].prompt) - 3  # the whole earlier turn, to its last full block
    assert all(r.cached_tokens == 24 for r in choices)  # the system prompt, for each of the n choices
    stats = cached.stats()
    prompt_tokens = sum(len(r.prompt) for w in waves for r in w)
    hit = sum(r.cached_tokens for w in waves for r in w)
    assert stats["prefix_cache_hit_rate"] == pytest.approx(hit / prompt_tokens, abs=1e-4) and hit > 0


def test_a_cache_salt_shares_blocks_only_with_requests_of_the_same_salt(engines):
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    prompt = prompts(1)[0] * 3
    waves = [[Request(prompt, params, frozenset(), cache_salt=salt)] for salt in (None, "a", "b", "a", None)]
    got = run_all(engines(max_batch_size=2, prefill_chunk=8, prefix_cache_tokens=512, block_size=4), waves)
    assert len(set(map(tuple, got))) == 1  # the same answer whatever the salt
    cached = [w[0].cached_tokens for w in waves]
    assert cached[:3] == [0, 0, 0] and cached[3] == cached[4] >= len(prompt) - 4  # "a" after "a", None after None


def test_eviction_under_a_small_bound_keeps_outputs_right(engines):
    """A prefix cache of 8 tokens (two 4-token blocks) under prompts that each need more: blocks come and go, least
    recently used first, and every output is what it is without a cache."""
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ps = prompts(12)
    waves = [[Request(p, params, frozenset())] for p in ps + ps[::-1]]
    cached = engines(max_batch_size=4, prefill_chunk=8, prefix_cache_tokens=8, block_size=4)
    got = run_all(cached, waves)
    assert got == run_all(engines(max_batch_size=4, prefill_chunk=8), [[Request(p, params, frozenset())]
                                                                       for p in ps + ps[::-1]])
    assert cached.prefix.tokens <= 8 and len(cached.prefix.blocks) <= 2
    assert any(w[0].cached_tokens for w in waves[12:])  # the last prompt again, right after: still cached


def test_the_kv_memory_stays_within_its_budget_under_a_burst_of_long_prompts(engines, model):
    """12 prompts of 40-60 tokens at once with room for about three rows of them: the rows grow by need and never
    past the budget, requests wait for room instead of being refused, and each gets what it gets alone."""
    from ember.serve.kv import kv_bytes_per_token

    per_token = kv_bytes_per_token(model.config, 4)
    budget = 3 * (64 + 8) * per_token
    steps: list[StepRecord] = []
    engine = engines(max_batch_size=8, prefill_chunk=8, kv_cache_bytes=budget, on_step=steps.append)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(1, 97, (int(torch.randint(40, 60, (1,), generator=g)),), generator=g).tolist()
          for _ in range(12)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    [got] = [run_all(engine, [[Request(p, params, frozenset()) for p in ps]])]
    assert got == [generate_ids(model, [p], params)[0] for p in ps]
    assert 0 < engine.rows.peak_bytes <= budget and all(s.kv_cache_bytes <= budget for s in steps)
    assert max(s.rows for s in steps) <= 3 and engine.stats()["kv_cache_bytes"] == 0  # idle again: released
    short = engines(max_batch_size=8, prefill_chunk=8, on_step=steps.append)
    run_all(short, [[Request([1, 2, 3], params, frozenset()) for _ in range(8)]])
    assert short.rows.peak_bytes < short.rows.bytes_for(8, 64 + 8) / 2  # 8 short rows: nothing like 8 full ones


def test_block_names_chain_from_the_start_and_extend_a_known_prefix():
    """A block's name says its tokens and everything before them; extending a prompt's names gives the names of the
    whole sequence, as hashing it afresh does."""
    from ember.serve.kv import block_hashes

    tokens = list(range(1, 19))
    names = block_hashes(tokens, 4)
    assert len(names) == 4 and len(set(names)) == 4  # 4 full blocks; the 2 tokens after them are not a block
    assert block_hashes(tokens, 4, block_hashes(tokens[:9], 4)) == names
    assert block_hashes([9, 9, 9, 9] + tokens[4:], 4)[1] != names[1]  # same tokens, another prefix: another name
