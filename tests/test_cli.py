"""The `ember` command's surface: help, one-line errors without a traceback, `--debug` with one."""

import subprocess

from conftest import EMBER, REPO


def ember(*args, **kw):
    return subprocess.run([EMBER, *args], capture_output=True, text=True, cwd=kw.pop("cwd", REPO), timeout=120, **kw)


def test_help_lists_verbs_and_examples():
    out = ember("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "ember run jobs/tokenize-demo.yaml" in out.stdout
    run_help = ember("run", "--help")
    assert run_help.returncode == 0
    for text in ("SPEC.yaml", "--set KEY=VALUE", "--address", "RAY_ADDRESS", "tokenize"):
        assert text in run_help.stdout, text


def test_spec_errors_print_one_line_and_exit_non_zero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: tokenize\nsource:\n  inputz: [x]\noutput: {dir: out}\n")
    out = ember("run", str(bad))
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:3: unknown key 'source.inputz'")
    assert "did you mean 'source.inputs'" in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    out = ember("run", str(tmp_path / "missing.yaml"), "--debug")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "spec file not found" in out.stderr
    quiet = ember("run", str(tmp_path / "missing.yaml"))
    assert quiet.stderr.strip() == f"error: spec file not found: {tmp_path / 'missing.yaml'}"


def test_usage_errors_come_from_argparse():
    out = ember("run")
    assert out.returncode == 2 and "SPEC.yaml" in out.stderr
    assert ember("frobnicate").returncode == 2
