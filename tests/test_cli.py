"""The `ember` command's surface: help, one-line errors without a traceback, `--debug` with one."""

import subprocess

import pytest

from conftest import run_ember as ember


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


LOCAL_RAY = """
import json, urllib.parse
import ray, requests
from ember.cluster.jobs import auth_headers
from ember.runtime import ensure_ray

ensure_ray(None)  # what `ember run` does without --address or RAY_ADDRESS
url = "http://" + ray._private.worker.get_dashboard_url()
out = {"url": url, "anonymous": requests.get(url + "/api/jobs/", timeout=30).status_code,
       "with_token": requests.get(url + "/api/jobs/", headers=auth_headers(), timeout=30).status_code}
print(json.dumps(out))
"""


@pytest.mark.own_ray
def test_ember_run_starts_a_local_ray_whose_dashboard_is_on_loopback_with_token_auth():
    """`ember run` without a cluster starts a local Ray instance: its dashboard listens on 127.0.0.1 and refuses a
    client without the token (Ray's token auth stays on)."""
    import json
    import os
    import sys
    import urllib.parse

    done = subprocess.run([sys.executable, "-c", LOCAL_RAY], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert urllib.parse.urlparse(out["url"]).hostname == "127.0.0.1"
    assert out["anonymous"] == 401 and out["with_token"] == 200
