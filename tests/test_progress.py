"""Progress as data (`ember.runs.progress`): the record a job writes, what `ember jobs status` and `ember status` show
from it, and where `ember submit` says it will be. No Ray: the Jobs API client is a stand-in that serves job details."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ember.cluster.jobs import describe, job_metadata, progress_location
from ember.cluster.status import render
from ember.runs.progress import FILE, describe_progress, read_progress, show_progress, write_progress

TRAIN = {"kind": "train", "step": 12, "total_steps": 12, "loss": 3.12341, "tokens_per_s": 1234.4, "val_loss": None}
TOKENIZE = {"kind": "tokenize", "units": 3, "total_units": 5, "tokens": 12345, "tokens_per_s": 6789.2}


def test_a_record_round_trips_with_the_time_it_was_written(tmp_path):
    write_progress(tmp_path, TRAIN)
    record = read_progress(str(tmp_path))
    assert {k: v for k, v in record.items() if k != "time"} == TRAIN and record["time"] > 0
    write_progress(tmp_path, {**TOKENIZE, "time": 5.0})  # the whole record is replaced
    assert read_progress(str(tmp_path)) == {**TOKENIZE, "time": 5.0}
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left behind


def test_a_record_reads_as_one_line_per_kind():
    assert describe_progress(TRAIN) == "step 12/12, loss 3.1234, 1,234 tokens/s"
    assert describe_progress({**TRAIN, "val_loss": 3.5}) == "step 12/12, loss 3.1234, 1,234 tokens/s, val loss 3.5000"
    mixed = {**TRAIN, "source_tokens": {"web": 76800, "code": 25600}}  # a run on a mixture
    assert describe_progress(mixed) == "step 12/12, loss 3.1234, 1,234 tokens/s; tokens by source: web 76,800, " \
                                       "code 25,600"
    assert describe_progress(TOKENIZE) == "3/5 units, 12,345 tokens, 6,789 tokens/s"
    done = {"kind": "tokenize", "units": 5, "total_units": 5, "tokens": 20000, "done": True}
    assert describe_progress(done) == "5/5 units, 20,000 tokens, done"


GARBLED = [b"{garbled", b"\xff\xfe", b"[1, 2]", b'{"kind": "train", "step": 3}', b'{"kind": "dance", "step": 3}',
           b'{"kind": "train", "step": "3", "total_steps": 5, "loss": 1.0, "tokens_per_s": 2.0}']


@pytest.mark.parametrize("content", GARBLED)
def test_a_garbled_record_is_none_and_a_note_not_a_traceback(tmp_path, content):
    (tmp_path / FILE).write_bytes(content)
    assert read_progress(str(tmp_path)) is None
    assert show_progress(str(tmp_path), shared=True) == (None, f"in {tmp_path / FILE} (not a progress record this "
                                                               "Ember reads)")


def test_a_missing_record_is_none_yet_or_not_readable_from_here(tmp_path):
    assert read_progress(str(tmp_path)) is None
    assert show_progress(str(tmp_path), shared=False) == (None, "")  # the directory is here: no record yet
    elsewhere = tmp_path / "on-another-node"
    assert show_progress(str(elsewhere), shared=True) == (None, "")  # same machine: not made yet
    assert show_progress(str(elsewhere), shared=False) == (
        None, f"in {elsewhere / FILE} on the cluster (not readable from here)")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / FILE).mkdir()  # a record that cannot be read (here: a directory in its place)
    assert show_progress(str(tmp_path / "locked"), shared=True)[1].endswith("(not readable from here)")
    assert show_progress("nosuchscheme://bucket/run", shared=False) == (
        None, "in nosuchscheme://bucket/run/progress.json (not readable from here)")


def test_a_record_is_read_through_a_uri(tmp_path):
    write_progress(tmp_path, TOKENIZE)
    record, text = show_progress(f"file://{tmp_path}", shared=False)
    assert record["units"] == 3 and text == "3/5 units, 12,345 tokens, 6,789 tokens/s"
    assert show_progress(f"file://{tmp_path}/later", shared=False) == (None, "")


class FakeJobs:
    """The part of `ember.cluster.jobs.Jobs` that `describe` and `render` use; logs are served but never needed."""

    def __init__(self, url: str, details: dict, logs: str = ""):
        self.url, self.details, self.logs, self.calls = url, details, logs, []

    def info(self, job_id):
        return self.details[job_id]

    def call(self, method, *args, **kwargs):
        self.calls.append(method)
        if method == "get_job_logs":
            return self.logs
        if method == "list_jobs":
            return list(self.details.values())
        raise AssertionError(method)


def details(job_id: str, kind: str, location: str | None, status: str = "RUNNING"):
    meta = {"ember_kind": kind, "ember_spec": f"jobs/{kind}.yaml"} | ({"ember_progress": location} if location else {})
    return SimpleNamespace(submission_id=job_id, job_id=None, status=status, metadata=meta, start_time=1_000,
                           end_time=61_000, entrypoint="python -m ember.cli run spec.yaml", message="")


def test_rewording_the_log_line_does_not_change_the_progress_shown(tmp_path):
    """The shown progress follows the record whatever the log says: old wording, new wording, or contradicting it."""
    write_progress(tmp_path, {**TRAIN, "step": 7})
    job = details("ember-pretrain-x", "pretrain", str(tmp_path))
    for logs in ("step 3/12  loss 9.9000  lr 1.00e-03  grad norm 0.100  55 tokens/s\n",
                 "[rank 0] iteration 3 of 12: loss=9.9, throughput 55 tok/s\n", ""):
        jobs = FakeJobs("http://127.0.0.1:8265", {"ember-pretrain-x": job}, logs)
        assert "  progress: step 7/12, loss 3.1234, 1,234 tokens/s" in describe(jobs, "ember-pretrain-x")
        assert "get_job_logs" not in jobs.calls
    write_progress(tmp_path, TRAIN)  # the next record, with the logs as they were
    assert "progress: step 12/12" in describe(jobs, "ember-pretrain-x")


def test_describe_and_status_say_when_the_record_is_not_readable_here(tmp_path, monkeypatch):
    remote = "/mnt/only-on-the-cluster/run"
    found = {"a": details("a", "pretrain", remote), "b": details("b", "evaluate", None, "SUCCEEDED"),
             "c": details("c", "tokenize", str(tmp_path), "SUCCEEDED")}
    write_progress(tmp_path, {"kind": "tokenize", "units": 4, "total_units": 4, "tokens": 99, "done": True})
    jobs = FakeJobs("http://10.0.0.5:8265", found)
    assert f"  progress: in {remote}/{FILE} on the cluster (not readable from here)" in describe(jobs, "a")
    assert "progress" not in describe(jobs, "b")  # a kind that writes no record
    monkeypatch.setattr("ember.cluster.status.Jobs", lambda address: jobs)
    monkeypatch.setattr("ray.util.state.list_nodes", lambda **kw: [])
    monkeypatch.setattr("ember.cluster.status._usage", lambda url: [])
    monkeypatch.setattr("ember.cluster.status._serve_apps", lambda url: (0, []))
    screen = render("http://10.0.0.5:8265")
    assert f"  a  pretrain  RUNNING  60s  progress in {remote}/{FILE} on the cluster (not readable from here)" in screen
    assert "  c  tokenize  SUCCEEDED  60s  4/4 units, 99 tokens, done" in screen
    assert "get_job_logs" not in jobs.calls


def spec(kind: str, directory: str):
    return SimpleNamespace(kind=kind, output=SimpleNamespace(dir=directory))


def test_submit_records_where_the_progress_will_be_when_it_can_be_named(tmp_path):
    assert progress_location(spec("pretrain", "/data/runs/../runs/a"), None, False) == "/data/runs/a"
    assert progress_location(spec("tokenize", "s3://bucket/ds"), None, False) == "s3://bucket/ds"
    assert progress_location(spec("finetune", "runs/ft"), "/shared/ember", False) == "/shared/ember/runs/ft"
    assert progress_location(spec("finetune", "runs/ft"), None, False) is None  # Ray's temporary working dir
    assert progress_location(spec("pretrain", "~/runs/a"), None, False) is None  # another machine's home
    assert progress_location(spec("pretrain", "~/runs/a"), None, True).endswith("/runs/a")
    assert progress_location(spec("evaluate", "/x"), None, True) is None
    meta = job_metadata(spec("tokenize", "data/ds"), tmp_path / "t.yaml", [], str(tmp_path), same_machine=True)
    assert meta["ember_progress"] == str(tmp_path / "data" / "ds")
    assert json.dumps(meta) and all(isinstance(v, str) for v in meta.values())  # the Jobs API takes strings only
    assert "ember_progress" not in job_metadata(spec("tokenize", "ds"), tmp_path / "t.yaml", [], None, False)
