"""The one identity, fingerprint and stamp that datasets, runs and evaluations use to decide "already done?"."""

from __future__ import annotations

import json
import os

from ember.identity import files_fingerprint, identity_of, path_stats, read_stamp, stamp_matches, write_stamp


def test_an_identity_is_the_same_for_the_same_value_whatever_the_key_order():
    assert identity_of({"a": 1, "b": [1, 2]}) == identity_of({"b": [1, 2], "a": 1})
    assert identity_of({"a": 1}) != identity_of({"a": 2}) != identity_of({"a": "1"})
    assert len(identity_of("\ud800 a lone surrogate")) == 64  # any text, even one UTF-8 cannot hold


def test_a_fingerprint_changes_when_a_file_is_rewritten(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    before = files_fingerprint(path_stats([path]))
    assert files_fingerprint(path_stats([path])) == before
    path.write_bytes(b"two!")
    assert files_fingerprint(path_stats([path])) != before
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert files_fingerprint(path_stats([path])) != files_fingerprint([(str(path), st.st_size, st.st_mtime_ns)])


def test_a_stamp_matches_only_its_identity_and_a_garbled_one_is_none(tmp_path):
    stamp = tmp_path / "sub" / "job.json"
    written = write_stamp(stamp, "abc", tokenizer_sha256="t")
    assert read_stamp(stamp) == written == {"identity": "abc", "tokenizer_sha256": "t"}
    assert stamp_matches(stamp, "abc") and not stamp_matches(stamp, "abd")
    assert not list(stamp.parent.glob(".tmp-*"))
    for garbage in ("{not json", "[1, 2]", '{"identity": 3}', ""):
        stamp.write_text(garbage)
        assert read_stamp(stamp) is None and not stamp_matches(stamp, "abc")
    assert read_stamp(tmp_path / "missing.json") is None


def test_a_spec_without_the_keys_that_do_not_change_results():
    from ember.config import parse_spec
    from ember.identity import spec_without

    spec = parse_spec({"kind": "evaluate", "models": {"m": "/models/m"}, "data": {"conversations": ["c.jsonl"]},
                       "output": {"file": "/e.json"}, "tracking": {"required": True}})
    content = spec_without(spec, ("tracking", "data.nothing", "no.such.section"))
    assert "tracking" not in content and content["data"] == spec.data.model_dump()
    assert spec_without(content, ("data.conversations",))["data"].keys() == content["data"].keys() - {"conversations"}
    assert spec_without({"train": {"tracking": {}, "lr": 1}}, ("train.tracking",)) == {"train": {"lr": 1}}


def test_an_evaluation_is_redone_when_a_file_in_its_directory_or_its_builtin_input_changes(tmp_path, monkeypatch):
    """An evaluation's results are reused while its identity holds (`ember.eval.evaluate`): the identity takes the
    fingerprint of the resolved conversations (`source_fingerprint`), so a file rewritten inside a directory input,
    or a built-in corpus of another build, makes a new identity and the stale results are not reused. Tested on the
    identity itself: a whole run would load a model."""
    from ember.config import parse_spec
    from ember.data import builtin
    from ember.eval.evaluate import _identity

    (tmp_path / "model").mkdir()
    conversations = tmp_path / "conversations"
    conversations.mkdir()
    (conversations / "a.jsonl").write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")

    def identity(inputs: list[str], **more) -> str:
        return _identity(parse_spec({"kind": "evaluate", "models": {"m": str(tmp_path / "model")},
                                     "data": {"conversations": inputs}, "output": {"file": str(tmp_path / "e.json")},
                                     **more}))

    by_dir = identity([str(conversations)])
    assert identity([str(conversations)]) == by_dir == identity([str(conversations)], tracking={"required": True})
    (conversations / "a.jsonl").write_text(json.dumps({"prompt": "Hi?", "response": "Hello there."}) + "\n")
    assert identity([str(conversations)]) != by_dir
    by_glob = identity([str(conversations / "*.jsonl")])
    (conversations / "b.jsonl").write_text(json.dumps({"prompt": "Bye?", "response": "Bye."}) + "\n")
    assert identity([str(conversations / "*.jsonl")]) != by_glob
    held_out = identity(["builtin:python-qa:test"])
    assert identity(["builtin:python-qa:test"]) == held_out
    monkeypatch.setattr(builtin, "corpus_fingerprint", lambda: "another Python build")
    assert identity(["builtin:python-qa:test"]) != held_out
