"""A training job on an autoscaling cluster that starts with no worker node: accepted, the autoscaler adds the nodes
its workers wait for, the job finishes; a job no node type can ever hold is refused at once, naming the node types.

The cluster is `ember cluster up --max-workers 2`: a head of 1 CPU and Ray's own autoscaler (its fake multi-node
provider, a real autoscaler process that starts real raylets on this machine), which may add up to two 1-CPU worker
nodes. What the autoscaler can add is read from the autoscaling config the head's autoscaler runs with, as on a
cluster the Ray cluster launcher made (ember.cluster.capacity).
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import free_port, run_ember, sentences

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ember.cluster import local

    directory = tmp_path_factory.mktemp("autoscaling") / "state"
    info = local.up(workers=0, cpus_per_node=1, head_cpus=1, max_workers=2, directory=directory, port=free_port(),
                    dashboard_port=free_port())
    yield info, {"EMBER_CLUSTER_DIR": str(directory), "RAY_AUTH_MODE": "token"}
    import psutil

    host = psutil.Process(info.pid)
    started = [host, *host.children(recursive=True)]  # the nodes the autoscaler added among them
    local.down(directory)
    assert not [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], \
        "ember cluster down left processes of the autoscaling cluster"


def alive_nodes(env) -> int:
    out = run_ember("cluster", "status", env=env, check=True).stdout
    return int(next(line for line in out.splitlines() if line.startswith("nodes:")).split()[1])


def test_a_job_waits_for_the_nodes_the_autoscaler_adds_and_one_that_never_fits_is_refused(cluster, tmp_path):
    info, env = cluster
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(300, seed=3)))
    tokenize = tmp_path / "tokenize.yaml"
    tokenize.write_text(yaml.safe_dump({
        "kind": "tokenize", "source": {"inputs": [str(corpus)]}, "tokenizer": {"vocab_size": 320},
        "pack": {"seq_len": 32, "val_fraction": 0.05}, "output": {"dir": str(tmp_path / "data")}}))
    run_ember("run", tokenize, "--address", info.address, env=env, check=True)
    assert alive_nodes(env) == 1  # the head only: the tokenizer ran on its one CPU

    pretrain = tmp_path / "pretrain.yaml"
    pretrain.write_text(yaml.safe_dump({
        "kind": "pretrain", "data": {"dir": str(tmp_path / "data")},
        "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": 2},
        "scaling": {"workers": 2}, "output": {"dir": str(tmp_path / "run")}}))
    # 2 workers of 1 CPU, on a cluster of 1 CPU: accepted, and said to wait for the autoscaler's node type.
    run = run_ember("run", pretrain, "--address", info.address, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 × {CPU 1} wait for the autoscaler to add nodes of type worker" in run.stdout + run.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert alive_nodes(env) >= 2  # the autoscaler added worker nodes

    # What no node the cluster has or can add holds is refused before anything starts, naming the node types.
    for change, words in ((["scaling.workers=4", "train.global_batch_size=8"], "4 × {CPU 1}"),
                          (["scaling.use_gpu=true"], "2 × {CPU 8, GPU 1}")):
        refused = run_ember("run", pretrain, "--address", info.address, *[a for c in change for a in ("--set", c)],
                            "--set", f"output.dir={tmp_path / 'never'}", env=env)
        assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"scaling asks for {words} (PACK) but the cluster can never hold them" in refused.stderr
        assert "worker (CPU 1; up to 2)" in refused.stderr and "the head's autoscaling config" in refused.stderr
        assert not (tmp_path / "never").exists()
