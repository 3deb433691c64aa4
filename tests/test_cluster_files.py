"""The cluster definitions in cluster/ against the schemas Ray ships: the launcher's ray-schema.json, Ray Serve's
config schema, and KubeRay's API versions and required fields; the Grafana dashboard's queries name Ember's metrics;
the cloud files' security settings: IMDSv2 on every node, the head's scoped IAM policy, the image's .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

KUBERAY = REPO / "cluster" / "kuberay"


def test_the_launcher_config_is_valid_for_the_ray_cluster_launcher():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(config))  # and as `ray up` sees it, with the provider's defaults filled in
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p")) and gpu["max_workers"] >= gpu["min_workers"]
    assert any("pip install" in c and "ember" in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands",
                                                                     "worker_start_ray_commands"))
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_a_broken_launcher_config_is_refused_by_the_same_check():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="eight"):
        validate_config(prepare_config(config))


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def test_every_aws_node_requires_imdsv2_and_the_head_has_a_scoped_profile_of_its_own():
    """The head (autoscaler and job drivers) gets cluster/aws-head-policy.json, not the launcher's default role (full
    EC2 and S3): the autoscaler's calls, EC2 changes only to this cluster's instances and worker types, the workers'
    role to pass, and the run bucket. Every node type requires IMDSv2."""
    text = (REPO / "cluster" / "aws.yaml").read_text()
    aws = yaml.safe_load(text)
    types = aws["available_node_types"]
    for name, node_type in types.items():
        assert node_type["node_config"].get("MetadataOptions", {}).get("HttpTokens") == "required", name
    head = types[aws["head_node_type"]]["node_config"]
    assert head["IamInstanceProfile"] == {"Name": "ember-head"} and "cluster/aws-head-policy.json" in text
    workers = {n: t["node_config"] for n, t in types.items() if n != aws["head_node_type"]}

    policy = json.loads((REPO / "cluster" / "aws-head-policy.json").read_text())
    assert policy["Version"] == "2012-10-17" and all(s["Effect"] == "Allow" for s in policy["Statement"])
    granted = {a: [] for s in policy["Statement"] for a in _listed(s["Action"])}
    for s in policy["Statement"]:
        for action in _listed(s["Action"]):
            granted[action].append(s)
    assert set(granted) == {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:RunInstances",
                            "ec2:CreateTags", "ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances",
                            "iam:PassRole", "s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    unscoped = {a for a, statements in granted.items() for s in statements if "*" in _listed(s["Resource"])}
    assert unscoped == {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes"}, "only reads on every resource"
    [launch] = [s for s in granted["ec2:RunInstances"] if s["Resource"] == "arn:aws:ec2:*:*:instance/*"]
    assert set(launch["Condition"]["StringEquals"]["ec2:InstanceType"]) == {c["InstanceType"] for c in workers.values()}
    cluster_tag = {"aws:ResourceTag/ray-cluster-name": aws["cluster_name"]}
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        assert all(s["Condition"]["StringEquals"] == cluster_tag for s in granted[action]), action
    assert all(s.get("Condition") for s in granted["ec2:CreateTags"]), "tags only at launch or on the cluster's nodes"
    roles = {c["IamInstanceProfile"]["Name"] for c in workers.values()}
    assert {r for s in granted["iam:PassRole"] for r in _listed(s["Resource"])} == {
        f"arn:aws:iam::*:role/{r}" for r in roles}
    s3 = {r for a, statements in granted.items() if a.startswith("s3:") for s in statements
          for r in _listed(s["Resource"])}
    assert s3 == {"arn:aws:s3:::ember-bucket", "arn:aws:s3:::ember-bucket/*"}
    readme = (REPO / "cluster" / "README.md").read_text()
    assert "cluster/aws-head-policy.json" in readme and "--role-name ember-head" in readme


def _docker_ignores(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: a pattern matches it or a folder above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pattern) or fnmatch.fnmatchcase(p, pattern.removeprefix("**/"))
               for pattern in patterns for p in prefixes)


def test_the_image_build_context_leaves_out_local_state_and_keeps_what_the_image_installs():
    """cluster/Dockerfile copies its whole context: .dockerignore keeps this checkout's history, environment, runs
    (specs, checkpoints) and data out of the image, and none of what `pip install -e .` and the demo read."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for local in (".git/config", ".venv/bin/python", "runs/pretrain-demo/spec.yaml", "data/docs/manifest.json",
                  "platform/ember/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache/lastfailed"):
        assert _docker_ignores(patterns, local), local
    for needed in ("pyproject.toml", "README.md", "platform/ember/cli.py", "jobs/tokenize-demo.yaml",
                   "serve/demo.yaml", "cluster/Dockerfile"):
        assert (REPO / needed).exists() and not _docker_ignores(patterns, needed), needed
    assert "COPY --chown=ray:users . /home/ray/ember" in (REPO / "cluster" / "Dockerfile").read_text()


def _ray_containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def _check_ray_cluster_spec(spec: dict) -> None:
    """The fields KubeRay's RayCluster CRD requires, and token auth on every Ray container."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = [head["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    for g in spec.get("workerGroupSpecs", []):
        assert g["groupName"] and g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), "rayStartParams values are strings"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    for template in groups:
        for c in _ray_containers(template):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", c["name"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in template["spec"].get("volumes", [])}
            assert mounts <= volumes, f"{c['name']} mounts a volume its pod does not define"


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
                                       ("rayservice.yaml", "RayService")])
def test_kuberay_resources_have_their_api_version_and_required_fields(name, kind):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    spec = doc["spec"]
    if kind == "RayCluster":
        _check_ray_cluster_spec(spec)
    elif kind == "RayJob":
        assert "ember run jobs/pretrain-demo.yaml" in spec["entrypoint"]
        assert spec["shutdownAfterJobFinishes"] is True
        _check_ray_cluster_spec(spec["rayClusterSpec"])
        _ray_containers(spec["submitterPodTemplate"])
    else:
        _check_ray_cluster_spec(spec["rayClusterConfig"])
        assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"


def test_the_rayservice_serve_config_is_valid_for_ray_serve_and_ember():
    from ray.serve.schema import ServeDeploySchema

    from ember.serve.args import ServeArgs

    doc = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "ember.serve.app:build_app"
    args = ServeArgs.model_validate(app["args"])  # unknown keys are refused
    # Listening beyond loopback inside the pods, the app takes API keys from the secret the pods mount as env.
    assert args.host == "0.0.0.0" and not args.allow_unauthenticated and args.api_keys_env == "EMBER_API_KEYS"
    workers = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "EMBER_API_KEYS" and "secretKeyRef" in e.get("valueFrom", {}) for e in workers["env"])
    # The bucket prefix the RayJob trains into is the one the RayService serves the model from.
    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    run_dir = re.search(r"--set output\.dir=(s3://\S+/runs/\S+)", job["spec"]["entrypoint"]).group(1)
    assert args.model_dir == f"{run_dir}/model"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_pods_need_no_shared_volume_and_get_the_bucket_credentials(name):
    """Object storage, not a ReadWriteMany volume: every Ray container gets the `ember-s3` Secret as its environment
    and mounts nothing but the cluster's token (and, on GPU pods, a memory-backed /dev/shm)."""
    doc = yaml.safe_load((KUBERAY / name).read_text())
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    for template in [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        volumes = template["spec"].get("volumes", [])
        assert [v["name"] for v in volumes if v.get("emptyDir", {}).get("medium") != "Memory"] == ["ray-token"]
        for c in _ray_containers(template):
            assert {"secretRef": {"name": "ember-s3"}} in c.get("envFrom", []), c["name"]
    assert not any("PersistentVolumeClaim" in p.read_text() or "ReadWriteMany" in p.read_text()
                   for p in KUBERAY.glob("*.yaml"))


def dashboard_metric_names() -> set[str]:
    dash = json.loads((REPO / "cluster" / "monitoring" / "grafana" / "ember.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in re.findall(r"\b(ray_[a-z0-9_]+)", e)}


def test_the_grafana_dashboard_covers_training_and_serving():
    from ember.metrics import ENGINE_METRICS, SERVE_METRICS, TRAIN_GAUGES

    names = dashboard_metric_names()
    for wanted in ("loss", "tokens_per_second", "mfu", "step_time_seconds"):
        assert f"ray_ember_train_{wanted}" in names
    assert {f"ray_{n}" for n in TRAIN_GAUGES} >= {n for n in names if n.startswith("ray_ember_train_")}
    served = {re.sub(r"_(bucket|total)$", "", n) for n in names if n.startswith("ray_ember_serve_")}
    assert served == {f"ray_{n}" for n in SERVE_METRICS}, "every serving metric has a panel, and no panel a typo"
    engine = {re.sub(r"_(bucket|total)$", "", n) for n in names if n.startswith("ray_vllm_")}
    assert engine == {f"ray_{n}" for n in ENGINE_METRICS}, "vLLM's metrics: TTFT, TPOT, sequences, KV, prefix cache"
    assert "ray_serve_deployment_replica_healthy" in names


def test_the_prometheus_config_scrapes_ray_service_discovery():
    config = yaml.safe_load((REPO / "cluster" / "monitoring" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


def _gpu_pods(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    return [g["template"] for g in spec.get("workerGroupSpecs", [])
            if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]


def test_gpu_nodes_are_whole_machines_with_memory_backed_shm_and_efa_settings():
    """The 8-GPU shapes a first real GPU cluster needs: KubeRay's GPU pod is one Ray node holding all 8 GPUs of its
    machine, and every GPU pod has a memory-backed /dev/shm (NCCL); the launcher has an 8-GPU p5 type with EFA
    interfaces in a cluster placement group, node types whose resources `ember` can read from the head, NCCL over EFA,
    and the DeepSpeed ops prebuilt on the GPU nodes, as in the image."""
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    [pod] = _gpu_pods(cluster)
    [worker] = pod["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert {e["name"]: e["value"] for e in worker["env"]}["FI_PROVIDER"] == "efa"
    for name in ("raycluster.yaml", "rayjob.yaml"):
        for pod in _gpu_pods(yaml.safe_load((KUBERAY / name).read_text())):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            for c in pod["spec"]["containers"]:
                [shm] = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
                assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", name

    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    p5 = aws["available_node_types"]["gpu_8x_worker"]
    assert p5["node_config"]["InstanceType"] == "p5.48xlarge" and p5["resources"] == {"CPU": 192, "GPU": 8}
    assert p5["node_config"]["Placement"]["GroupName"]
    assert p5["node_config"]["NetworkInterfaces"][0]["InterfaceType"] == "efa"
    assert all(t["resources"].get("GPU") for n, t in aws["available_node_types"].items() if n != "head")
    assert "FI_PROVIDER=efa" in " ".join(aws["worker_start_ray_commands"])
    prebuild = "DS_ACCELERATOR=cuda"
    assert any(prebuild in c and "ember.train.ops" in c for c in aws["worker_setup_commands"])
    assert f"RUN {prebuild} python -m ember.train.ops" in (REPO / "cluster" / "Dockerfile").read_text()


def test_the_op_prebuild_refuses_a_cuda_toolkit_that_is_not_torchs():
    from ember.errors import EmberError
    from ember.train.ops import check_cuda_toolkit

    check_cuda_toolkit("12.8", (12, 4), "/usr/local/cuda-12.4")  # same major: ops build and load
    with pytest.raises(EmberError, match=r"torch is built for CUDA 12.8 but nvcc in /usr/local/cuda is CUDA 11.8: "
                                         r"ops built with it would not load; set CUDA_HOME to a CUDA 12.x toolkit"):
        check_cuda_toolkit("12.8", (11, 8), "/usr/local/cuda")
    with pytest.raises(EmberError, match=r"no CUDA toolkit \(nvcc\) was found; install CUDA 12.x's toolkit"):
        check_cuda_toolkit("12.8", None, None)
