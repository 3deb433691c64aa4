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


SECRET_URI = "s3://b/x?endpoint_override=127.0.0.1:1&scheme=http&secret_key=HUSH-123&access_key=AKIA-HUSH"


@pytest.mark.parametrize("job, keys", [
    ("tokenize-demo.yaml", ["source.inputs", "output.dir"]),
    ("pretrain-demo.yaml", ["data.dir", "output.dir", "resume", "model.init_from"]),
    ("finetune-demo.yaml", ["base", "data.inputs", "data.dir", "output.dir"]),
    ("evaluate-demo.yaml", ["models.base", "data.conversations", "output.file"]),  # models: a mapping, named whole
])
def test_a_uri_with_credentials_is_refused_in_every_field_without_showing_them(job, keys):
    """A spec is written to the run dir and sent to Ray: a URI holding a key or secret is refused at load, each
    field named, the secret shown nowhere; the error says where credentials go instead."""
    overrides = [f'{k}=["{SECRET_URI}"]' if k in ("source.inputs", "data.inputs", "data.conversations")
                 else f"{k}={SECRET_URI}" for k in keys]
    with pytest.raises(EmberError) as refused:
        load_spec(REPO / "jobs" / job, overrides)
    message = str(refused.value)
    for key in keys:
        named = "models" if key == "models.base" else key
        assert f"{named}: credentials in a URI (access_key, secret_key) do not belong in a spec" in message
    assert "HUSH" not in message and "AWS_ACCESS_KEY_ID" in message
    with pytest.raises(EmberError) as refused:  # a value that fails another check is not shown either
        load_spec(REPO / "jobs" / job, [f"name={SECRET_URI}"])
    assert "HUSH" not in str(refused.value)


def test_a_value_that_fails_another_check_is_not_shown_when_it_holds_credentials(tmp_path):
    with pytest.raises(EmberError) as refused:
        load_spec(write(tmp_path, GOOD), [f"pack.seq_len={SECRET_URI}"])
    assert str(refused.value) == ("--set pack.seq_len=…: pack.seq_len: Input should be a valid integer, unable to "
                                  "parse string as an integer (the value is not shown: it holds credentials)")


def test_ember_run_submit_serve_and_the_storage_layer_refuse_credentials_in_uris_too(tmp_path):
    """Nothing is written, submitted or logged with the secret: `ember run` and `ember submit` stop at the spec
    (no run dir, nothing sent to Ray), `ember serve` at its args, the storage layer at the URI."""
    from conftest import run_ember
    from ember import storage

    run_dir = tmp_path / "run"
    for verb in ("run", "submit"):
        done = run_ember(verb, str(REPO / "jobs" / "pretrain-demo.yaml"), "--set", f"output.dir={run_dir}",
                         "--set", f"data.dir={SECRET_URI}", env={"RAY_ADDRESS": "127.0.0.1:1"})
        assert done.returncode != 0 and "HUSH" not in done.stdout + done.stderr and "Traceback" not in done.stderr
        assert "data.dir: credentials in a URI (access_key, secret_key) do not belong in a spec" in done.stderr
        assert not run_dir.exists()
    done = run_ember("serve", SECRET_URI, env={"RAY_ADDRESS": ""})
    assert done.returncode != 0 and "HUSH" not in done.stdout + done.stderr
    assert "args.model_dir: credentials in a URI (access_key, secret_key)" in done.stderr
    assert "Traceback" not in done.stderr
    for call in (storage.read_bytes, storage.list_names, storage.NodeCache(tmp_path / "cache").fetch_dir):
        with pytest.raises(EmberError, match=r"^s3://b: credentials in a URI \(access_key, secret_key\) are not "
                                             r"accepted") as refused:
            call(SECRET_URI)
        assert "HUSH" not in str(refused.value)


def test_harness_task_files_need_allow_code(tmp_path):
    """include_path's YAML task files may run Python (`!function`): the spec must say it trusts them."""
    base = {"kind": "evaluate", "models": {"m": "m"}, "output": {"file": "r.json"}}
    with pytest.raises(EmberError, match=r"lm_eval.include_path: the harness's task files can run Python on the "
                                         r"cluster .*set lm_eval.allow_code: true"):
        parse_spec({**base, "lm_eval": {"tasks": ["t"], "include_path": "tasks/"}})
    assert parse_spec({**base, "lm_eval": {"tasks": ["t"], "include_path": "tasks/", "allow_code": True}})
