"""`ember cluster up | status | down`: a real multi-node Ray cluster on this machine, for development and tests.

`up` starts one host process that runs a Ray head node and N worker nodes, each its own raylet with its own CPUs,
object store and metrics agent (Ray's `ray.cluster_utils.Cluster`, the developer API Ray's own multi-node tests use).
Every Ray process is a child of that host, so `down` stops exactly what `up` started and nothing else on the machine.
Each node has its own node cache for object-storage reads (`DIR/nodes/N/cache`), as separate machines would.

With `max_workers` above `workers` (`ember cluster up --max-workers N`) the head also runs Ray's autoscaler, with
Ray's fake multi-node provider (the one Ray's own autoscaler tests use): it adds worker nodes of `cpus_per_node` CPUs
when work waits for resources, up to N in all, and removes them once idle for a minute: an autoscaling cluster, as
the cluster launcher or KubeRay makes one, on one machine. The nodes it adds share the head's node cache.

Everything binds to 127.0.0.1: the GCS, the raylets, the dashboard and every node's Prometheus metrics endpoint. Ray
binds a multi-node cluster to the machine's network address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes it
treat 127.0.0.1 as the node address; the host sets it for the cluster's processes and Ember's clients set it when they
talk to a loopback address. Ray's token authentication is on: the cluster uses the token in `~/.ray/auth_token` (or
`RAY_AUTH_TOKEN_PATH` / `RAY_AUTH_TOKEN`), made with Ray's generator when there is none, readable by its owner only
(`ember.connection.ensure_token`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ember.connection import ADDRESS_ENV_NAMES, LOOPBACK, LOOPBACK_NODE_ENV, TOKEN_AUTH_ENV, ensure_token
from ember.errors import EmberError
from ember.runtime import end_processes

STATE_FILE = "cluster.json"


def default_dir() -> Path:
    """Where `ember cluster` keeps the state of the local cluster: $EMBER_CLUSTER_DIR, else ~/.ember/cluster."""
    return Path(os.environ.get("EMBER_CLUSTER_DIR") or Path.home() / ".ember" / "cluster").expanduser()


@dataclass
class ClusterInfo:
    """What `up` records in DIR/cluster.json and `status`/`down` and the job clients read back."""

    pid: int  # the host process; every Ray process of the cluster descends from it
    address: str  # GCS address, for `ray.init(address=...)`, `ember run --address`
    dashboard_url: str  # Jobs, State and Serve APIs; `ember submit --address`
    workers: int
    cpus_per_node: float
    metrics_ports: list[int]  # one Prometheus endpoint per node
    session_dir: str  # Ray's session: logs/ of every node
    service_discovery_file: str  # Prometheus file_sd targets, written by Ray
    started: float = field(default_factory=time.time)
    max_workers: int | None = None  # worker nodes the autoscaler may grow to (None: no autoscaler)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def read_state(directory: Path | None = None) -> ClusterInfo | None:
    """The running local cluster recorded in `directory`, or None when there is none (a stale record is removed)."""
    path = (directory or default_dir()) / STATE_FILE
    if not path.exists():
        return None
    info = ClusterInfo(**json.loads(path.read_text()))
    if not _is_host(info.pid):
        path.unlink(missing_ok=True)
        return None
    return info


def _is_host(pid: int) -> bool:
    import psutil

    try:
        return "ember.cluster.local" in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def up(workers: int = 2, cpus_per_node: float = 1, *, directory: Path | None = None, port: int = 6379,
       dashboard_port: int = 8265, head_cpus: float | None = None, object_store_mb: int | None = None,
       max_workers: int | None = None, timeout: float = 180) -> ClusterInfo:
    """Starts the head and `workers` worker nodes in a background host process; returns once all nodes are up. With
    `max_workers`, an autoscaler adds nodes up to that many workers (see the module's docstring)."""
    directory = (directory or default_dir()).expanduser().resolve()
    _check_can_start(directory, workers, cpus_per_node, port, dashboard_port)
    if max_workers is not None and max_workers < workers:
        raise EmberError(f"--max-workers {max_workers}: must be at least --workers ({workers})")
    directory.mkdir(parents=True, exist_ok=True)
    ensure_token()  # kept to its owner (ember.runtime)
    plan = _plan(directory, workers, cpus_per_node, port, dashboard_port, head_cpus, object_store_mb)
    if max_workers is not None:
        plan["max_workers"] = max_workers
        plan["autoscaling_config"] = str(_write_autoscaling_config(directory, plan, max_workers))
    (directory / "plan.json").write_text(json.dumps(plan, indent=1))
    return _wait_until_up(directory, _start_host(directory, autoscaling=max_workers is not None), timeout)


def _write_autoscaling_config(directory: Path, plan: dict, max_workers: int) -> Path:
    """The autoscaler's config (the cluster launcher's format) for Ray's fake multi-node provider: the head, and
    one worker node type of `cpus_per_node` CPUs that it may add up to `max_workers` less the fixed workers."""
    import yaml

    head = plan["nodes"][0]
    config = {
        "cluster_name": f"ember-local-{plan['port']}",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "gcs_address": f"{LOOPBACK}:{plan['port']}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            # The fake provider's name for the head node type.
            "ray.head.default": {"resources": {"CPU": head["num_cpus"]}, "node_config": {}, "max_workers": 0},
            "worker": {"resources": {"CPU": plan["cpus_per_node"], "object_store_memory": head["object_store_memory"]},
                       "node_config": {}, "min_workers": 0, "max_workers": max_workers - plan["workers"]},
        },
        "head_node_type": "ray.head.default",
        "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    path = directory / "autoscaler.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _check_can_start(directory: Path, workers: int, cpus_per_node: float, port: int, dashboard_port: int) -> None:
    """Refuses bad sizes, a cluster already running from `directory`, and ports another process holds."""
    if workers < 0:
        raise EmberError(f"--workers {workers}: must be 0 or more")
    if cpus_per_node <= 0:
        raise EmberError(f"--cpus-per-node {cpus_per_node}: must be more than 0")
    running = read_state(directory)
    if running is not None:
        raise EmberError(f"a local cluster is already running from {directory} (GCS {running.address}, dashboard "
                         f"{running.dashboard_url}); `ember cluster down` stops it")
    for name, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if _port_taken(p):
            raise EmberError(f"{name} {p}: port already in use on {LOOPBACK} (another Ray instance?); pick another")


def _plan(directory: Path, workers: int, cpus_per_node: float, port: int, dashboard_port: int,
          head_cpus: float | None, object_store_mb: int | None) -> dict:
    """What the host process starts: the nodes with their CPUs, memory and ports (recorded in DIR/plan.json)."""
    import psutil

    nodes = workers + 1
    total = psutil.virtual_memory().total
    # Each raylet would otherwise claim the whole machine's memory; share it out (object store capped at 2 GiB).
    store = (object_store_mb << 20) if object_store_mb else min(2 << 30, int(total * 0.25 / nodes))
    # Free now, and none of them the ports asked for (free too until the cluster takes them, so the OS may offer them).
    ports = [p for p in _free_ports(3 * nodes + 3) if p not in (port, dashboard_port)][: 3 * nodes + 1]
    return {
        "directory": str(directory),
        # Short, so Ray's unix socket paths (session dir + sockets/raylet.N) stay within the OS limit.
        "temp_dir": tempfile.mkdtemp(prefix=f"ember-ray-{port}-"),
        "port": port, "dashboard_port": dashboard_port, "client_port": ports[-1],
        "nodes": [{"num_cpus": head_cpus if i == 0 and head_cpus is not None else cpus_per_node,
                   "metrics_export_port": ports[3 * i], "dashboard_agent_listen_port": ports[3 * i + 1],
                   "metrics_agent_port": ports[3 * i + 2],
                   "object_store_memory": store, "memory": int(total * 0.8 / nodes)} for i in range(nodes)],
        "workers": workers, "cpus_per_node": cpus_per_node,
    }


def _start_host(directory: Path, autoscaling: bool) -> subprocess.Popen:
    """Starts the host process on DIR/plan.json, in its own session, logging to DIR/cluster.log."""
    # Job drivers inherit this environment: `python` there must be this Python, with Ember's dependencies. Only
    # `python` is put first on PATH, not the whole venv bin: the rest (ninja, which DeepSpeed's op builds use) stays
    # what `ember run` here finds, or the ops would be rebuilt each time work moves between the two.
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    launcher = bin_dir / "python"  # a script, not a symlink: Python finds its venv from the path it is run by
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, **LOOPBACK_NODE_ENV, **TOKEN_AUTH_ENV, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if autoscaling:
        # Ray's fake multi-node provider runs only where this says so; the autoscaler looks every second.
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    for client_setting in ADDRESS_ENV_NAMES:  # which cluster a client talks to, not this one
        env.pop(client_setting, None)
    with open(directory / "cluster.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ember.cluster.local", str(directory / "plan.json")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=directory, start_new_session=True)


def _wait_until_up(directory: Path, proc: subprocess.Popen, timeout: float) -> ClusterInfo:
    """The cluster the host records once every node is up; its log's tail when it fails or takes too long."""
    log_path = directory / "cluster.log"
    deadline = time.time() + timeout
    state = directory / STATE_FILE
    while time.time() < deadline:
        if state.exists():
            return ClusterInfo(**json.loads(state.read_text()))
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise EmberError(f"the local cluster failed to start (log: {log_path}):\n  " + "\n  ".join(tail))
        time.sleep(0.5)
    _kill_host(proc)
    raise EmberError(f"the local cluster did not come up within {timeout:.0f}s (log: {log_path}); its processes "
                     "were stopped")


def _kill_host(proc: subprocess.Popen) -> None:
    """Kills a host that is not up yet and every process under it: until it is up, it holds SIGTERM back (see
    `_host`), so it would go on starting nodes that nothing then stops."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        host = psutil.Process(proc.pid)
        tree = [host, *host.children(recursive=True)]
        for p in tree:  # the host first: it starts no node after that
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=10)
    proc.wait(timeout=10)


def down(directory: Path | None = None, timeout: float = 60) -> ClusterInfo | None:
    """Stops the cluster recorded in `directory`: the host shuts its nodes down, stragglers are killed."""
    import psutil

    directory = (directory or default_dir()).expanduser().resolve()
    info = read_state(directory)
    if info is None:
        return None
    host = psutil.Process(info.pid)
    tree = [host, *host.children(recursive=True)]
    host.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:  # whatever did not exit with the host: only processes it started
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return info


def node_cache_dir(directory: Path, index: int) -> Path:
    """Node `index`'s own cache of object-storage reads (0 is the head), as a separate machine would have."""
    return directory / "nodes" / str(index) / "cache"


def _own_cache(directory: Path, index: int) -> None:
    """The next node's processes (its raylet, and the workers it starts) get their own node cache: no node sees
    another's downloads, so a hidden reliance on one machine's files fails here as it would on a real cluster."""
    from ember.storage import CACHE_DIR_ENV

    os.environ[CACHE_DIR_ENV] = str(node_cache_dir(directory, index))


def _stop_added_nodes(cluster) -> None:
    """The nodes the autoscaler added (the fake provider starts them inside the head's autoscaler process, so their
    Ray processes are its children): stopped first, or the head would wait on them as it shuts down."""
    import psutil
    from ray._private import ray_constants

    head = cluster.head_node
    monitors = head.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if head is not None else []
    end_processes([c for m in monitors for c in psutil.Process(m.process.pid).children(recursive=True)], grace=10)


@contextlib.contextmanager
def _head_node_id(autoscaling: bool):
    """While the head starts under the fake provider: the node id that provider knows the head by (it matches the
    nodes it manages to Ray's by id)."""
    if not autoscaling:
        yield
        return
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    os.environ["RAY_OVERRIDE_NODE_ID_FOR_TESTING"] = FAKE_HEAD_NODE_ID
    try:
        yield
    finally:
        os.environ.pop("RAY_OVERRIDE_NODE_ID_FOR_TESTING", None)


def _host(plan_path: str) -> None:
    """The host process: starts the nodes, records the cluster, and stops the nodes on SIGTERM or SIGINT."""
    plan = json.loads(Path(plan_path).read_text())
    directory = Path(plan["directory"])
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # handled below, after start-up
    from ray.cluster_utils import Cluster

    head, *rest = plan["nodes"]
    common = {"node_ip_address": LOOPBACK, "temp_dir": plan["temp_dir"], "min_worker_port": 0, "max_worker_port": 0}
    cluster = Cluster(shutdown_at_exit=True)
    try:
        _own_cache(directory, 0)
        autoscaling = {"autoscaling_config": plan["autoscaling_config"]} if "autoscaling_config" in plan else {}
        with _head_node_id(bool(autoscaling)):
            cluster.add_node(**common, **head, **autoscaling, gcs_server_port=plan["port"], include_dashboard=True,
                             dashboard_host=LOOPBACK, dashboard_port=plan["dashboard_port"],
                             ray_client_server_port=plan["client_port"])
        for i, node in enumerate(rest, 1):
            _own_cache(directory, i)
            cluster.add_node(**common, **node)
        # Cluster records its address as the machine's "current cluster" (/tmp/ray), where a bare `ray.init()`
        # would find and join it: Ember's cluster is used only by address, so that record goes (if it is ours). The
        # record in the cluster's own temp dir is what its job supervisors read to connect a job's driver; without
        # it they pick any Ray instance running on the machine.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip() == cluster.address:
            current.unlink()
        (Path(plan["temp_dir"]) / "ray_current_cluster").write_text(cluster.address)
        # Ready means visible to Prometheus too: the head rewrites the discovery file every few seconds.
        discovery = Path(plan["temp_dir"]) / "prom_metrics_service_discovery.json"
        wanted = {f"{LOOPBACK}:{n['metrics_export_port']}" for n in plan["nodes"]}
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if wanted <= set(json.loads(discovery.read_text())[0]["targets"]):
                    break
            except (OSError, ValueError, LookupError):
                pass
            time.sleep(0.5)
        session = Path(cluster.head_node.get_session_dir_path())
        info = ClusterInfo(pid=os.getpid(), address=cluster.address,
                           dashboard_url=f"http://{LOOPBACK}:{plan['dashboard_port']}", workers=plan["workers"],
                           cpus_per_node=plan["cpus_per_node"], metrics_ports=[n["metrics_export_port"]
                                                                               for n in plan["nodes"]],
                           session_dir=str(session),
                           service_discovery_file=str(discovery), max_workers=plan.get("max_workers"))
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=1))
        tmp.rename(directory / STATE_FILE)
        print(f"cluster up: {info.address}, dashboard {info.dashboard_url}, {len(plan['nodes'])} nodes", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        print("stopping the cluster", flush=True)
    finally:
        _stop_added_nodes(cluster)
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node)
        (directory / STATE_FILE).unlink(missing_ok=True)
        print("cluster stopped", flush=True)


if __name__ == "__main__":
    _host(sys.argv[1])
