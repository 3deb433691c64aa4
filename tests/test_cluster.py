"""A real local multi-node Ray cluster (`ember cluster up`: a head and 2 worker nodes, each its own raylet with one
CPU), jobs submitted to it with `ember submit` through the Ray Jobs API, the app served on it, `ember status`, and a
real Prometheus scraping it through Ray's service-discovery file.

The module's tests share one cluster and one chain of jobs (the `trained` fixture), all on object storage (the S3
server on 127.0.0.1; each node has its own node cache, and none shares a disk path with another): the data the
tokenize job writes is what the pretraining job trains on (one of its workers killed mid-run), the model it exports is
what the fine-tune starts from, the evaluation compares the two, and the fine-tuned model is what gets served. Each
test asks for what it uses, so any of them runs alone or in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO, free_port, kill_a_worker_once_checkpointed, run_ember, sentences
from ember import storage

# The cluster is this module's only Ray instance (own_ray: it runs before the suite's shared one starts).
pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


class Cluster:
    """The running cluster, its state dir, and (when Debian's prometheus is installed) a Prometheus scraping it."""

    def __init__(self, info, directory, tmp):
        self.info, self.directory, self.tmp = info, directory, tmp
        self.env = {"EMBER_CLUSTER_DIR": str(directory), "RAY_AUTH_MODE": "token"}
        self.prometheus = None
        self.prometheus_url = None

    def ember(self, *args, **kw):
        return run_ember(*args, env={**self.env, **kw.pop("env", {})}, **kw)

    def job_id(self, stdout: str) -> str:
        return next(line.split()[1] for line in stdout.splitlines() if line.startswith("submitted "))

    def start_prometheus(self) -> None:
        """Prometheus with the shipped config, pointed at this cluster's service-discovery file."""
        binary = shutil.which("prometheus")
        if binary is None:
            return
        config = yaml.safe_load((REPO / "cluster" / "monitoring" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [self.info.service_discovery_file]
        path = self.tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        self.prometheus = subprocess.Popen(
            [binary, f"--config.file={path}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={self.tmp / 'tsdb'}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.prometheus_url = f"http://127.0.0.1:{port}"

    def metric_names(self) -> set[str]:
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/label/__name__/values", timeout=5) as r:
            return set(json.loads(r.read())["data"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ember.cluster import local

    tmp = tmp_path_factory.mktemp("cluster")
    directory = tmp / "state"
    info = local.up(workers=2, cpus_per_node=1, directory=directory, port=free_port(), dashboard_port=free_port())
    c = Cluster(info, directory, tmp)
    import psutil

    try:  # the cluster and Prometheus stop however the set-up or the tests end
        c.start_prometheus()
        yield c
    finally:
        if c.prometheus is not None:
            c.prometheus.terminate()
            c.prometheus.wait(10)
        host = psutil.Process(info.pid)
        started = [host, *host.children(recursive=True)]
        local.down(directory)
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
        "ember cluster down left processes it started"
    assert local.read_state(directory) is None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(sentences(400, seed=7)))
    return path


def test_cluster_status_shows_a_head_and_two_worker_nodes(cluster):
    out = cluster.ember("cluster", "status", check=True).stdout
    assert "nodes: 3 alive" in out
    assert out.count("worker ") == 2 and out.count("head ") == 1
    assert cluster.info.dashboard_url.startswith("http://127.0.0.1:")
    # Every node's metrics endpoint is on loopback, listed in Ray's service-discovery file.
    targets = json.loads(open(cluster.info.service_discovery_file).read())[0]["targets"]
    assert {f"127.0.0.1:{p}" for p in cluster.info.metrics_ports} <= set(targets)
    assert all(t.startswith("127.0.0.1:") for t in targets)
    # A second `up` on the same state dir refuses instead of starting a second cluster.
    again = cluster.ember("cluster", "up", "--dir", str(cluster.directory), "--port", str(free_port()),
                          "--dashboard-port", str(free_port()))
    assert again.returncode == 1 and "already running" in again.stderr


def test_a_client_without_the_cluster_token_is_refused(cluster, tmp_path):
    url = cluster.info.dashboard_url
    assert requests.get(f"{url}/api/jobs/", timeout=10).status_code == 401
    wrong = cluster.ember("jobs", "list", env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 1 and "refused this client" in wrong.stderr and "token" in wrong.stderr
    # No token anywhere: an empty home and none in the environment.
    none = cluster.ember("jobs", "list", env={"HOME": str(tmp_path), "RAY_AUTH_TOKEN": ""})
    assert none.returncode == 1 and "refused this client" in none.stderr
    assert cluster.ember("jobs", "list").returncode == 0


def test_the_job_commands_take_the_gcs_address_too(cluster, tmp_path):
    """`--address HOST:PORT` (the GCS) finds the dashboard: from the local cluster's state, or, for a cluster Ember
    did not start (no state here), from what the dashboard recorded in the GCS. Each says which URL it used."""
    gcs, url = cluster.info.address, cluster.info.dashboard_url
    local = cluster.ember("jobs", "list", "--address", gcs, check=True)
    assert f"cluster: {url} (Ray dashboard, from the GCS address {gcs}: the local cluster" in local.stderr
    other = cluster.ember("jobs", "list", "--address", gcs, env={"EMBER_CLUSTER_DIR": str(tmp_path)}, check=True)
    assert other.stderr.startswith(f"cluster: {url} (Ray dashboard, from the GCS address {gcs})")
    assert "cluster:" not in cluster.ember("jobs", "list", "--address", url, check=True).stderr


class Trained:
    """The jobs the `trained` fixture ran, all on one bucket prefix: where each wrote, what the CLI printed for each,
    and the worker the pretraining job lost."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


DEMO = REPO / "jobs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The directory every job is submitted from (its --workdir): every artefact goes to the bucket, so it stays
    empty."""
    return tmp_path_factory.mktemp("workdir")


@pytest.fixture(scope="module")
def trained(cluster, corpus, s3_server, workdir) -> Trained:
    """The demo's specs, changed only by --set, as jobs on the cluster with every path in object storage (the S3
    server on 127.0.0.1): no node shares a disk path with another, and each has its own node cache.

    A tokenize job (`submit --wait`, with `--env`); a 2-worker pretraining job on its data (submitted, then followed
    with `jobs logs --follow` until it ends), one of whose workers is killed once Ray Train holds a checkpoint in the
    bucket, so that the restarted workers restore from there; a fine-tune of the exported model's URI; an evaluation
    of both models' URIs."""
    bucket, endpoint, _ = s3_server
    root = f"s3://{bucket}/cluster-jobs?endpoint_override={endpoint}&scheme=http"
    data, run, tuned = storage.join(root, "data"), storage.join(root, "run"), storage.join(root, "finetune")
    results = storage.join(root, "evaluate", "results.json")

    def submit(spec: str, *overrides: str, flags: tuple[str, ...] = ("--wait",)):
        sets = [arg for item in overrides for arg in ("--set", item)]
        return cluster.ember("submit", DEMO / spec, *sets, *flags, cwd=workdir, check=True)

    tok = submit("tokenize-demo.yaml", f"source.inputs=[{corpus}]", "source.text_unit=paragraph",
                 "tokenizer.vocab_size=512", "pack.seq_len=64", f"output.dir={data}",
                 flags=("--env", "EMBER_TEST_MARK=from-the-cli", "--wait"))
    submitted = submit("pretrain-demo.yaml", f"data.dir={data}", f"output.dir={run}", "train.max_steps=12",
                       "train.log_every=1", "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=4",
                       "train.global_batch_size=8", "train.micro_batch_size=4", "model.num_hidden_layers=2",
                       flags=())
    job = cluster.job_id(submitted.stdout)
    killed: dict = {}
    killer = threading.Thread(target=kill_a_worker_once_checkpointed,
                              args=(run, job_worker_pids(cluster, job), killed, 4, 12), daemon=True)
    killer.start()
    followed = cluster.ember("jobs", "logs", job, "--follow", check=True, timeout=600)
    killer.join()
    finetune = submit("finetune-demo.yaml", f"base={storage.join(run, 'model')}", f"output.dir={tuned}",
                      "data.seq_len=128", "train.max_steps=4", "train.log_every=2", "train.eval_every=4",
                      "train.checkpoint_every=4", "train.global_batch_size=8")
    evaluate = submit("evaluate-demo.yaml", f"models.base={storage.join(run, 'model')}",
                      f"models.finetuned={storage.join(tuned, 'model')}", f"data.dir={storage.join(tuned, 'data')}",
                      f"output.file={results}", "generation.max_examples=3", "generation.max_new_tokens=8")
    return Trained(root=root, data=data, run=run, tuned=tuned, results=results, tokenize=tok, submitted=submitted,
                   followed=followed, killed=killed, finetune=finetune, evaluate=evaluate)


def job_worker_pids(cluster, job: str):
    """A function giving the pids of the job's live training workers (through Ray's State API)."""
    def pids() -> list[int]:
        ray_job = _ray_job_id(cluster, job)
        return [a["pid"] for a in _actors(cluster) if a["class_name"] == "RayTrainWorker" and a["job_id"] == ray_job
                and a["state"] == "ALIVE"]
    return pids


def test_tokenize_and_pretrain_jobs_run_across_nodes(cluster, trained):
    tok = trained.tokenize
    assert "dataset: " in tok.stdout and tok.stdout.rstrip().endswith("SUCCEEDED")
    assert f"ray: {cluster.info.address} (3 CPUs)" in tok.stdout
    assert storage.is_file(storage.join(trained.data, "manifest.json"))
    env = requests.get(f"{cluster.info.dashboard_url}/api/jobs/{cluster.job_id(tok.stdout)}", timeout=10,
                       headers=_auth()).json()["runtime_env"]["env_vars"]
    assert env["EMBER_TEST_MARK"] == "from-the-cli"  # --env NAME=VALUE reached the job's environment

    job = cluster.job_id(trained.submitted.stdout)
    assert job.startswith("ember-pretrain-pretrain-demo-")
    # `jobs logs --follow` streamed the job's output until the job ended.
    assert "step 12/12" in trained.followed.stdout and "pretrain: done at step 12" in trained.followed.stdout
    assert storage.is_file(storage.join(trained.run, "model", "model.safetensors"))
    assert storage.list_names(trained.run) >= {"spec.yaml", "metrics.jsonl", "result.json", "model"}
    assert any(name.startswith("checkpoint_") for name in storage.list_names(trained.run))

    logs = cluster.ember("jobs", "logs", job, check=True).stdout
    assert "step 12/12" in logs and "pretrain: done at step 12" in logs and "val loss" in logs
    assert f"ray: {cluster.info.address} (3 CPUs)" in logs, "the job's driver joined its own cluster"
    # Job supervisors find their cluster through its own record, whatever other Ray instance the machine runs.
    record = Path(cluster.info.service_discovery_file).with_name("ray_current_cluster")
    assert record.read_text().strip() == cluster.info.address
    status = cluster.ember("jobs", "status", job, check=True).stdout
    assert "SUCCEEDED" in status and "kind: pretrain" in status and "progress: step 12/12" in status

    # Each worker group (the first, one of whose workers was killed, and the restarted one) had its two workers
    # (1 CPU each, nodes of 1 CPU) on two different nodes: Ray's State API says where.
    ray_job = _ray_job_id(cluster, job)
    groups: dict[str, list[dict]] = {}  # each worker group has a placement group of its own
    for a in _actors(cluster):
        if a["class_name"] == "RayTrainWorker" and a["job_id"] == ray_job:
            groups.setdefault(a["placement_group_id"], []).append(a)
    assert sorted(len(g) for g in groups.values()) == [2, 2], groups
    assert [len({a["node_id"] for a in g}) for g in groups.values()] == [2, 2]
    assert any(trained.killed["pid"] in {a["pid"] for a in g} for g in groups.values())
    # Each of those nodes read the shards through its own node cache (no node sees another's files).
    from ember.cluster.local import node_cache_dir

    fetched = [i for i in range(3) if any(p.name.endswith(".arrow") for p in
                                          node_cache_dir(cluster.directory, i).rglob("*"))]
    assert len(fetched) >= 2, fetched
    listed = cluster.ember("jobs", "list", "--ember", check=True).stdout
    assert job in listed and "tokenize" in listed


def test_a_killed_worker_resumes_from_the_checkpoint_in_the_bucket(trained):
    """The restarted workers restored Ray Train's latest checkpoint from the bucket and redid the steps the killed
    group had logged past it with the same losses: the loss curve is an uninterrupted run's."""
    killed = trained.killed
    assert killed and killed["registered"] < killed["at"] < 12, killed  # (the killer gives up after 300 s)
    metrics = [json.loads(line) for line in storage.read_text(storage.join(trained.run, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 13))
    assert [r["samples"] for r in metrics] == [8 * s for s in range(1, 13)]
    [restore] = [json.loads(x) for x in storage.read_text(storage.join(trained.run, "restores.jsonl")).splitlines()]
    assert restore["source"] == "latest" and restore["step"] == killed["registered"]
    superseded = {r["step"]: r["loss"] for r in restore["superseded"]}
    assert superseded and max(superseded) >= killed["at"]
    redone = {r["step"]: r["loss"] for r in metrics}
    for step, loss in superseded.items():
        assert abs(loss - redone[step]) < 1e-5, (step, loss, redone[step])


def test_fine_tune_and_evaluation_jobs_read_models_from_the_bucket(trained, workdir, cluster):
    """The fine-tune starts from the exported model's URI, the evaluation compares both URIs; afterwards every
    artefact of the five jobs is an object in the bucket, and neither the jobs' working dir nor any job's runtime
    working dir on the cluster holds one."""
    assert trained.finetune.stdout.rstrip().endswith("SUCCEEDED") and "finetune: done at step 4" in \
        trained.finetune.stdout
    spec = yaml.safe_load(storage.read_text(storage.join(trained.tuned, "spec.yaml")))
    assert spec["base"] == storage.join(trained.run, "model")
    assert storage.is_file(storage.join(trained.tuned, "model", "model.safetensors"))
    assert storage.is_file(storage.join(trained.tuned, "data", "manifest.json"))
    results = storage.read_json(trained.results)
    assert trained.evaluate.stdout.rstrip().endswith("SUCCEEDED")
    assert {name: r["model"] for name, r in results.items()} == {
        "base": storage.display(storage.join(trained.run, "model")),
        "finetuned": storage.display(storage.join(trained.tuned, "model"))}
    assert all(r["conversations"]["answered"] == 3 for r in results.values())
    assert not list(workdir.iterdir())
    staged = [d for d in Path(cluster.info.session_dir, "runtime_resources", "working_dir_files").iterdir()
              if d.is_dir()]  # one per job's working dir (beside them, Ray's lock files)
    assert staged and all([p.name for p in d.rglob("*")] == ["spec.yaml"] for d in staged)


def _auth() -> dict:
    from ember.cluster.jobs import auth_headers

    return auth_headers()


def _actors(cluster) -> list[dict]:
    """Every actor the cluster knows, alive or dead, from Ray's State API (over the dashboard, with the token)."""
    from ember.cluster.jobs import auth_headers

    r = requests.get(f"{cluster.info.dashboard_url}/api/v0/actors", headers=auth_headers(), timeout=30,
                     params={"detail": "1", "limit": "1000"})
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def _ray_job_id(cluster, submission_id: str) -> str:
    from ember.cluster.jobs import auth_headers

    r = requests.get(f"{cluster.info.dashboard_url}/api/jobs/{submission_id}", headers=auth_headers(), timeout=10)
    return r.json()["job_id"]


@pytest.fixture(scope="module")
def served(cluster, trained) -> str:
    """The fine-tuned model's URI served on the cluster with `ember serve --detach` (each replica pulls it through its
    node's cache); the keys are in `ember serve`'s
    environment only, not the cluster's. Returns the API's base URL."""
    port = free_port()
    # Given the dashboard URL, `ember serve` joins the cluster at its GCS address, and says so.
    served = cluster.ember("serve", storage.join(trained.tuned, "model"), "--address", cluster.info.dashboard_url,
                           "--detach",
                           "--port", str(port), env={"EMBER_API_KEYS": "cluster-key-1,cluster-key-2"}, check=True)
    assert f"http://127.0.0.1:{port}/v1" in served.stdout and "cluster-key" not in served.stdout + served.stderr
    assert (f"cluster: {cluster.info.address} (Ray GCS, from the dashboard URL {cluster.info.dashboard_url}: the "
            "local cluster") in served.stderr
    return f"http://127.0.0.1:{port}/v1"


def ask(base: str, stream: bool = False, **fields) -> requests.Response:
    return requests.post(f"{base}/completions", json={"model": "model", "prompt": "The model", "max_tokens": 6,
                                                      "stream": stream, **fields},
                         headers={"Authorization": "Bearer cluster-key-2"}, timeout=60)


def test_serving_on_the_cluster_and_ember_status(cluster, served):
    """The replicas enforce the keys they got as digests, though their nodes' environment has none."""
    for headers in ({}, {"Authorization": "Bearer cluster-key-3"}):
        r = requests.post(f"{served}/completions", json={"model": "model", "prompt": "The model", "max_tokens": 6},
                          headers=headers, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for stream in (False, True, False):
        assert ask(served, stream).status_code == 200
    from openai import OpenAI

    client = OpenAI(base_url=served, api_key="cluster-key-1", max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="model", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "What does json.dumps do?"}])
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 8
    assert ask(served, max_tokens=-1).status_code == 400
    status = cluster.ember("status", check=True).stdout
    assert "nodes: 3 alive" in status and "in use:" in status
    assert "ember/EmberLLMServer:model: RUNNING, 1/1 replicas running" in status
    assert "ember/EmberIngress: RUNNING" in status
    assert "step 12/12" in status and "tokenize" in status
    assert "tokens, done" in status  # the tokenize job's last progress record
    assert f"dashboard: {cluster.info.dashboard_url}" in status


def test_prometheus_scrapes_every_metric_the_grafana_dashboard_names(cluster, trained, served):
    if cluster.prometheus is None:
        why = "Prometheus is not installed (Debian: apt-get install prometheus; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: in CI this test must run")  # CI installs it; a skip there would hide a gap
        pytest.skip(why)
    from test_cluster_files import dashboard_metric_names

    for stream in (False, True):  # the serving metrics: requests, tokens, latencies, sequences, KV cache
        assert ask(served, stream).status_code == 200
    shared = "The model reads a corpus of text and learns to predict the next token. " * 12  # > 128 tokens
    for _ in range(2):  # a prompt of several KV blocks twice: the prefix cache's hits
        assert ask(served, prompt=shared).status_code == 200
    assert ask(served, max_tokens=-1).status_code == 400
    # MFU needs a GPU's peak FLOPs; on a CPU run the gauge is never set, so it cannot be scraped here.
    wanted = dashboard_metric_names() - {"ray_ember_train_mfu"}
    deadline, missing = time.time() + 60, wanted
    while time.time() < deadline:
        with contextlib.suppress(OSError):  # a slow or refused answer is "not yet" (URLError and timeouts are OSErrors)
            missing = wanted - cluster.metric_names()
        if not missing:
            break
        time.sleep(2)
    assert not missing, f"not scraped: {sorted(missing)}"
    with urllib.request.urlopen(f"{cluster.prometheus_url}/api/v1/query?query="
                                "max_over_time(ray_ember_train_step[30m])", timeout=5) as r:
        series = json.loads(r.read())["data"]["result"]
    assert any(float(s["value"][1]) == 12 and s["metric"]["run"] == "pretrain-demo" for s in series)


def test_a_running_job_can_be_stopped(cluster, trained, tmp_path):
    submitted = cluster.ember("submit", "jobs/pretrain-demo.yaml", "--set", f"data.dir={trained.data}",
                              "--set", f"output.dir={tmp_path / 'long'}", "--set", "train.max_steps=100000",
                              "--set", "model.num_hidden_layers=2", check=True)
    job = cluster.job_id(submitted.stdout)
    deadline = time.time() + 120
    while "RUNNING" not in cluster.ember("jobs", "status", job).stdout and time.time() < deadline:
        time.sleep(1)
    stopped = cluster.ember("jobs", "stop", job, check=True)
    assert f"job {job}: STOPPED" in stopped.stdout
    assert "STOPPED" in cluster.ember("jobs", "status", job, check=True).stdout
    # The job's processes go with it: no actor of it (trainer controller, training workers) stays alive.
    ray_job = _ray_job_id(cluster, job)
    deadline = time.time() + 60
    while time.time() < deadline:
        alive = [a for a in _actors(cluster) if a["job_id"] == ray_job and a["state"] != "DEAD"]
        if not alive:
            break
        time.sleep(1)
    assert not alive, [a["class_name"] for a in alive]
    assert "already ended" in cluster.ember("jobs", "stop", job, check=True).stdout


def test_specs_are_checked_before_submission_and_inputs_where_the_job_runs(cluster, tmp_path):
    before = cluster.ember("jobs", "list", check=True).stdout
    bad = cluster.ember("submit", "jobs/tokenize-demo.yaml", "--set", "pack.seq_lenn=64")
    assert bad.returncode == 1 and "seq_lenn" in bad.stderr and "did you mean" in bad.stderr
    assert cluster.ember("jobs", "list", check=True).stdout == before, "a refused spec submitted nothing"

    missing = tmp_path / "not-there.txt"
    failed = cluster.ember("submit", "jobs/tokenize-demo.yaml", "--wait", "--set", f"source.inputs=[{missing}]",
                           "--set", f"output.dir={tmp_path / 'out'}")
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    job = cluster.job_id(failed.stdout)
    status = cluster.ember("jobs", "status", job, check=True).stdout
    assert "FAILED" in status and f"error: input not found: {missing}" in status
    assert f"input not found: {missing}" in cluster.ember("jobs", "logs", job, check=True).stdout
