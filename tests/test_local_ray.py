"""`ember run` with a Ray instance of its own (no --address, no RAY_ADDRESS): while it runs, every process of that
instance listens on 127.0.0.1 only; the cluster token it creates, or one it finds, is readable by its owner only; and
once it has exited, no process of its instance is left, not even one that a worker started and that would outlive
it (as a Ray Data pool actor once did, 40 minutes after its run). A local cluster that fails to come up leaves
nothing running either."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import stat
import subprocess
import time
import uuid

import psutil
import pytest

from conftest import EMBER, free_port, sentences

# On PYTHONPATH of the run only: every Ray worker process of it starts a process that leaves the worker's process
# group and is parented to init at once (a session of its own, a double fork), out of reach of Ray's own clean-up of
# a worker's children, as the pool actor that outlived its run was. The run's own shutdown must end it.
LINGERING_CHILD = """
import os, time

with open("/proc/self/cmdline", "rb") as f:
    if b"default_worker.py" in f.read():
        pid = os.fork()
        if pid == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        os.waitpid(pid, 0)
"""


def _marked(mark: str) -> list[psutil.Process]:
    """The processes whose environment carries the run's mark: every process of its Ray instance inherits it."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("EMBER_TEST_RUN") == mark and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _listening(p: psutil.Process) -> dict[tuple[str, int], str]:
    try:
        return {(c.laddr.ip, c.laddr.port): p.name() for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        return {}


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _watch(proc: subprocess.Popen, deadline: float) -> tuple[dict, dict]:
    """While `proc` runs: the processes under it (its Ray instance's), and every address they listen on."""
    seen, listening = {}, {}
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        for p in tree:
            seen[p.pid] = p
            listening.update(_listening(p))
        time.sleep(0.2)
    return seen, listening


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> dict:
    """One `ember run` of a small tokenize job with a Ray instance of its own, in a home of its own without a cluster
    token: what listened while it ran, what of it is left once it has exited, and its home."""
    tmp = tmp_path_factory.mktemp("own-ray")
    (tmp / "home").mkdir()
    (tmp / "hooks").mkdir()
    (tmp / "hooks" / "sitecustomize.py").write_text(LINGERING_CHILD)
    (tmp / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in sentences(200, seed=3)) + "\n")
    (tmp / "job.yaml").write_text(json.dumps({
        "kind": "tokenize", "source": {"inputs": [str(tmp / "docs.jsonl")]},
        "tokenizer": {"vocab_size": 300, "sample_bytes": 100_000}, "pack": {"seq_len": 32, "val_fraction": 0.1},
        "output": {"dir": str(tmp / "ds")}}))
    mark = uuid.uuid4().hex
    env = {**os.environ, "HOME": str(tmp / "home"), "EMBER_TEST_RUN": mark,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp / "hooks"), os.environ.get("PYTHONPATH")]))}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    with open(tmp / "run.log", "w") as log:
        proc = subprocess.Popen([EMBER, "run", str(tmp / "job.yaml")], cwd=tmp, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        seen, listening = _watch(proc, time.monotonic() + 300)
        returncode = proc.wait(timeout=60)
        left = {p.pid: p for p in [*seen.values(), *_marked(mark)] if _alive(p)}
        yield {"returncode": returncode, "log": (tmp / "run.log").read_text(), "listening": listening,
               "seen": len(seen), "left": [(p.pid, p.name()) for p in left.values()], "home": tmp / "home"}
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _marked(mark):  # whatever a failing run left: this test's own processes only
            with contextlib.suppress(psutil.Error):
                p.kill()


@pytest.mark.own_ray
def test_ember_runs_own_ray_instance_listens_on_loopback_only(finished_run):
    assert finished_run["returncode"] == 0, finished_run["log"][-3000:]
    listening = finished_run["listening"]
    assert {"raylet", "gcs_server"} <= set(listening.values()), listening  # seen while the run went on
    wide = {f"{ip}:{port}": name for (ip, port), name in listening.items() if not _is_loopback(ip)}
    assert not wide, f"listening beyond 127.0.0.1: {wide}"


@pytest.mark.own_ray
def test_a_finished_ember_run_leaves_no_process_of_its_ray_instance(finished_run):
    assert finished_run["returncode"] == 0, finished_run["log"][-3000:]
    assert finished_run["seen"] > 3  # the GCS, the raylet, the dashboard, workers...
    assert finished_run["left"] == [], f"still running after `ember run` exited: {finished_run['left']}"


@pytest.mark.own_ray
def test_the_token_ember_run_creates_is_readable_by_its_owner_only(finished_run):
    token = finished_run["home"] / ".ray" / "auth_token"
    assert len(token.read_text().strip()) == 64  # Ray's format: 256 bits, hex
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


@pytest.mark.own_ray
def test_a_local_cluster_that_does_not_come_up_in_time_leaves_nothing_running(tmp_path, monkeypatch):
    """`ember cluster up` (and the cluster fixtures) on a cluster that is not up within its timeout: the error comes
    once its processes, the host and the nodes it had started, are gone."""
    from ember.cluster import local
    from ember.errors import EmberError

    mark = uuid.uuid4().hex
    monkeypatch.setenv("EMBER_TEST_RUN", mark)  # the host inherits it, and every node it starts
    try:
        with pytest.raises(EmberError, match="did not come up within 1s"):
            local.up(workers=1, directory=tmp_path / "state", port=free_port(), dashboard_port=free_port(), timeout=1)
        left = [(p.pid, p.name()) for p in _marked(mark) if _alive(p)]
        assert left == [], f"still running after the failed start: {left}"
    finally:
        for p in _marked(mark):
            with contextlib.suppress(psutil.Error):
                p.kill()


@contextlib.contextmanager
def _ember_warnings():
    """The warnings Ember logs meanwhile, as text (its logger may not propagate: the CLI sets it so)."""
    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ember")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_a_token_file_open_to_others_is_narrowed_with_a_warning_when_ember_reads_it(tmp_path, monkeypatch):
    from ember.cluster.jobs import auth_headers

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir(mode=0o755)
    token.write_text("a" * 64)
    token.chmod(0o644)
    with _ember_warnings() as warned:
        assert auth_headers() == {"Authorization": f"Bearer {'a' * 64}"}  # what `ember submit` and `ember jobs` send
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert any(f"{token} was open to other users of this machine (mode 644); made it 600" in w for w in warned)
    assert any(f"{token.parent} was open to other users of this machine (mode 755); made it 700" in w for w in warned)

    named = tmp_path / "elsewhere" / "token"  # RAY_AUTH_TOKEN_PATH: the file is narrowed, its dir is the user's
    named.parent.mkdir(mode=0o755)
    named.write_text("b" * 64)
    named.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    with _ember_warnings() as warned:
        assert auth_headers() == {"Authorization": f"Bearer {'b' * 64}"}
    assert stat.S_IMODE(named.stat().st_mode) == 0o600 and stat.S_IMODE(named.parent.stat().st_mode) == 0o755
    assert [w for w in warned if "(mode 640); made it 600" in w]
    with _ember_warnings() as warned:
        auth_headers()
    assert warned == [], "a private token file is left as it is, without a warning"
