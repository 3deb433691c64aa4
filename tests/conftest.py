"""Shared fixtures: one Ray instance for the whole session, small corpora written to temporary files, servers (MLflow,
S3) that stop with whatever they started."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Credentials for the S3-compatible test server (moto on 127.0.0.1). Set before Ray starts, so its workers inherit
# them as they would on a cloud node; the metadata lookup is off so nothing waits on an absent cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "ember-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "ember-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# The node cache of object-storage reads (ember.storage): one of the suite's own, not the machine's, removed at exit.
if "EMBER_CACHE_DIR" not in os.environ:
    os.environ["EMBER_CACHE_DIR"] = tempfile.mkdtemp(prefix="ember-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EMBER_CACHE_DIR"], True)

# Ray Train's controller polls its workers every 2 s by default; polling faster only makes the many short training
# runs of the suite notice their end (or a killed worker) sooner. Set before any Ray process starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train's preemption watcher (an actor per run that polls for nodes being drained) has nothing to watch on one
# machine; without it, each of the suite's training runs starts one process fewer.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402 (after the environment above, which Ray's processes inherit)

REPO = Path(__file__).resolve().parent.parent
EMBER = str(Path(sys.executable).with_name("ember"))


def deepspeed_ops() -> dict[str, int]:
    """The DeepSpeed ops built so far (torch's JIT extension dir): library path -> modification time."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return {str(p): p.stat().st_mtime_ns for p in root.glob("*/*/*.so")}


OPS_AT_START = deepspeed_ops()  # what `make install` prebuilt, before any test's training run


def rebuilt_deepspeed_ops() -> list[str]:
    """The ops `make install` prebuilt that a training run has built again since this process started (a worker
    that found another ninja than the prebuild did would: ember.runtime.use_environment_ninja)."""
    now = deepspeed_ops()
    return sorted(p for p, mtime in OPS_AT_START.items() if now.get(p) != mtime)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(config, items):
    """Tests that use the suite's Ray instance are marked `ray` (`make test-fast` leaves them out). Tests that start
    Ray instances of their own (marked `own_ray`) run first, before the suite's instance exists, so that two Ray
    instances never share this machine's two cores (Ray's own State API clients, such as Ray Train's placement-group
    cleaner, also refuse to choose between two). The order within a module is kept."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_ray") else 1)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (token auth on, as Ray starts it by default)."""
    import logging

    import ray

    if not ray.is_initialized():
        # "local": a new instance, never the machine's "current cluster" (one an `ember cluster up` left behind).
        ray.init(address="local", num_cpus=2, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def ray_address() -> str:
    """The GCS address of this process's Ray instance, for Ray's State API (which, without one, refuses to choose
    when another Ray instance runs on the machine)."""
    import ray

    return ray.get_runtime_context().gcs_address


def train_worker_pids() -> list[int]:
    """The pids of the Ray Train workers alive in this process's Ray instance (what a test kills)."""
    from ray.util.state import list_actors

    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return [a.pid for a in list_actors(address=ray_address(), filters=alive, raise_on_missing_output=False)]


def kill_a_worker_once_checkpointed(run_dir: str, worker_pids, killed: dict, min_step: int, last_step: int,
                                    timeout: float = 300) -> None:
    """SIGKILLs one training worker (the last pid `worker_pids()` gives) once Ray Train's controller has registered a
    checkpoint at step `min_step` or later (its snapshot in the run dir, a path or a URI) and the workers have logged
    a step past it, before `last_step`. Records in `killed` the pid, its nice value, the step logged (`at`) and the
    newest registered checkpoint (`registered`); gives up after `timeout` seconds, leaving `killed` empty. Run it in
    a thread."""
    import json
    import signal
    import time

    from ember import storage

    deadline = time.time() + timeout
    while time.time() < deadline:
        snapshot = storage.read_json(storage.join(run_dir, "checkpoint_manager_snapshot.json")) or {}
        registered = max((c["metrics"]["step"] for c in snapshot.get("checkpoint_results", [])), default=None)
        try:
            done = [json.loads(line)["step"] for line in
                    storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]
        except FileNotFoundError:
            done = []
        if registered is not None and registered >= min_step and done and registered < done[-1] < last_step:
            pids = worker_pids()
            if pids:
                killed.update(pid=pids[-1], at=done[-1], registered=registered,
                              nice=os.getpriority(os.PRIO_PROCESS, pids[-1]))
                os.kill(pids[-1], signal.SIGKILL)
                return
        time.sleep(0.1)


def sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents of varied length."""
    import random

    words = ("the model reads a corpus of text and learns to predict the next token from context while shards "
             "stream through memory mapped files on every rank of the cluster with exact resume after failure").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 120))).capitalize() + "." for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merged(spec: dict, **sections) -> dict:
    """A test's spec with sections changed: a dict merges into the section of that name, anything else replaces it."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A small random Llama (2 layers of 32, GQA 4/2 heads) in eval mode; `overrides` are ModelConfig fields."""
    import torch

    from ember.model import Transformer, preset

    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **overrides}
    return Transformer(preset("tiny", vocab_size=vocab_size, **shape)).eval()


def tiny_model_dir(root: Path, texts: list[str], vocab_size: int, context: int, **overrides) -> Path:
    """A model dir of a tiny_model with a tokenizer trained on `texts` (end of text: token 0)."""
    from ember.data.tokenizer import save_tokenizer, train_tokenizer
    from ember.model import save_model

    save_tokenizer(train_tokenizer(texts, vocab_size), root / "tok", model_max_length=context)
    model = tiny_model(vocab_size, max_position_embeddings=context, **overrides)
    return save_model(model, root / "model", tokenizer_dir=root / "tok", eos_token_id=0)


def run_ember(*args, env: dict | None = None, cwd=REPO, timeout: float = 300, check: bool = False):
    """`ember ARGS` in a subprocess, as a user runs it: (stdout, stderr) captured as text, `env` added to this
    process's environment; `check` fails the test with both outputs when it exits non-zero."""
    import subprocess

    result = subprocess.run([EMBER, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"ember {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto in server mode) with one bucket: (bucket, host:port, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        client.create_bucket(Bucket="ember-corpus")
        yield "ember-corpus", f"127.0.0.1:{port}", client
    finally:
        server.stop()


def wait_for_http(url: str, deadline: float, running=lambda: True, read_timeout: float = 2) -> bool:
    """GETs `url` until it answers 200 (True) or the `deadline` (time.monotonic()) passes or `running()` turns false
    (False). Every failed try is "not yet": a refused connection, a timeout (a busy machine answers slowly), an error
    status."""
    import time

    import requests

    while running() and time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=(2, read_timeout)).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def stop_process_group(proc, timeout: float = 30) -> None:
    """Stops everything in the process group `proc` leads (started with start_new_session): the server and the
    workers it started, SIGTERM first and SIGKILL for what is left after `timeout`."""
    import signal
    import subprocess
    import time

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)  # reaps the leader, so that only live members answer below
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return


@contextlib.contextmanager
def http_server(args: list[str], url: str, log_path: Path, timeout: float = 120, ready_path: str = "/health"):
    """A server process started in a process group of its own, yielded (its `url`) once GET `ready_path` answers
    200; its whole group is stopped afterwards, and also when it is not ready within `timeout` seconds (the test
    then fails with its log's tail) or the set-up fails in any other way."""
    import subprocess
    import time

    with open(log_path, "w") as log:
        server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not wait_for_http(f"{url}{ready_path}", time.monotonic() + timeout, lambda: server.poll() is None):
                raise AssertionError(f"{Path(args[0]).name} did not get ready within {timeout:.0f}s (exit code "
                                     f"{server.poll()}):\n{log_path.read_text()[-3000:]}")
            yield url
        finally:
            stop_process_group(server)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (`mlflow server`, SQLite backend, artifacts it stores itself in a
    temp dir, uploaded to it over HTTP): its URL. Stopped with its workers, however its set-up ends."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    args = [str(Path(EMBER).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    with http_server(args, f"http://127.0.0.1:{port}", root / "server.log") as url:
        yield url


# ----------------------------------------------------------------- serving: one tiny model and one app for the suite

WORDS = "the fox is red and the crow is black while the whale lives in the sea near the quiet shore".split()
CONTEXT = 1024  # the served tiny model's context: long enough that a request can outlast any client's reaction


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model with a CONTEXT-token context and a tokenizer trained on WORDS (heads of 32: the smallest
    vLLM's CPU attention takes)."""
    return tiny_model_dir(tmp_path_factory.mktemp("served"), [" ".join(WORDS)] * 50, 300, CONTEXT, hidden_size=128,
                          intermediate_size=256)


@pytest.fixture(scope="session")
def serve_port(ray_session) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def deploy(name: str, prefix: str, **args):
    from ray import serve

    from ember.serve.app import build_app

    # A quarter of a CPU per engine replica, and a small KV cache: several apps fit the suite's 2-CPU instance.
    serve.run(build_app({"num_cpus": 0.25, "ingress_num_cpus": 0, "kv_cache_memory_gb": 0.25, **args}), name=name,
              route_prefix=prefix, blocking=False)


@contextlib.contextmanager
def deployed(name: str, port: int, api_key: str | None = None, **args):
    """A Serve app of its own at /NAME for one test: deployed, answering, and deleted afterwards whatever happens.
    Yields its base URL."""
    from ray import serve

    from ember.serve.launch import wait_ready

    try:
        deploy(name, f"/{name}", **args)
        base = f"http://127.0.0.1:{port}/{name}"
        wait_ready(base, api_key=api_key, app=name)
        yield base
    finally:
        serve.delete(name)


def lora_adapter(model_dir: Path, root: Path, seed: int, targets: list[str]) -> tuple[Path, Path]:
    """A LoRA adapter of random weights on `model_dir`, in Ember's (PEFT's) format, and its merged export."""
    import torch

    from ember.config.specs import LoraSpec
    from ember.model import load_model, save_model
    from ember.train.lora import adapter_state, apply_lora, merge_lora, save_adapter

    torch.manual_seed(seed)
    spec = LoraSpec(rank=8, alpha=16, dropout=0.0, target_modules=targets)
    model = load_model(model_dir)
    with torch.no_grad():
        for p in apply_lora(model, spec):  # B starts at 0: an update large enough to change the greedy tokens
            p.normal_(std=0.3)
    save_adapter(adapter_state(model), spec, str(model_dir), root / "adapter")
    merged = save_model(merge_lora(model), root / "merged", tokenizer_dir=model_dir, eos_token_id=0)
    shutil.copy(model_dir / "generation_config.json", merged / "generation_config.json")
    return root / "adapter", merged


@pytest.fixture(scope="session")
def adapters(model_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Two adapters of the tiny model on different projections: name -> (adapter dir, merged model dir)."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a": lora_adapter(model_dir, root / "a", 1, ["q_proj", "v_proj", "down_proj"]),
            "b": lora_adapter(model_dir, root / "b", 2, ["k_proj", "o_proj", "gate_proj", "up_proj"])}


@pytest.fixture(scope="session")
def server(model_dir, adapters, serve_port) -> str:
    """The app most serving tests share: one replica of the tiny model at /main, with two LoRA adapters."""
    from ember.serve.launch import wait_ready

    deploy("main", "/main", model_dir=str(model_dir), model_name="tiny", num_replicas=1, max_num_seqs=8,
           max_body_bytes=300_000, adapters={name: str(a) for name, (a, _) in adapters.items()})
    wait_ready(f"http://127.0.0.1:{serve_port}/main", app="main")
    return f"http://127.0.0.1:{serve_port}/main"


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_ids(model_dir: Path, text: str, n: int, stop_ids=frozenset({0})) -> list[int]:
    """The tokens `ember generate` answers (greedy; by default the model's end-of-text, token 0, stops it)."""
    from ember.data.tokenizer import load_tokenizer
    from ember.model import SamplingParams, generate_ids, load_model

    tok = load_tokenizer(model_dir)
    return generate_ids(load_model(model_dir), [tok.encode(text, add_special_tokens=False).ids],
                        SamplingParams(max_new_tokens=n, temperature=0.0), set(stop_ids))[0]


def greedy(model_dir: Path, text: str, n: int, stop_ids=frozenset({0})) -> str:
    """What `ember generate` answers, as text."""
    from ember.data.tokenizer import load_tokenizer

    return load_tokenizer(model_dir).decode(greedy_ids(model_dir, text, n, stop_ids))
