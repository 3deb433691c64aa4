"""Specs: YAML loading, typed `--set` overrides, and errors that name the file, line and field."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ember.config import SPEC_KINDS, TokenizeSpec, load_spec, parse_spec
from ember.errors import EmberError

GOOD = """\
kind: tokenize
source:
  inputs: [builtin:python-docs]
pack:
  seq_len: 64
output:
  dir: out
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_loads_with_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert isinstance(spec, TokenizeSpec)
    assert spec.pack.seq_len == 64 and spec.tokenizer.vocab_size == 8192 and spec.source.field == "text"


def test_set_overrides_are_typed(tmp_path):
    spec = load_spec(write(tmp_path, GOOD), ["pack.seq_len=128", "filter.dedup=true", "pack.val_fraction=0.25",
                                             "source.inputs=[a.txt, b.txt]", "name=my job"])
    assert spec.pack.seq_len == 128 and spec.filter.dedup is True and spec.pack.val_fraction == 0.25
    assert spec.source.inputs == ["a.txt", "b.txt"] and spec.name == "my job"


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("  seq_len: 64", "  seq_len: 64\n  seqlen: 3"))
    with pytest.raises(EmberError) as err:
        load_spec(path)
    msg = str(err.value)
    assert f"{path}:6" in msg and "unknown key 'pack.seqlen'" in msg and "did you mean 'pack.seq_len'" in msg


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(EmberError, match=r"unknown key 'tokeniser'.*did you mean 'tokenizer'"):
        load_spec(write(tmp_path, GOOD + "tokeniser: {}\n"))


def test_wrong_type_and_out_of_range_name_the_field(tmp_path):
    path = write(tmp_path, GOOD.replace("seq_len: 64", "seq_len: lots") + "workers: 0\n")
    with pytest.raises(EmberError) as err:
        load_spec(path)
    msg = str(err.value)
    assert f"{path}:5: pack.seq_len" in msg and "'lots'" in msg
    assert f"{path}:8: workers" in msg and "greater than or equal to 1" in msg


def test_bad_override_is_named(tmp_path):
    with pytest.raises(EmberError, match=r"--set pack\.seq_len=-4: pack\.seq_len: .*greater than or equal to 8"):
        load_spec(write(tmp_path, GOOD), ["pack.seq_len=-4"])
    with pytest.raises(EmberError, match=r"--set pack\.seqlen=4: unknown key 'pack\.seqlen' \(did you mean"):
        load_spec(write(tmp_path, GOOD), ["pack.seqlen=4"])
    with pytest.raises(EmberError, match="expected KEY=VALUE"):
        load_spec(write(tmp_path, GOOD), ["pack.seq_len"])


def test_missing_required_key(tmp_path):
    with pytest.raises(EmberError, match=r"output: required key is missing"):
        load_spec(write(tmp_path, GOOD.replace("output:\n  dir: out\n", "")))


def test_kind_errors(tmp_path):
    with pytest.raises(EmberError, match="missing 'kind'"):
        load_spec(write(tmp_path, GOOD.replace("kind: tokenize\n", "")))
    with pytest.raises(EmberError, match=r"job.yaml:1: unknown kind 'tokenise' \(did you mean 'tokenize'"):
        load_spec(write(tmp_path, GOOD.replace("kind: tokenize", "kind: tokenise")))


def test_file_level_errors(tmp_path):
    with pytest.raises(EmberError, match="spec file not found: .*nope.yaml"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(EmberError, match=r"job.yaml:4: invalid YAML"):
        load_spec(write(tmp_path, "kind: tokenize\nsource:\n  inputs: [a\n  b: ]]\n"))
    with pytest.raises(EmberError, match="the spec file is empty"):
        load_spec(write(tmp_path, ""))
    with pytest.raises(EmberError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_parse_spec_from_a_dict():
    spec = parse_spec(yaml.safe_load(GOOD))
    assert spec.output.dir == "out"


def test_every_shipped_yaml_loads():
    """Every YAML file in jobs/, serve/ and cluster/ is loaded: job specs by Ember's loader, the rest as YAML."""
    shipped = sorted(p for folder in ("jobs", "serve", "cluster") for p in (REPO / folder).rglob("*.y*ml"))
    assert any(p.parent.name == "jobs" for p in shipped)
    for path in shipped:
        if path.relative_to(REPO).parts[0] == "jobs":
            spec = load_spec(path)
            assert spec.kind in SPEC_KINDS
        else:
            assert list(yaml.safe_load_all(path.read_text())), path


def test_spec_reference_is_current():
    """docs/specs.md is generated from the models; regenerate with `python -m ember.config.reference`."""
    from ember.config.reference import render_reference

    reference = render_reference()
    assert (REPO / "docs" / "specs.md").read_text() == reference
    rows = [line for line in reference.splitlines() if line.startswith("| `")]
    assert len(rows) > 20 and not [r for r in rows if r.endswith("|  |")], "every spec key has a description"
