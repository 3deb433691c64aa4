"""`ember submit` and `ember jobs`: Ember jobs on a Ray cluster through the Ray Jobs API.

A submitted job's entrypoint is `python -m ember.cli run spec.yaml [--set ...]`, the same command a user runs
locally. Its runtime env carries the spec (the working dir), this client's Ember package (`py_modules`, so the cluster
runs the code the client has) and the environment variables the job needs. Job ids and metadata name the kind and the
spec, so `ember jobs list` and the Ray dashboard show what each job is.

The cluster is named by its dashboard URL or its GCS address, whose dashboard `ember.cluster.address` finds; where the
address comes from when `--address` is not given is `ember.connection`'s (`cluster_address`). Requests carry the
cluster's token (Ray's token authentication), from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

A job's progress is not read from its log: the job writes a record in its output dir (`ember.runs.progress`), and the
job's metadata (`ember_progress`) says where, when this client can name that place.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ember.connection import (
    ADDRESS_ENV,
    DASHBOARD,
    TOKEN_AUTH_ENV,
    cluster_address,
    find_token,
    is_loopback,
    use_token_auth,
)
from ember.errors import EmberError
from ember.runs.progress import show_progress

# Environment variables a job gets from the client when they are set there (never secrets by default: job
# metadata and runtime envs are visible in the dashboard; pass credentials with --env NAME explicitly).
FORWARDED_ENV = ("EMBER_LOG_LEVEL", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The kinds that write ember.runs.progress records in output.dir.
PROGRESS_KINDS = ("tokenize", "pretrain", "finetune", "preference")


def resolve_dashboard(address: str | None) -> str:
    """The dashboard URL of the cluster to talk to (`ember.connection.cluster_address`, else the local cluster); a
    GCS address is translated (`ember.cluster.address`)."""
    address = cluster_address(address, DASHBOARD)
    from ember.cluster.address import to_dashboard
    from ember.cluster.local import read_state

    local = read_state()
    if not address:
        if local is None:
            raise EmberError("no cluster given: pass --address http://HOST:8265 (the cluster's Ray dashboard) or "
                             "HOST:6379 (its GCS), set RAY_ADDRESS, or start a local one with `ember cluster up`")
        return local.dashboard_url
    return to_dashboard(address, local).address


def auth_headers() -> dict[str, str]:
    """The cluster token as Ray's clients send it, looked up where Ray looks for it."""
    token = find_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _explain(exc: Exception, url: str) -> EmberError:
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError) or "401" in str(exc)[:80] or "403" in str(exc)[:80]:
        return EmberError(f"the cluster at {url} refused this client: its token is missing or wrong. Use the "
                          "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) with "
                          "RAY_AUTH_MODE=token")
    if isinstance(exc, ConnectionError) or "Failed to connect" in str(exc):
        return EmberError(f"cannot reach the Ray dashboard at {url} ({exc}); is the cluster up, and is that its "
                          "dashboard address (port 8265 by default)?")
    return EmberError(f"the Ray Jobs API at {url} failed: {exc}")


class Jobs:
    """A Ray Jobs API client whose failures are EmberErrors naming the cluster."""

    def __init__(self, address: str | None = None):
        self.url = resolve_dashboard(address)
        use_token_auth()
        # Ray's Jobs and State clients let RAY_API_SERVER_ADDRESS or RAY_ADDRESS override the address they are
        # given: pinned here, every one of them talks to the cluster this client resolved.
        os.environ[ADDRESS_ENV[DASHBOARD][0]] = self.url  # the first they read (RAY_ADDRESS may name a GCS)
        from ray.job_submission import JobSubmissionClient

        try:
            self.client = JobSubmissionClient(self.url)
        except Exception as exc:  # noqa: BLE001 (whatever Ray's client raises becomes one EmberError naming the URL)
            raise _explain(exc, self.url) from None

    def call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except EmberError:
            raise
        except Exception as exc:  # noqa: BLE001 (Ray's client raises bare exceptions; each becomes an EmberError)
            if "does not exist" in str(exc) or "404" in str(exc)[:60]:
                job = args[0] if args else "?"
                raise EmberError(f"no job {job} on the cluster at {self.url} (`ember jobs list` shows them)") from None
            raise _explain(exc, self.url) from None

    def info(self, job_id: str):
        return self.call("get_job_info", job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0):
        """Blocks until the job ends (or `timeout` passes); returns its JobDetails."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            info = self.info(job_id)
            if str(info.status) in TERMINAL or (deadline is not None and time.time() > deadline):
                return info
            time.sleep(poll)

    def follow(self, job_id: str, out=sys.stdout) -> None:
        """Streams the job's logs until it ends."""

        import logging

        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."

        async def tail():
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        try:
            asyncio.run(tail())
        except Exception as exc:  # noqa: BLE001 (whatever Ray's client raises becomes one EmberError naming the URL)
            raise _explain(exc, self.url) from None


def _job_name(spec, path: Path) -> str:
    name = getattr(spec, "name", None) or path.stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:40] or "job"


def progress_location(spec, workdir: str | None, same_machine: bool) -> str | None:
    """Where the job will keep its progress record (`ember.runs.progress`), as this client names it: the spec's output
    dir as an absolute path or a URI. None for a kind that writes none, and for a path whose meaning only the job's node
    knows: a relative one resolved in Ray's temporary working dir (no --workdir), or `~` on another machine."""
    if spec.kind not in PROGRESS_KINDS:
        return None
    directory = spec.output.dir
    if "://" in directory:
        return directory
    if directory.startswith("~"):
        return os.path.expanduser(directory) if same_machine else None
    if os.path.isabs(directory):
        return os.path.normpath(directory)
    if workdir and os.path.isabs(workdir):
        return os.path.normpath(os.path.join(workdir, directory))
    return None


def job_metadata(spec, path: Path, overrides: list[str], workdir: str | None, same_machine: bool) -> dict[str, str]:
    """What `ember jobs` and the dashboard show about the job, and where `ember status` finds its progress."""
    meta = {"ember_kind": spec.kind, "ember_spec": str(path), "ember_name": _job_name(spec, path),
            "ember_overrides": " ".join(overrides), "ember_workdir": workdir or ""}
    location = progress_location(spec, workdir, same_machine)
    if location:
        meta["ember_progress"] = location
    return meta


def job_progress(jobs: Jobs, meta: dict) -> tuple[dict | None, str]:
    """(the record, the text to show) of a job's progress, read where its metadata says the job writes it; the
    client shares the job's disk when the cluster runs on this machine."""
    location = meta.get("ember_progress")
    if not location:
        return None, ""
    return show_progress(location, shared=is_loopback(jobs.url))


def submit(spec_path: str, overrides: list[str], *, address: str | None = None, env: list[str] = (),
           workdir: str | None = None, wait: bool = False, out=sys.stdout) -> tuple[str, str | None]:
    """Submits the spec; returns (submission id, final status when `wait`, else None)."""
    import ember
    from ember.config import load_spec

    path = Path(spec_path)
    spec = load_spec(path, overrides)  # a spec with bad keys or values is refused here, before anything is sent
    jobs = Jobs(address)
    if workdir is None and is_loopback(jobs.url):
        workdir = os.getcwd()  # same machine: relative paths mean what they mean here, as with `ember run`
    env_vars = {"PYTHONUNBUFFERED": "1", **TOKEN_AUTH_ENV}
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    for item in env:
        key, eq, value = item.partition("=")
        if not eq:
            if key not in os.environ:
                raise EmberError(f"--env {key}: not set in this shell; pass --env {key}=VALUE")
            value = os.environ[key]
        env_vars[key] = value
    command = ["python", "-m", "ember.cli", "run", "spec.yaml"]
    for item in overrides:
        command += ["--set", item]
    if workdir:
        command += ["--workdir", workdir]
    submission_id = f"ember-{spec.kind}-{_job_name(spec, path)}-{uuid.uuid4().hex[:6]}"
    package = Path(ember.__file__).parent
    with tempfile.TemporaryDirectory(prefix="ember-submit-") as staging:
        shutil.copyfile(path, Path(staging) / "spec.yaml")
        submission_id = jobs.call(
            "submit_job", entrypoint=shlex.join(command), submission_id=submission_id,
            runtime_env={"working_dir": staging, "py_modules": [str(package)], "env_vars": env_vars,
                         "excludes": ["__pycache__", "*.pyc"]},
            metadata=job_metadata(spec, path, overrides, workdir, same_machine=is_loopback(jobs.url)))
    print(f"submitted {submission_id} ({spec.kind}: {path}) to {jobs.url}", file=out, flush=True)
    if not wait:
        print(f"  follow it: ember jobs logs {submission_id} --follow --address {jobs.url}", file=out, flush=True)
        return submission_id, None
    jobs.follow(submission_id, out)
    info = jobs.wait(submission_id)
    status = str(info.status)
    print(f"job {submission_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""),
          file=out, flush=True)
    return submission_id, status


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def took(info) -> str:
    """How long the job ran, or has run so far."""
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    return f"{(end - info.start_time) / 1000:.0f}s"


def list_jobs(jobs: Jobs, ember_only: bool = False) -> list:
    found = jobs.call("list_jobs")
    if ember_only:
        found = [j for j in found if (j.metadata or {}).get("ember_kind")]
    return sorted(found, key=lambda j: j.start_time or 0)


def format_jobs(found: list) -> str:
    rows = [("ID", "KIND", "STATUS", "STARTED", "TOOK", "SPEC")]
    for j in found:
        meta = j.metadata or {}
        rows.append((j.submission_id or j.job_id or "-", meta.get("ember_kind", "-"), str(j.status),
                     _when(j.start_time), took(j), meta.get("ember_spec", j.entrypoint[:40])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def describe(jobs: Jobs, job_id: str) -> str:
    info = jobs.info(job_id)
    meta = info.metadata or {}
    lines = [f"job {job_id}: {info.status}",
             f"  kind: {meta.get('ember_kind', '-')}  spec: {meta.get('ember_spec', '-')}"
             + (f"  overrides: {meta['ember_overrides']}" if meta.get("ember_overrides") else ""),
             f"  started: {_when(info.start_time)}  took: {took(info)}",
             f"  entrypoint: {info.entrypoint}"]
    _, latest = job_progress(jobs, meta)
    if latest:
        lines.append(f"  progress: {latest}")
    if info.message:
        message = info.message.strip().splitlines()
        lines.append(f"  message: {message[0]}")
        # A failed job's message ends with its log; Ember's one-line error is what says what went wrong.
        lines += [f"  {line}" for line in message[1:] if line.startswith("error:")][-3:]
    return "\n".join(lines)
