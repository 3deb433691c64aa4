"""The one identity, fingerprint and stamp that datasets, runs and evaluations use to decide "already done?"."""

from __future__ import annotations

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
