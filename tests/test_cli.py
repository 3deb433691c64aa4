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


QUIET = """
import logging, sys, warnings
from ember.runtime import quiet_libraries

quiet_libraries()  # what `ember` does first, and each Ray worker process of its jobs
import ray.data  # after it: Ray Data configures its console handler at import, as in a real run

logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s: %(message)s")
logging.getLogger("ray.train.torch.config").info("process group set up")
logging.getLogger("ray.train.torch.config").warning("a Ray Train warning")
logging.getLogger("ray.data._internal.execution.streaming_executor").info("dataset started")
logging.getLogger("DeepSpeed").warning("accelerator detected")  # from here, not from DeepSpeed's detection
logging.getLogger("ember").info("an Ember line")
logging.getLogger().info("printed by a library")
warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning, "c10d_logger.py",
                       83, module="torch.distributed.c10d_logger")
"""


@pytest.mark.parametrize("debug", [False, True])
def test_other_libraries_info_lines_stay_off_the_console_unless_debugging(debug):
    """Ray Train's and Ray Data's INFO lines, what libraries print, and torch's deprecation notices for DeepSpeed's
    calls stay off the console (Ray Data's still reach its log file); Ember's lines and other warnings show.
    EMBER_LOG_LEVEL=DEBUG (what --debug sets, for the workers too) shows everything."""
    import os
    import sys

    env = {**os.environ, "EMBER_LOG_LEVEL": "DEBUG" if debug else ""}
    out = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    shown = out.stdout + out.stderr
    for line in ("a Ray Train warning", "DeepSpeed: accelerator detected", "ember: an Ember line"):
        assert line in shown, line
    for line in ("process group set up", "dataset started", "printed by a library", "is deprecated"):
        assert (line in shown) == debug, line


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


def test_every_verb_names_its_handler_and_its_address_form_has_one_owner():
    import argparse

    from ember.cli import _parser
    from ember.connection import ADDRESS_FORMS, DASHBOARD, GCS

    def leaves(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path, parser
        for sub in subs:
            for name, child in sub.choices.items():
                yield from leaves(child, (*path, name))

    found = dict(leaves(_parser()))
    assert len(found) == 15
    for path, parser in found.items():
        assert callable(parser.get_default("func")), path
        takes_address = any("--address" in a.option_strings for a in parser._actions)
        assert takes_address == (ADDRESS_FORMS.get(path[0]) in (GCS, DASHBOARD)), path
