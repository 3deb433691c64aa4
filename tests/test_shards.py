"""The shard format's writer (atomic, rolling) and the reader training uses (deterministic, sliced, resumable)."""

import json
import re

import numpy as np
import pytest

from ember.data.shards import FORMAT, FORMAT_VERSION, ShardReader, ShardWriter
from ember.errors import EmberError
from ember.storage import write_json

ROW = 9


def make_dataset(tmp_path, n_rows: int, shard_rows: int = 37):
    """A dataset whose row i holds the value i everywhere, spread over several shards and record batches."""
    (tmp_path / "train").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    dtype = np.dtype(np.uint32)
    writer = ShardWriter(tmp_path / "train", "u000000", ROW, dtype, shard_bytes=shard_rows * ROW * 4)
    for start in range(0, n_rows, 10):
        ids = np.arange(start, min(start + 10, n_rows), dtype=dtype)
        writer.write(np.repeat(ids[:, None], ROW, axis=1))
    shards = writer.close()
    write_json(tmp_path / "manifest.json", {
        "format": FORMAT, "format_version": FORMAT_VERSION, "seq_len": ROW - 1, "dtype": "uint32",
        "splits": {"train": {"shards": shards}, "val": {"shards": []}}})
    return shards


def test_writer_rolls_over_and_only_completed_shards_have_final_names(tmp_path):
    writer = ShardWriter(tmp_path, "u000007", ROW, np.uint16, shard_bytes=2000 * ROW * 2)
    writer.write(np.ones((1500, ROW), np.uint16))
    visible = sorted(p.name for p in tmp_path.iterdir())
    assert visible == [".tmp-u000007-000.arrow"]  # in progress: only a temporary name
    writer.write(np.ones((1000, ROW), np.uint16))
    shards = writer.close()
    assert [s["rows"] for s in shards] == [2000, 500]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u000007-000.arrow", "u000007-001.arrow"]
    assert shards[0]["tokens"] == 2000 * ROW


def test_reader_memory_maps_rows_in_file_order(tmp_path):
    make_dataset(tmp_path, 500)
    reader = ShardReader(tmp_path)
    assert len(reader) == 500
    assert [int(reader.row(i)[0]) for i in (0, 36, 37, 499)] == [0, 36, 37, 499]
    assert reader.row(123).tolist() == [123] * ROW
    assert not reader.row(5).flags.owndata  # a view into the mapped file, not a copy


def test_epoch_order_is_a_seeded_permutation(tmp_path):
    make_dataset(tmp_path, 300)
    a, b = ShardReader(tmp_path, seed=1), ShardReader(tmp_path, seed=1)
    assert sorted(a.epoch_order(0).tolist()) == list(range(300))
    assert a.epoch_order(0).tolist() == b.epoch_order(0).tolist()
    assert a.epoch_order(0).tolist() != a.epoch_order(1).tolist()
    assert a.epoch_order(0).tolist() != ShardReader(tmp_path, seed=2).epoch_order(0).tolist()


def consume(reader: ShardReader, batches: int, batch_size: int, start: int = 0):
    it = reader.batches(batch_size, start)
    rows, consumed = [], start
    for _ in range(batches):
        batch, consumed = next(it)
        rows.extend(int(r[0]) for r in batch)
    return rows, consumed


BLOCKS = [pytest.param({}, id="one-block"), pytest.param({"block_bytes": 4000}, id="blocks")]


@pytest.mark.parametrize("blocks", BLOCKS)
def test_ranks_take_disjoint_slices_that_cover_the_global_order(tmp_path, blocks):
    make_dataset(tmp_path, 240)
    single, _ = consume(ShardReader(tmp_path, seed=3, **blocks), 60, 4)  # 240 samples = one epoch
    per_rank = [consume(ShardReader(tmp_path, seed=3, rank=r, world_size=3, **blocks), 20, 4)[0] for r in range(3)]
    assert sorted(single) == list(range(240))
    assert sorted(sum(per_rank, [])) == list(range(240))
    assert all(not set(per_rank[i]) & set(per_rank[j]) for i in range(3) for j in range(i + 1, 3))
    assert per_rank[1][:3] == [single[1], single[4], single[7]]  # rank r takes global samples k ≡ r (mod W)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_resume_at_an_exact_sample_count_continues_the_same_order(tmp_path, blocks):
    make_dataset(tmp_path, 100)
    straight, _ = consume(ShardReader(tmp_path, seed=4, **blocks), 30, 8)  # crosses an epoch boundary (240 > 100)
    first, consumed = consume(ShardReader(tmp_path, seed=4, **blocks), 13, 8)
    rest, _ = consume(ShardReader(tmp_path, seed=4, **blocks), 17, 8, start=consumed)
    assert consumed == 104 and first + rest == straight


@pytest.mark.parametrize("blocks", BLOCKS)
def test_resume_with_another_number_of_ranks_repeats_and_skips_nothing(tmp_path, blocks):
    make_dataset(tmp_path, 1000)
    reader = ShardReader(tmp_path, seed=5, **blocks)
    global_order = [reader.sample_row(k) for k in range(360)]
    # 2 ranks x 3 steps x batch 20 = 120 samples, then 3 ranks x 4 steps x batch 20 = 240 more.
    before = [consume(ShardReader(tmp_path, seed=5, rank=r, world_size=2, **blocks), 3, 20) for r in range(2)]
    consumed = before[0][1]
    assert consumed == before[1][1] == 120
    after = [consume(ShardReader(tmp_path, seed=5, rank=r, world_size=3, **blocks), 4, 20, start=consumed)
             for r in range(3)]
    seen = sum((rows for rows, _ in before + after), [])
    assert len(seen) == len(set(seen)) == 360
    assert sorted(seen) == sorted(global_order)
    assert after[0][0][0] == global_order[120] and after[2][0][0] == global_order[122]


def test_a_split_larger_than_a_block_is_shuffled_a_block_of_shards_at_a_time(tmp_path):
    """Past `block_bytes`, an epoch is a permutation of the shards cut into blocks, each block's rows permuted:
    every row once per epoch, and a stretch of samples the size of a block touches only that block's shards."""
    shards = make_dataset(tmp_path, 1000)  # 28 shards of 37 rows
    per_block = 3
    reader = ShardReader(tmp_path, seed=6, block_bytes=per_block * max(s["bytes"] for s in shards))
    order = reader.epoch_order(0)
    assert sorted(order.tolist()) == list(range(1000)) and order.tolist() != reader.epoch_order(1).tolist()
    shard_of = [row // 37 for row in order.tolist()]
    first_block = set(shard_of[:per_block * 37 - 37])  # fewer rows than a block holds
    assert len(first_block) <= per_block
    assert order.tolist() != sorted(order.tolist())  # rows are mixed within the block
    one_block = ShardReader(tmp_path, seed=6)  # the whole split in one block: a permutation of every row
    assert len({row // 37 for row in one_block.epoch_order(0)[:100].tolist()}) > per_block


def bucket_dataset(tmp_path, s3_server, n_rows: int):
    from ember import storage

    shards = make_dataset(tmp_path / "local", n_rows)
    bucket, endpoint, _ = s3_server
    uri = f"s3://{bucket}/stream-{tmp_path.name}?endpoint_override={endpoint}&scheme=http"
    storage.upload_dir(tmp_path / "local", uri)
    return shards, uri


def cached_bytes(cache_dir) -> int:
    """The bytes of the cached shards (a download in progress included), read while a fetch may be moving them."""
    total = 0
    for p in (cache_dir / "files").glob("*/*.arrow"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_a_bucket_split_streams_through_the_node_cache_within_its_budget(tmp_path, s3_server, monkeypatch):
    """A split 3x the node cache's budget: the same samples as from a local copy, in the same order, fetched as
    they are reached (nothing before the first sample), the cache never above its budget."""
    shards, uri = bucket_dataset(tmp_path, s3_server, 1000)
    size = max(s["bytes"] for s in shards)
    budget = 9 * size  # the split: 28 shards
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBER_CACHE_BYTES", str(budget))
    blocks = {"block_bytes": 3 * size}
    local = consume(ShardReader(tmp_path / "local", seed=7, **blocks), 30, 40)[0]  # 1200 samples: 1.2 epochs
    reader = ShardReader(uri, seed=7, **blocks)
    assert not (tmp_path / "cache" / "files").exists()  # nothing fetched yet
    it, streamed, peak = reader.batches(40), [], 0
    for _ in range(30):
        batch, _ = next(it)
        streamed.extend(int(r[0]) for r in batch)
        peak = max(peak, cached_bytes(tmp_path / "cache"))
    reader.close()
    assert streamed == local
    assert 3 * size < peak <= budget  # more than a block (the next one comes ahead), never over the budget
    # 2 ranks for 5 steps of 40, then 3 ranks from there: the same global order, streamed.
    before = [consume(ShardReader(uri, seed=7, rank=r, world_size=2, **blocks), 5, 20)[0] for r in range(2)]
    after = [consume(ShardReader(uri, seed=7, rank=r, world_size=3, **blocks), 4, 20, start=200)[0] for r in range(3)]
    assert [before[k % 2][k // 2] for k in range(200)] + [after[k % 3][k // 3] for k in range(240)] == local[:440]


def test_a_bucket_shard_that_is_missing_or_changed_stops_the_reader_naming_it(tmp_path, s3_server, monkeypatch):
    shards, uri = bucket_dataset(tmp_path, s3_server, 200)
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    _, _, client = s3_server
    bucket = uri.split("/")[2]
    prefix = f"stream-{tmp_path.name}/train"
    client.put_object(Bucket=bucket, Key=f"{prefix}/{shards[1]['file']}", Body=b"not the shard")
    client.delete_object(Bucket=bucket, Key=f"{prefix}/{shards[2]['file']}")
    reader = ShardReader(uri, seed=0)
    with pytest.raises(EmberError, match=rf"{shards[1]['file']}: the object holds 13 bytes"):
        reader.row(shards[1]["rows"])  # the first row of the changed shard
    with pytest.raises(EmberError, match=rf"shard listed in the manifest is missing: .*{shards[2]['file']}"):
        reader.row(2 * shards[1]["rows"])
    assert reader.row(0).tolist() == [0] * ROW  # the shards that are whole still serve


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(EmberError, match="no manifest.json"):
        ShardReader(tmp_path)
    shards = make_dataset(tmp_path, 50)
    (tmp_path / "train" / shards[0]["file"]).unlink()
    with pytest.raises(EmberError, match="shard listed in the manifest is missing: .*u000000-000.arrow"):
        ShardReader(tmp_path)
    with pytest.raises(EmberError, match="unknown split 'test'"):
        ShardReader(tmp_path, "test")
    with pytest.raises(EmberError, match="rank 2 is outside world size 2"):
        ShardReader(tmp_path, rank=2, world_size=2)


def test_a_manifest_shard_name_outside_the_split_is_refused(tmp_path):
    """A manifest naming `../../x.arrow` (or an absolute path) would read a file outside the dataset."""
    make_dataset(tmp_path / "data", 50)
    outside = tmp_path / "outside.arrow"
    (tmp_path / "data" / "train" / "u000000-000.arrow").rename(outside)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    for bad in ("../../outside.arrow", str(outside)):
        manifest["splits"]["train"]["shards"][0]["file"] = bad
        (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(EmberError, match=rf"manifest.json: refusing '{re.escape(bad)}': not a plain relative path"):
            ShardReader(tmp_path / "data")


def test_streamed_datasets_that_cannot_fit_the_node_cache_are_refused_before_the_run(tmp_path, s3_server,
                                                                                     monkeypatch):
    from ember.data.shards import check_cache_budget

    shards, uri = bucket_dataset(tmp_path, s3_server, 1000)
    size = max(s["bytes"] for s in shards)
    monkeypatch.setenv("EMBER_CACHE_BYTES", str(5 * size))
    check_cache_budget([uri, str(tmp_path / "local")], 2 * size)  # two blocks of 2 shards fit; a local dir needs none
    with pytest.raises(EmberError, match=r"need up to .* MiB of the node cache at once \(two blocks of "
                                         r"data.shuffle_block_bytes.*raise EMBER_CACHE_BYTES or lower "
                                         r"data.shuffle_block_bytes"):
        check_cache_budget([uri], 3 * size)
