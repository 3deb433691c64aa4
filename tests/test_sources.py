"""Sources: formats, compression, byte-range units, bad records, Hugging Face dataset dirs, globs, and remote reading.
No Ray needed, but for one tokenize job on a Hugging Face dataset."""

from __future__ import annotations

import bz2
import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import sentences
from ember.config.specs import SourceSpec
from ember.data.chat import BadRecord, to_messages
from ember.data.sources import RecordReader, SkipLog, glob_match, plan_units, resolve_inputs, source_fingerprint
from ember.data.steps import read_texts
from ember.errors import EmberError

COMPRESS = {"gz": gzip.compress, "zst": lambda b: zstandard.ZstdCompressor().compress(b), "bz2": bz2.compress}


def read_all(inputs, **options) -> tuple[list[str], SkipLog, int]:
    """Every document of every unit, in order; also the SkipLog and the number of units."""
    source = SourceSpec(inputs=[str(i) for i in inputs], **options)
    skips = SkipLog(strict=source.strict)
    units = plan_units(resolve_inputs(source), source)
    read = read_texts(source, skips)
    return [doc for unit in units for doc in read(unit)], skips, len(units)


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_text_one_document_per_file_or_per_paragraph(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n\n\n\nThird.\n")
    (tmp_path / "b.txt").write_text("Only one.")
    docs, _, _ = read_all([tmp_path])
    assert docs == ["First paragraph\nstill first.\n\nSecond one.\n\n\n\nThird.\n", "Only one."]
    docs, _, _ = read_all([tmp_path], text_unit="paragraph")
    assert docs == ["First paragraph\nstill first.", "Second one.", "Third.", "Only one."]


def test_jsonl_json_array_and_parquet_with_named_fields(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl([{"body": "one"}, {"body": "two"}]))
    (tmp_path / "b.json").write_text(json.dumps([{"body": "three"}, {"body": "four"}], indent=1))
    pq.write_table(pa.table({"content": ["five", "six"], "n": [1, 2]}), tmp_path / "c.parquet")
    docs, skips, _ = read_all([tmp_path], field="body", column="content")
    assert docs == ["one", "two", "three", "four", "five", "six"]
    assert skips.skipped == {}


@pytest.mark.parametrize("ext", sorted(COMPRESS))
def test_compressed_text_formats_read_like_plain_ones(tmp_path, ext):
    records = [{"text": t} for t in sentences(300)]
    (tmp_path / f"a.jsonl.{ext}").write_bytes(COMPRESS[ext](jsonl(records)))
    (tmp_path / f"b.txt.{ext}").write_bytes(COMPRESS[ext](b"para one\n\npara two\n"))
    docs, skips, _ = read_all([tmp_path], text_unit="paragraph")
    assert docs == [r["text"] for r in records] + ["para one", "para two"]
    assert skips.skipped == {}


def _paragraph_corpus(rng: random.Random) -> str:
    parts = []
    for text in sentences(400, seed=3):
        lines = [text[i:i + 37] for i in range(0, len(text), 37)]
        newline = "\r\n" if rng.random() < 0.2 else "\n"
        gap = newline * rng.randint(1, 3)
        trailing = " \n" if rng.random() < 0.1 else ""  # drawn after the gap, as the corpus always was
        parts.append(newline.join(lines) + newline + gap + trailing)
    return "".join(parts)


@pytest.mark.parametrize("unit_bytes", [4096, 5003, 9999])
def test_byte_range_units_read_each_document_exactly_once(tmp_path, unit_bytes):
    rng = random.Random(unit_bytes)
    (tmp_path / "p.txt").write_text(_paragraph_corpus(rng))
    (tmp_path / "r.jsonl").write_bytes(jsonl([{"text": t} for t in sentences(500, seed=4)]))
    whole_p, _, n1 = read_all([tmp_path / "p.txt"], text_unit="paragraph", unit_bytes=1 << 30)
    split_p, _, n2 = read_all([tmp_path / "p.txt"], text_unit="paragraph", unit_bytes=unit_bytes)
    assert n1 == 1 and n2 > 5
    assert split_p == whole_p and len(whole_p) == 400
    whole_j, _, _ = read_all([tmp_path / "r.jsonl"], unit_bytes=1 << 30)
    split_j, _, n3 = read_all([tmp_path / "r.jsonl"], unit_bytes=unit_bytes)
    assert n3 > 5 and split_j == whole_j and len(whole_j) == 500


def test_parquet_row_groups_become_units(tmp_path):
    texts = sentences(2000, seed=5)
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet", row_group_size=100)
    docs, _, units = read_all([tmp_path / "t.parquet"], unit_bytes=8192)
    assert units > 3 and docs == texts


def test_small_files_are_grouped_into_units(tmp_path):
    for i in range(30):
        (tmp_path / f"{i:02d}.txt").write_text(f"document number {i}")
    docs, _, units = read_all([tmp_path], unit_bytes=4096)
    assert units == 1 and docs == [f"document number {i}" for i in range(30)]


BAD = [
    b'{"text": "good one"}',
    b'{"text": "broken',
    b'["not", "an", "object"]',
    b'{"title": "no text field"}',
    b'{"text": 42}',
    b"",
    b'{"text": "good two"}',
    b'{"text": "half a pair \\ud83d here"}',
]


def test_bad_jsonl_records_are_skipped_and_counted_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD) + b"\n")
    docs, skips, _ = read_all([path])
    assert docs == ["good one", "good two"]
    assert skips.skipped == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1, "wrong_type": 1,
                             "lone_surrogate": 1}
    assert skips.examples[0].startswith(f"{path}:2: malformed JSON")
    assert [e.split(": ")[0] for e in skips.examples] == [f"{path}:{n}" for n in (2, 3, 4, 5, 8)]
    assert "missing field 'text'" in skips.examples[2] and "is int, expected a string" in skips.examples[3]


def test_line_numbers_are_right_in_later_byte_ranges(tmp_path):
    path = tmp_path / "late.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in sentences(400, seed=6)]
    lines[350] = b"{oops"
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, skips, units = read_all([path], unit_bytes=4096)
    assert units > 3 and len(docs) == 399
    assert skips.examples == [f"{path}:351: malformed JSON (Expecting property name enclosed in double quotes "
                              f"at column 2)"]


def test_strict_fails_on_the_first_bad_record_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD) + b"\n")
    with pytest.raises(EmberError, match=rf"{path}:2: malformed JSON .*strict"):
        read_all([path], strict=True)


def test_empty_file_is_counted(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.txt").write_bytes(b"")
    docs, skips, _ = read_all([tmp_path])
    assert docs == [] and skips.skipped == {"empty_file": 2}
    assert skips.examples[0] == f"{tmp_path / 'empty.jsonl'}: empty file"


def test_undecodable_bytes_are_replaced_or_skipped_by_option(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "fine"}\n')
    docs, skips, _ = read_all([path])
    assert docs == ["caf\ufffd au lait", "fine"] and skips.repaired == {"decode_replaced": 1}
    docs, skips, _ = read_all([path], on_decode_error="skip")
    assert docs == ["fine"] and skips.skipped == {"undecodable": 1}
    assert skips.examples == [f"{path}:1: invalid UTF-8 at byte 13"]
    (tmp_path / "x.txt").write_bytes(b"bad \xff byte")
    docs, skips, _ = read_all([tmp_path / "x.txt"], on_decode_error="skip")
    assert docs == [] and skips.examples == [f"{tmp_path / 'x.txt'}: invalid UTF-8 at byte 4"]


@pytest.mark.parametrize("ext", sorted(COMPRESS))
def test_truncated_compressed_file_is_reported_by_name_and_earlier_documents_kept(tmp_path, ext):
    records = [{"text": t} for t in sentences(20000, seed=7)]
    blob = COMPRESS[ext](jsonl(records))
    path = tmp_path / f"cut.jsonl.{ext}"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    (tmp_path / "after.jsonl").write_bytes(jsonl([{"text": "next file still read"}]))
    docs, skips, _ = read_all([path, tmp_path / "after.jsonl"])
    assert skips.skipped == {"truncated": 1}
    assert skips.examples[0].startswith(f"{path}: compressed file is truncated or corrupt")
    assert docs[-1] == "next file still read"
    kept = docs[:-1]
    assert kept == [r["text"] for r in records[: len(kept)]]  # what was read before the cut is intact
    assert len(kept) > 1000  # 7.5 MB of text: the cut falls after many whole blocks, bz2's 900 kB ones too
    with pytest.raises(EmberError, match=rf"{path}: compressed file is truncated"):
        read_all([path], strict=True)


def test_a_decompression_bomb_is_skipped_with_a_reason_and_the_other_files_read(tmp_path, monkeypatch):
    from ember.data import sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 4 << 20)  # the cap, small here: the mechanism is the same
    doc = b"a" * (16 << 20)  # 16 MiB of one byte: a few kB compressed
    (tmp_path / "bomb.txt.gz").write_bytes(gzip.compress(doc, 1))
    (tmp_path / "bomb.jsonl.zst").write_bytes(COMPRESS["zst"](b'{"text": "' + doc + b'"}\n'))
    (tmp_path / "lines.txt.bz2").write_bytes(bz2.compress(b"a\n" * (4 << 20)))  # one paragraph of 8 MiB
    (tmp_path / "ok.jsonl").write_bytes(jsonl([{"text": "still read"}]))
    files = [tmp_path / n for n in ("bomb.txt.gz", "bomb.jsonl.zst", "ok.jsonl")]
    docs, skips, _ = read_all(files)
    assert docs == ["still read"] and skips.skipped == {"too_large": 2}
    assert skips.examples[0].startswith(f"{files[0]}: a document of more than 4 MiB")
    docs, skips, _ = read_all([tmp_path / "lines.txt.bz2", tmp_path / "ok.jsonl"], text_unit="paragraph")
    assert docs == ["still read"] and skips.skipped == {"too_large": 1}


def test_missing_and_unreadable_inputs_fail_naming_the_path(tmp_path):
    with pytest.raises(EmberError, match=rf"input not found: {tmp_path / 'nope.txt'}"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path / "nope.txt")]))
    with pytest.raises(EmberError, match="matched no readable files"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path / "*.jsonl")]))
    (tmp_path / "notes.docx").write_bytes(b"x")
    with pytest.raises(EmberError, match="holds no files of a known format"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path)]))
    with pytest.raises(EmberError, match=r"notes.docx: cannot tell the format .*source.format"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path / "notes.docx")]))
    with pytest.raises(EmberError, match="unknown built-in corpus 'builtin:python-doc'"):
        resolve_inputs(SourceSpec(inputs=["builtin:python-doc"]))


def test_globs_directories_and_file_uris_resolve_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden.txt").write_text("hidden")
    for name in ("b.txt", "a.txt", "sub/c.txt", "skip.bin"):
        (tmp_path / name).write_text(name)
    by_dir = [f.path for f in resolve_inputs(SourceSpec(inputs=[str(tmp_path)]))]
    assert by_dir == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")]
    by_glob = [f.path for f in resolve_inputs(SourceSpec(inputs=[str(tmp_path / "*.txt")]))]
    assert by_glob[:2] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    docs, _, _ = read_all([f"file://{tmp_path}/a.txt"])
    assert docs == ["a.txt"]


def test_s3_compatible_server_on_loopback(tmp_path, s3_server):
    """Reads plain and compressed objects from a real S3 API (moto's server on 127.0.0.1)."""
    bucket, endpoint, client = s3_server
    client.put_object(Bucket=bucket, Key="corpus/a.jsonl", Body=jsonl([{"text": "remote one"}, {"text": "remote two"}]))
    client.put_object(Bucket=bucket, Key="corpus/b.txt.gz", Body=gzip.compress(b"remote three"))
    client.put_object(Bucket=bucket, Key="other/c.txt", Body=b"not selected")
    query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    docs, skips, _ = read_all([f"s3://{bucket}/corpus{query}"])
    assert docs == ["remote one", "remote two", "remote three"] and skips.skipped == {}
    docs, _, _ = read_all([f"s3://{bucket}/corpus/*.jsonl{query}"])
    assert docs == ["remote one", "remote two"]
    with pytest.raises(EmberError, match=rf"input not found: s3://{bucket}/missing.jsonl$"):
        resolve_inputs(SourceSpec(inputs=[f"s3://{bucket}/missing.jsonl{query}"]))


# ---------------------------------------------------------------- Hugging Face datasets dirs, globs


@pytest.fixture
def save_hf(monkeypatch):
    """Writes a real `save_to_disk` dir with `datasets` (tests only; Ember reads it with pyarrow alone), in record
    batches of 100 rows so that a small file already holds several: `save(path, {col: values})` for a Dataset,
    `save(path, {split: {col: values}})` for a DatasetDict."""
    import datasets

    datasets.disable_progress_bars()
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 100)

    def save(path, data: dict, num_shards: int | None = None):
        if all(isinstance(v, dict) for v in data.values()):
            datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in data.items()}).save_to_disk(str(path))
        else:
            datasets.Dataset.from_dict(data).save_to_disk(str(path), num_shards=num_shards)
        return path

    return save


def test_hf_dataset_is_read_in_state_json_order_and_split_by_record_batches(tmp_path, save_hf):
    texts = sentences(600, seed=8)
    path = save_hf(tmp_path / "ds", {"text": texts, "n": list(range(600))}, num_shards=2)
    files = resolve_inputs(SourceSpec(inputs=[str(path)]))
    assert [(f.fmt, f.path) for f in files] == [("hf", str(path / f"data-0000{i}-of-00002.arrow")) for i in (0, 1)]
    docs, skips, units = read_all([path], unit_bytes=1 << 30)
    assert docs == texts and units == 1 and skips.skipped == {}
    split, _, units = read_all([path], unit_bytes=40_000)  # a batch of 100 rows is about 36 kB
    assert split == texts and units >= 4
    state = json.loads((path / "state.json").read_text())
    state["_data_files"].reverse()
    (path / "state.json").write_text(json.dumps(state))
    docs, _, _ = read_all([path], unit_bytes=40_000)
    assert docs == texts[300:] + texts[:300]


def test_hf_bad_rows_and_columns_are_skipped_with_file_and_row(tmp_path, save_hf):
    texts = sentences(500, seed=9)
    texts[420] = None
    path = save_hf(tmp_path / "ds", {"text": texts, "n": list(range(500))})
    arrow = path / "data-00000-of-00001.arrow"
    docs, skips, units = read_all([path], unit_bytes=40_000)
    assert units == 3 and len(docs) == 499 and skips.skipped == {"wrong_type": 1}  # row 420: in the third
    assert skips.examples == [f"{arrow}:row 420: column 'text' is null, expected a string"]
    docs, skips, _ = read_all([path], column="body")
    assert docs == [] and skips.examples == [f"{arrow}: no column 'body'; has: text, n"]
    with pytest.raises(EmberError, match=rf"{arrow}:row 420: column 'text' is null, .*strict"):
        read_all([path], strict=True, unit_bytes=40_000)
    blob = arrow.read_bytes()
    arrow.write_bytes(blob[: len(blob) // 2])  # a cut file: the rows before the cut are kept, the rest reported
    docs, skips, _ = read_all([path], unit_bytes=1 << 30)
    assert 100 <= len(docs) < 300 and docs == [t for t in texts[: len(docs)]]
    assert skips.skipped == {"unreadable": 1}
    assert skips.examples[0].startswith(f"{arrow}:row {len(docs)}: not a readable Arrow stream")


def test_hf_dataset_dict_reads_the_chosen_split_and_names_the_others(tmp_path, save_hf):
    train, test = sentences(30, seed=10), sentences(5, seed=11)
    path = save_hf(tmp_path / "dd", {"train": {"text": train}, "test": {"text": test}})
    assert read_all([path])[0] == train
    assert read_all([path], split="test")[0] == test
    assert read_all([path / "test"])[0] == test  # the split's own directory is a Dataset
    with pytest.raises(EmberError, match="split: test chooses the split of a Hugging Face DatasetDict input, and no "
                                         "input is one"):
        resolve_inputs(SourceSpec(inputs=[str(path / "test")], split="test"))
    assert read_all([path], format="hf")[0] == train
    with pytest.raises(EmberError, match=rf"{path} is a Hugging Face DatasetDict without a split 'validation'; its "
                                         r"splits: train, test"):
        resolve_inputs(SourceSpec(inputs=[str(path)], split="validation"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("text")
    with pytest.raises(EmberError, match=rf"{tmp_path / 'plain'} is not a Hugging Face dataset directory"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path / "plain")], format="hf"))
    with pytest.raises(EmberError, match=rf"input not found: {tmp_path / 'nope'}"):
        resolve_inputs(SourceSpec(inputs=[str(tmp_path / "nope")], format="hf"))
    (path / "test" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(EmberError, match=rf"{path / 'test'}/data-00000-of-00001.arrow: listed in state.json but "
                                         "missing"):
        resolve_inputs(SourceSpec(inputs=[str(path)], split="test"))


def test_a_rewritten_arrow_file_changes_the_fingerprint(tmp_path, save_hf):
    path = save_hf(tmp_path / "ds", {"text": sentences(50, seed=12)})
    source = SourceSpec(inputs=[str(path)])
    before = source_fingerprint(resolve_inputs(source))
    assert source_fingerprint(resolve_inputs(source)) == before
    save_hf(tmp_path / "other", {"text": sentences(50, seed=13)})
    (path / "data-00000-of-00001.arrow").write_bytes((tmp_path / "other" / "data-00000-of-00001.arrow").read_bytes())
    assert source_fingerprint(resolve_inputs(source)) != before


@pytest.mark.parametrize("pattern, path, matches", [
    ("d/*.parquet", "d/a.parquet", True),
    ("d/*.parquet", "d/x/a.parquet", False),  # a star stays within one directory
    ("d/**/*.parquet", "d/a.parquet", True),  # ** is any number of directories, none included
    ("d/**/*.parquet", "d/x/y/a.parquet", True),
    ("d/**", "d/x/a.jsonl", True),
    ("d/x*/**/?.parquet", "d/x1/y/a.parquet", True),
    ("d/x*/**/?.parquet", "d/y/a.parquet", False),
])
def test_glob_patterns_match_as_a_shell_does(pattern, path, matches):
    assert glob_match(pattern, path) is matches


def _glob_tree(root, write) -> list[str]:
    """Parquet files at three depths and a JSONL beside them; returns the Parquet texts in path order."""
    texts = []
    for rel in ("a.parquet", "x/b.parquet", "x/y/c.parquet"):
        texts.append(f"document {rel}")
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": [texts[-1]]}), buf)
        write(f"{root}/{rel}", buf.getvalue().to_pybytes())
    write(f"{root}/x/notes.jsonl", jsonl([{"text": "not parquet"}]))
    return texts


def test_recursive_globs_local_and_on_s3_and_an_hf_dir_on_s3(tmp_path, s3_server, save_hf):
    from ember import storage

    def write_local(path, data):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)

    texts = _glob_tree("data", write_local)
    assert read_all([tmp_path / "data/**/*.parquet"])[0] == texts
    assert read_all([tmp_path / "data/*.parquet"])[0] == texts[:1]
    assert read_all([tmp_path / "data/x/**/*.parquet"])[0] == texts[1:]
    bucket, endpoint, client = s3_server
    query = f"?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    _glob_tree("web", lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data))
    assert read_all([f"s3://{bucket}/web/**/*.parquet{query}"])[0] == texts
    assert read_all([f"s3://{bucket}/web/*.parquet{query}"])[0] == texts[:1]
    train = sentences(300, seed=14)
    storage.upload_dir(save_hf(tmp_path / "dd", {"train": {"text": train}, "test": {"text": ["held out"]}}),
                       f"s3://{bucket}/hf/dd{query}")
    docs, skips, units = read_all([f"s3://{bucket}/hf/dd{query}"], unit_bytes=20_000)
    assert docs == train and units > 2 and skips.skipped == {}
    with pytest.raises(EmberError, match=rf"s3://{bucket}/hf/dd is a Hugging Face DatasetDict without a split "
                                         r"'dev'; its splits: train, test"):
        resolve_inputs(SourceSpec(inputs=[f"s3://{bucket}/hf/dd{query}"], split="dev"))


def test_conversation_columns_of_parquet_and_hf_inputs(tmp_path, save_hf):
    sharegpt = [[{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}]
                for i in range(3)]
    pq.write_table(pa.table({"conversations": sharegpt, "id": [0, 1, 2]}), tmp_path / "chats.parquet")
    dialog = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    save_hf(tmp_path / "hf", {"dialog": dialog})

    def records(path):
        source = SourceSpec(inputs=[str(path)])
        reader = RecordReader(source, SkipLog())
        return [(record, str(where)) for unit in plan_units(resolve_inputs(source), source) for record, where in
                reader(unit)]

    read = records(tmp_path / "chats.parquet")
    assert [to_messages(r) for r, _ in read] == [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(3)]
    assert read[2][1] == f"{tmp_path / 'chats.parquet'}:row 2"
    (record, where), = records(tmp_path / "hf")
    assert to_messages(record, messages_field="dialog") == dialog[0]
    with pytest.raises(BadRecord, match="no 'messages' or 'conversations'"):
        to_messages(record)


def test_tokenize_job_reads_a_dataset_dict_split(tmp_path, save_hf, ray_session):
    from ember.config import parse_spec
    from ember.data.pipeline import run_tokenize

    texts = sentences(200, seed=15)
    path = save_hf(tmp_path / "dd", {"train": {"body": sentences(20, seed=16)}, "test": {"body": texts}})
    manifest = run_tokenize(parse_spec({
        "kind": "tokenize", "source": {"inputs": [str(path)], "split": "test", "column": "body", "unit_bytes": 8192},
        "tokenizer": {"vocab_size": 400, "sample_bytes": 100_000}, "pack": {"seq_len": 32},
        "output": {"dir": str(tmp_path / "out")}}))
    assert manifest["documents"]["kept"] == len(texts) and manifest["units"] == 2  # its two record batches
    assert manifest["documents"]["skipped"] == {}
