"""Weighted mixtures of datasets: the placement of each sample (proportional at every prefix, no history needed),
the reader over several datasets (deterministic, rank-sliced, resumable on another worker count), and the checks
that refuse datasets that cannot be mixed."""

import json

import numpy as np
import pytest

from ember.config.loader import parse_spec
from ember.data.mixture import Mixture, MixtureReader, dataset_sources, plan_mixture, tokens_by_source
from ember.data.shards import FORMAT, FORMAT_VERSION, ShardWriter
from ember.errors import EmberError
from ember.storage import write_json

ROW = 5


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2], [1, 1, 1, 1, 1], [0.01, 0.99], [1]])
def test_every_prefix_holds_each_source_in_its_share(weights):
    mix = Mixture(weights)
    shares = np.array(weights) / sum(weights)
    levels = int(np.ceil(np.log2(len(weights)))) if len(weights) > 1 else 0
    seen = [0] * len(weights)
    for k in range(3000):
        source, j = mix.locate(k)
        assert j == seen[source]  # the source's own sample numbers come in order, none skipped
        seen[source] += 1
        assert seen == mix.counts(k + 1)
        assert np.abs(np.array(seen) - shares * (k + 1)).max() <= 0.5 * levels + 1e-9, (k, seen)


@pytest.mark.parametrize("weights, sizes", [([0.7, 0.3], [700, 200]), ([0.999, 0.001], [10**6, 5]),
                                            ([0.99, 0.01], [10**5, 10]), ([1] * 8 + [0.01], [10**4] * 8 + [3])])
def test_the_first_source_to_run_out_and_when(weights, sizes):
    mix = Mixture(weights)
    n, source = mix.samples_before_exhausted(sizes)
    assert mix.counts(n)[source] == sizes[source] and mix.counts(n + 1)[source] == sizes[source] + 1
    assert all(c <= size for c, size in zip(mix.counts(n), sizes))


def test_within_each_global_batch_the_sources_are_placed_in_a_seeded_order():
    """Weights 1:1 and 2 ranks: without the window's order, rank 0 would take every sample of source 0. With it,
    each batch of 8 still holds 4 of each, each source's samples still come once each, and the order follows the
    seed."""
    def ranks(seed):
        mix = Mixture([1, 1], seed=seed, window=8)
        placed = [mix.locate(k) for k in range(800)]
        for w in range(100):
            assert sorted(s for s, _ in placed[8 * w: 8 * w + 8]) == [0] * 4 + [1] * 4
        assert sorted(j for s, j in placed if s == 0) == list(range(400))
        return [[s for s, _ in placed[r::2]] for r in range(2)]

    rank0, _ = ranks(0)
    assert 150 < rank0.count(0) < 250  # about half of each
    assert ranks(0) == ranks(0) and ranks(0) != ranks(1)


def test_weights_must_be_positive_and_finite():
    for bad in ([1.0, float("nan")], [1.0, 0.0], [float("inf")], []):
        with pytest.raises(EmberError, match="positive finite"):
            Mixture(bad)


def dataset(root, name: str, first: int, n_rows: int, tokenizer: str = "tok-a", seq_len: int = ROW - 1,
            kind: str = "pretrain"):
    """A dataset whose row i holds the value first + i everywhere."""
    out = root / name
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    writer = ShardWriter(out / "train", "u000000", seq_len + 1, np.dtype(np.uint32), shard_bytes=23 * (seq_len + 1) * 4)
    ids = np.arange(first, first + n_rows, dtype=np.uint32)
    writer.write(np.repeat(ids[:, None], seq_len + 1, axis=1))
    val = ShardWriter(out / "val", "u000000", seq_len + 1, np.dtype(np.uint32), shard_bytes=1 << 20)
    val.write(np.full((3, seq_len + 1), first + 9000, np.uint32))
    write_json(out / "manifest.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "seq_len": seq_len, "dtype": "uint32",
        "vocab_size": 1 << 16, "eos_id": 0, "tokenizer": {"sha256": tokenizer},
        "splits": {"train": {"shards": writer.close(), "rows": n_rows}, "val": {"shards": val.close(), "rows": 3}}})
    return out


def mixed(mix: list[dict], **more) -> tuple[dict, list[dict]]:
    """plan_mixture of a pretraining spec's data.mix, with global batches of 8."""
    data = parse_spec({"kind": "pretrain", "data": {"mix": mix, **more}, "train": {"max_steps": 1},
                       "output": {"dir": "/tmp/unused"}}).data
    return plan_mixture(dataset_sources(data), data.exhausted, "pretrain", 8)


@pytest.fixture()
def two(tmp_path):
    return dataset(tmp_path, "web", 0, 330), dataset(tmp_path, "code", 1000, 100)


def consume(reader, batches: int, batch_size: int, start: int = 0) -> tuple[list[int], int]:
    it, out, consumed = reader.batches(batch_size, start), [], start
    for _ in range(batches):
        batch, consumed = next(it)
        out.extend(int(r[0]) for r in batch)
    return out, consumed


def test_a_mixture_reader_is_deterministic_sliced_and_resumes_on_another_worker_count(two):
    web, code = two
    record, _ = mixed([{"dir": str(web), "weight": 3}, {"dir": str(code), "weight": 1}], exhausted="recycle")
    assert [s["name"] for s in record["sources"]] == ["web", "code"] and record["samples"] is None
    straight, _ = consume(MixtureReader(record, seed=1), 60, 8)  # 480 samples: code (100 rows) recycles
    assert straight == consume(MixtureReader(record, seed=1), 60, 8)[0]
    assert straight != consume(MixtureReader(record, seed=2), 60, 8)[0]
    from_code = [v for v in straight if v >= 1000]
    assert len(from_code) == Mixture([3, 1]).counts(480)[1] == 120
    assert sorted(from_code[:100]) == list(range(1000, 1100))  # every row of a source once before it recycles
    # 2 workers for 10 steps of 8, then 3 workers: the same global order, nothing repeated or skipped.
    before = [consume(MixtureReader(record, seed=1, rank=r, world_size=2), 10, 4) for r in range(2)]
    consumed = before[0][1]
    after = [consume(MixtureReader(record, seed=1, rank=r, world_size=3), 5, 4, start=consumed) for r in range(3)]
    assert consumed == 80
    interleaved = [before[k % 2][0][k // 2] for k in range(80)] + [after[k % 3][0][k // 3] for k in range(60)]
    assert interleaved == straight[:140]
    assert tokens_by_source(record, 480, ROW - 1) == {"web": 360 * (ROW - 1), "code": 120 * (ROW - 1)}


def test_a_mixture_that_stops_ends_before_a_source_repeats(two):
    web, code = two
    record, _ = mixed([{"dir": str(web), "weight": 3}, {"dir": str(code), "weight": 1}])
    assert record["exhausted"] == "stop" and record["runs_out"] == "code"
    n = record["samples"]
    assert Mixture([3, 1]).counts(n)[1] == 100 < Mixture([3, 1]).counts(n + 1)[1] and 396 <= n <= 404
    taken, _ = consume(MixtureReader(record), n // 8, 8)
    assert len(set(taken)) == len(taken)  # no row twice
    val = MixtureReader(record, "val")  # validation recycles: it is read from its start at each evaluation
    assert set(consume(val, 4, 5)[0]) == {9000, 10000}


def test_datasets_that_cannot_be_mixed_are_refused_naming_them(tmp_path, two):
    web, _ = two
    other_tok = dataset(tmp_path, "books", 0, 50, tokenizer="tok-b")
    longer = dataset(tmp_path, "math", 0, 50, seq_len=8)
    chats = dataset(tmp_path, "chats", 0, 50, kind="sft")
    with pytest.raises(EmberError, match="sources 'web' and 'books' have different tokenizers \\(sha256 tok-a and "
                                         "tok-b\\)"):
        mixed([{"dir": str(web), "weight": 1}, {"dir": str(other_tok), "weight": 1}])
    with pytest.raises(EmberError, match="sources 'web' and 'math' have rows of 4 and 8 tokens"):
        mixed([{"dir": str(web), "weight": 1}, {"dir": str(longer), "weight": 1}])
    with pytest.raises(EmberError, match="source 'chats' .* is a 'sft' dataset"):
        mixed([{"dir": str(web), "weight": 1}, {"dir": str(chats), "weight": 1}])
    tiny = dataset(tmp_path, "tiny", 0, 1)
    with pytest.raises(EmberError, match="source 'tiny' runs out after 3 samples, less than one step"):
        mixed([{"dir": str(web), "weight": 1}, {"dir": str(tiny), "weight": 1}])


@pytest.mark.parametrize("data, message", [
    ({"dir": "a", "mix": [{"dir": "b", "weight": 1}]}, "set exactly one of data.dir and data.mix"),
    ({}, "set exactly one of data.dir and data.mix"),
    ({"mix": [{"dir": "b", "weight": 0}]}, "data.mix.0.weight"),
    ({"mix": [{"dir": "b", "weight": float("nan")}]}, "data.mix.0.weight"),
    ({"mix": [{"dir": "b", "weight": 1, "wieght": 2}]}, "wieght"),
    ({"mix": [{"dir": "x/web", "weight": 1}, {"dir": "y/web", "weight": 1}]}, "sources named 'web' more than once"),
    ({"dir": "a", "exhausted": "stop"}, "data.exhausted applies to data.mix"),
    ({"mix": [{"dir": "b", "weight": 1}], "exhausted": "again"}, "data.exhausted"),
])
def test_bad_mixture_specs_are_refused_naming_the_key(data, message):
    with pytest.raises(EmberError, match=message):
        parse_spec({"kind": "pretrain", "data": data, "train": {"max_steps": 1}, "output": {"dir": "/tmp/x"}})


def test_a_single_dataset_spec_keeps_its_content_and_so_its_runs_identity():
    spec = parse_spec({"kind": "pretrain", "data": {"dir": "/d"}, "train": {"max_steps": 1},
                       "output": {"dir": "/tmp/x"}})
    assert json.loads(spec.model_dump_json())["data"] == {"dir": "/d"}
