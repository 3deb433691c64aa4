"""`kind: tokenize` end to end on the session's real Ray instance: output, determinism, reruns, crash recovery."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from conftest import EMBER, merged, ray_address, run_ember, sentences
from ember import storage
from ember.config import parse_spec
from ember.data.pipeline import run_tokenize
from ember.data.shards import ShardReader, load_manifest
from ember.data.tokenizer import load_tokenizer
from ember.errors import EmberError
from ember.identity import content_sha256
from ember.runs.progress import read_progress
from ember.runtime import find_ember_error

pytestmark = pytest.mark.usefixtures("ray_session")


def spec_dict(inputs, out, **sections) -> dict:
    data = {"kind": "tokenize", "source": {"inputs": [str(i) for i in inputs]},
            "tokenizer": {"vocab_size": 600, "sample_bytes": 400_000}, "pack": {"seq_len": 32, "val_fraction": 0.1},
            "filter": {"min_chars": 10}, "output": {"dir": str(out)}}
    return merged(data, **sections)


def run(inputs, out, **sections) -> dict:
    return run_tokenize(parse_spec(spec_dict(inputs, out, **sections)))


@pytest.fixture
def mixed_corpus(tmp_path) -> tuple[Path, list[str]]:
    """JSONL, gzipped text, Parquet, a bad line and a short document; returns the dir and the good documents."""
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a, b, c = sentences(300, seed=1), sentences(200, seed=2), sentences(150, seed=3)
    lines = [json.dumps({"text": t}) for t in a]
    lines.insert(17, '{"text": broken')
    lines.insert(40, json.dumps({"text": "too short"}))
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "b.txt.gz").write_bytes(gzip.compress("\n\n".join(b).encode()))
    pq.write_table(pa.table({"text": c}), corpus / "c.parquet", row_group_size=50)
    return corpus, a + b + c


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.arrow"))}


def test_tokenizes_a_mixed_corpus_into_packed_shards(tmp_path, mixed_corpus):
    corpus, good = mixed_corpus
    out = tmp_path / "ds"
    manifest = run([corpus], out, source={"text_unit": "paragraph", "unit_bytes": 8192})
    assert manifest == load_manifest(out)
    assert manifest["seq_len"] == 32 and manifest["dtype"] == "uint16" and manifest["units"] > 3
    assert manifest["tokenizer"]["sha256"] == content_sha256(out / "tokenizer.json")
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    docs = manifest["documents"]
    assert docs["kept"] == len(good) and docs["skipped"] == {"malformed_json": 1, "too_short": 1}
    assert docs["read"] == len(good) + 2
    assert docs["examples"] == [f"{corpus / 'a.jsonl'}:18: malformed JSON (Expecting value at column 10)"]
    splits = manifest["splits"]
    assert 0 < splits["val"]["documents"] < splits["train"]["documents"]
    # Every token of every kept document (plus one EOS each) is in a row, except the last partial row per split.
    written = sum(splits[s]["rows"] for s in splits) * 33
    assert written + manifest["tokens_dropped"] == sum(splits[s]["document_tokens"] + splits[s]["documents"]
                                                        for s in splits)
    assert manifest["tokens_dropped"] < 2 * 33
    # Rows decode back to the documents: each unit's rows are its document stream joined with EOS.
    tok = load_tokenizer(out / "tokenizer.json")
    unit_shard = next(sh for sh in splits["train"]["shards"] if sh["file"].startswith("u"))
    table = pa.ipc.open_file(pa.memory_map(str(out / "train" / unit_shard["file"]))).read_all()
    stream = np.concatenate([np.asarray(r, dtype=np.int64) for r in table.column("input_ids").to_pylist()])
    pieces = np.split(stream, np.flatnonzero(stream == manifest["eos_id"]))
    complete = [tok.decode(p[p != manifest["eos_id"]].tolist()) for p in pieces[1:-1]]
    assert len(complete) > 5 and all(text in good for text in complete)
    reader = ShardReader(out, "train", seed=0)
    assert len(reader) == splits["train"]["rows"] and reader.row(0).shape == (33,)
    # The job's last progress record (what `ember jobs status` shows) counts the dataset the manifest describes.
    record = read_progress(str(out))
    assert record["done"] and record["units"] == record["total_units"] == manifest["units"]
    assert record["tokens"] == splits["train"]["tokens"] + splits["val"]["tokens"]


def test_same_shards_whatever_the_number_of_workers(tmp_path, mixed_corpus):
    corpus, _ = mixed_corpus
    for name in ("x", "y"):  # duplicates within and across units, removed in input order
        (corpus / f"dup-{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(40, 9)))
    options = dict(source={"text_unit": "paragraph", "unit_bytes": 6000}, filter={"dedup": True})
    one = run([corpus], tmp_path / "one", workers=1, **options)
    two = run([corpus], tmp_path / "two", workers=2, **options)
    assert one["documents"]["skipped"]["duplicate"] == 40
    assert one == two
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two") != {}
    assert (tmp_path / "one" / "tokenizer.json").read_bytes() == (tmp_path / "two" / "tokenizer.json").read_bytes()


def test_rerun_is_a_no_op_and_a_different_dataset_is_refused(tmp_path, mixed_corpus, caplog):
    corpus, _ = mixed_corpus
    out = tmp_path / "ds"
    first = run([corpus], out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    ember_log = logging.getLogger("ember")
    with caplog.at_level(logging.INFO, logger="ember"):
        propagate, ember_log.propagate = ember_log.propagate, True  # caplog reads the root logger's handlers
        try:
            assert run([corpus], out, workers=1) == first
        finally:
            ember_log.propagate = propagate
    assert "already holds this dataset" in caplog.text and "nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(EmberError, match="holds a different dataset .*output.overwrite: true"):
        run([corpus], out, pack={"seq_len": 16})
    assert load_manifest(out) == first  # refused without touching the finished dataset
    second = run([corpus], out, pack={"seq_len": 16}, output={"overwrite": True})
    assert second["seq_len"] == 16 and load_manifest(out) == second
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EmberError, match="is not empty and holds no Ember dataset"):
        run([corpus], tmp_path / "mine", output={"overwrite": True})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_given_tokenizer_is_loaded_not_trained(tmp_path, mixed_corpus):
    corpus, _ = mixed_corpus
    run([corpus], tmp_path / "a")
    theirs = tmp_path / "theirs" / "tokenizer.json"  # formatted the way another tool might have written it
    theirs.parent.mkdir()
    theirs.write_text(json.dumps(json.loads((tmp_path / "a" / "tokenizer.json").read_text()), indent=2))
    manifest = run([corpus], tmp_path / "b", tokenizer={"path": str(theirs), "vocab_size": 9999})
    theirs_sha = content_sha256(theirs)
    assert manifest["tokenizer"]["sha256"] == theirs_sha != content_sha256(tmp_path / "a" / "tokenizer.json")
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == theirs.read_bytes()
    assert manifest["vocab_size"] == load_tokenizer(tmp_path / "a").get_vocab_size() <= 600
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    with pytest.raises(EmberError, match=f"tokenizer not found: {tmp_path / 'nope'}$"):
        run([corpus], tmp_path / "c", tokenizer={"path": str(tmp_path / "nope")})


def _pool_actors() -> dict[str, str]:
    from ray.util.state import list_actors

    return {a.actor_id: a.state for a in list_actors(address=ray_address(), raise_on_missing_output=False,
                                                      limit=10000) if "UnitWorker" in (a.class_name or "")}


def test_a_failed_tokenizer_step_stops_the_job_before_its_pool_starts(tmp_path, mixed_corpus, monkeypatch):
    """The pool starts once the tokenizer is ready (starting it during the tokenizer's training measured slower on
    this machine and was removed: benchmarks/README.md): a tokenizer step that fails raises its own error, and no
    unit ran and no pool actor started for the job."""
    from ember.data import pipeline

    corpus, _ = mixed_corpus

    def failing(*args):
        raise EmberError("the tokenizer step failed")

    earlier = set(_pool_actors())
    monkeypatch.setattr(pipeline, "_prepare_tokenizer", failing)
    with pytest.raises(EmberError, match="^the tokenizer step failed$"):
        run([corpus], tmp_path / "b")
    assert not list((tmp_path / "b" / ".ember" / "units").glob("u*.json"))  # no unit ran without the job
    assert not set(_pool_actors()) - earlier, "a pool started for a job that had no tokenizer"


def test_strict_failure_in_a_worker_names_file_and_line_and_keeps_finished_units(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        lines = [json.dumps({"text": t}) for t in sentences(60, seed=i)]
        if i == 3:
            lines[7] = json.dumps({"body": "wrong field"})
        (corpus / f"{i}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    with pytest.raises(Exception) as err:
        run([corpus], out, source={"strict": True, "unit_bytes": 4096}, workers=1)
    found = find_ember_error(err.value)
    assert found is not None and str(found).startswith(f"{corpus / '3.jsonl'}:8: missing field 'text'")
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".ember" / "units").glob("u*.json"))) >= 3  # finished units are kept for the rerun


@pytest.mark.slow
def test_a_killed_run_on_a_bucket_resumes_redoing_only_unfinished_units(tmp_path, ray_session, s3_server):
    """SIGKILL the driver of a real `ember run` writing to a bucket mid-way; the rerun reuses the units whose
    done-markers are in the bucket, and the result is byte for byte a clean local run's."""
    bucket, endpoint, _ = s3_server
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(24):
        (corpus / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(400, i)))
    out = f"s3://{bucket}/killed-{tmp_path.name}/ds?endpoint_override={endpoint}&scheme=http"
    clean = tmp_path / "clean"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict([corpus], out, source={"unit_bytes": 65536}, workers=1)))
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.Popen([EMBER, "run", str(spec_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)

    def markers() -> int:
        return len(storage.list_files(storage.join(out, ".ember", "units")))

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and markers() < 3:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # The killed driver's actors are separate processes: a unit in flight may still finish before Ray stops them.
    _wait_for_dead_job_actors(ray_session)
    finished_before = markers()
    assert not storage.exists(storage.join(out, "manifest.json")) and 3 <= finished_before < 24

    result = run_ember("run", spec_path, env=env, check=True, cwd=tmp_path)
    reused, total = (int(x) for x in result.stdout.split("resuming: ")[1].split(" units")[0].split(" of "))
    assert reused == finished_before < total and f"{reused} of {total} units reused" in result.stdout
    assert "tokenizer: reusing" in result.stdout

    reference = run([corpus], clean, source={"unit_bytes": 65536})
    assert load_manifest(out) == reference
    remote = {rel: storage.read_bytes(storage.join(out, rel)) for rel, _ in storage.list_files(out)
              if rel.endswith(".arrow")}
    assert remote == shard_bytes(clean)
    assert not any(rel.startswith(".ember/") for rel, _ in storage.list_files(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "corpus", "job.yaml"]  # nothing written locally
    # Training reads it through the node cache: the same rows as from the local copy.
    remote_rows, local_rows = ShardReader(out, "train", seed=3), ShardReader(clean, "train", seed=3)
    assert len(remote_rows) == len(local_rows)
    assert all(np.array_equal(remote_rows.row(i), local_rows.row(i)) for i in range(0, len(local_rows), 7))


def _still_runs(pid: int | None, title: str) -> bool:
    """Whether process `pid` still runs as the actor (a reused pid belongs to another process title)."""
    import psutil

    try:
        return bool(pid) and title in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _wait_for_dead_job_actors(ray_session, timeout: float = 60) -> None:
    """Ray stops a dead driver's actors within moments; wait so none still writes while the rerun starts. The GCS
    marks an actor dead before its process has exited, so wait for the processes too."""
    from ray.util.state import list_actors

    deadline = time.time() + timeout
    while time.time() < deadline:
        actors = [a for a in list_actors(address=ray_address(), detail=True, raise_on_missing_output=False,
                                          limit=10000) if "UnitWorker" in (a.class_name or "")]
        if all(a.state == "DEAD" and not _still_runs(a.pid, "UnitWorker") for a in actors):
            return
        time.sleep(0.2)
    raise AssertionError("the killed job's actors are still alive")


def test_cli_runs_a_spec_and_reports_errors_in_one_line(tmp_path, mixed_corpus, ray_session):
    corpus, _ = mixed_corpus
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict([corpus], tmp_path / "ds")))
    env = {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    ok = run_ember("run", spec_path, "--set", "pack.seq_len=24", env=env, check=True)
    assert "documents:" in ok.stdout and "tokens/s" in ok.stdout
    assert load_manifest(tmp_path / "ds")["seq_len"] == 24
    missing = run_ember("run", spec_path, "--set", f"source.inputs=[{tmp_path}/gone.jsonl]",
                        "--set", f"output.dir={tmp_path}/other", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: input not found: {tmp_path}/gone.jsonl"
    assert "Traceback" not in missing.stderr and "ray:" not in missing.stdout  # failed before any Ray work
    assert not (tmp_path / "other").exists()
    bad = tmp_path / "bad-tokenizer.json"
    bad.write_text('{"model": {"type": "BPE"')
    broken = run_ember("run", spec_path, "--set", f"tokenizer.path={bad}", "--set", f"output.dir={tmp_path}/third",
                       env=env)
    assert broken.returncode == 1  # fails while the pool starts: the pool stops without a traceback of its own
    assert broken.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a valid tokenizer.json")
    assert "Traceback" not in broken.stderr + broken.stdout


def test_tokenizes_a_remote_corpus_through_ray_workers(tmp_path, s3_server):
    """Workers on Ray read s3:// objects themselves (here from the S3-compatible server on 127.0.0.1)."""
    bucket, endpoint, client = s3_server
    texts = sentences(400, seed=11)
    client.put_object(Bucket=bucket, Key="remote-job/a.jsonl.gz",
                      Body=gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[:200]).encode()))
    client.put_object(Bucket=bucket, Key="remote-job/b.jsonl",
                      Body="".join(json.dumps({"text": t}) + "\n" for t in texts[200:]).encode())
    uri = f"s3://{bucket}/remote-job?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    manifest = run([uri], tmp_path / "ds", source={"unit_bytes": 4096})
    assert manifest["documents"]["kept"] == 400 and manifest["units"] >= 2
    assert manifest["source"]["inputs"] == [f"s3://{bucket}/remote-job"]  # no query string (it may hold secrets)
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    same = run([local], tmp_path / "ds2", tokenizer={"path": str(tmp_path / "ds")})
    assert same["splits"]["train"]["document_tokens"] == manifest["splits"]["train"]["document_tokens"]
