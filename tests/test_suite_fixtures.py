"""The suite's own server fixtures (conftest.http_server, behind mlflow_server): a readiness poll that meets a slow
answer waits on until its deadline, and a server that never gets ready fails its set-up without leaving its process
group (the server and the workers it started) running."""

from __future__ import annotations

import json
import sys
import time

import psutil
import pytest
import requests

from conftest import free_port, http_server

# A server in the shape of `mlflow server`: a leader that starts a worker process (in its own process group, as
# gunicorn's workers are) and answers GET /health: "slow" after two answers slower than a poll's read timeout,
# "stuck" never within any timeout, "failing" at once but with 503. It records both pids in the file it is given.
FAKE_SERVER = r"""
import http.server, json, os, subprocess, sys, threading, time

mode, port, pids = sys.argv[1], int(sys.argv[2]), sys.argv[3]
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
slow_answers = [1, 1]
lock = threading.Lock()


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            slow = mode == "stuck" or (mode == "slow" and slow_answers and slow_answers.pop())
        if slow:
            time.sleep(600 if mode == "stuck" else 4)
        self.send_response(200 if mode == "slow" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Health)
with open(pids, "w") as out:
    json.dump([os.getpid(), worker.pid], out)
server.serve_forever()
"""


def _start_args(tmp_path, mode: str) -> tuple[list[str], str]:
    script = tmp_path / "server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    return [sys.executable, str(script), mode, str(port), str(tmp_path / "pids.json")], f"http://127.0.0.1:{port}"


def _still_running(tmp_path) -> list[int]:
    """The fake server's leader and worker that still run (zombies are gone but for their parent's wait)."""
    left = []
    for pid in json.loads((tmp_path / "pids.json").read_text()):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_readiness_poll_waits_through_answers_slower_than_its_read_timeout(tmp_path):
    args, url = _start_args(tmp_path, "slow")
    with http_server(args, url, tmp_path / "server.log", timeout=60) as base:
        assert requests.get(f"{base}/health", timeout=30).status_code == 200
    assert _still_running(tmp_path) == [], "the fixture's teardown stops the server and its workers"


@pytest.mark.parametrize("mode", ["stuck", "failing"])
def test_a_server_that_never_gets_ready_fails_its_set_up_and_leaves_nothing_running(tmp_path, mode):
    args, url = _start_args(tmp_path, mode)
    started = time.monotonic()
    with pytest.raises(AssertionError, match="did not"):
        with http_server(args, url, tmp_path / "server.log", timeout=3):
            pass
    assert time.monotonic() - started < 60, "the deadline bounds the wait, however long one poll hangs"
    assert _still_running(tmp_path) == [], "a failed set-up stops the server and the workers it started"
