"""What a Ray cluster can grow to, and whether a job's workers fit it: now, after the autoscaler adds nodes, or never.

A job on an autoscaling cluster (`cluster/aws.yaml`, KubeRay with `enableInTreeAutoscaling`) often starts with no
worker node at all; comparing it with `ray.cluster_resources()` would refuse every GPU job before the autoscaler is
asked for anything. Here a job is refused only when no node the cluster has or can add holds it, and the error names
the node types. What the autoscaler can add is read, as data, from the first of:

1. the cluster config Ray's autoscaler reports to the GCS (`ray._private.state.state.get_cluster_config()`: node
   groups with their resources and maximum counts; reported by the releases and deployments that do);
2. the autoscaling config the head's autoscaler (Ray's `monitor.py`) was started with (`--autoscaling-config`, the
   cluster launcher's `~/ray_bootstrap_config.yaml`): `available_node_types`, read by a small task on the head;
3. failing both, the autoscaler's own status in the GCS says one is running (KubeRay's sidecar): the job is accepted,
   its node types unknown, and Ray's placement group is what asks for nodes.

Nothing is requested here: the job's pending placement group is the demand the autoscaler acts on (Ray Train retries
starting its worker group until the nodes are up), so a job that ends or fails leaves no standing request behind.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

from ember.errors import EmberError

log = logging.getLogger("ember")

AUTOSCALING_STATUS_KEY = b"__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS, written by monitor.py


@dataclass(frozen=True)
class NodeType:
    """A kind of node the cluster has or can add."""

    name: str
    resources: dict[str, float]
    max_count: int | None  # None: no limit of its own

    def holds(self, bundle: dict[str, float]) -> int:
        """How many of `bundle` one node of this type holds."""
        fits = [math.floor(self.resources.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        return min(fits) if fits else 0

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v:g}" for k, v in sorted(self.resources.items())
                          if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store")))
        count = "no limit" if self.max_count is None else "none added" if self.max_count == 0 else \
            f"up to {self.max_count}"
        return f"{self.name} ({shown or 'no resources'}; {count})"


@dataclass(frozen=True)
class Capacity:
    """The cluster's nodes now and what its autoscaler can add."""

    now: dict[str, float]  # ray.cluster_resources()
    autoscaling: bool
    node_types: tuple[NodeType, ...] = ()  # what the autoscaler can add (empty: not visible from here)
    max_workers: int | None = None  # the cluster's own limit on worker nodes, across types
    source: str = ""  # where the node types were read
    nodes_by_type: dict[str, int] = field(default_factory=dict)  # of each node type, how many are up or coming


def _reported_config() -> tuple[NodeType, ...]:
    """Source 1: the cluster config the autoscaler reported to the GCS."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 (an older GCS without the key, or no autoscaler state service)
        return ()
    if config is None:
        return ()
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                          None if g.max_count < 0 else int(g.max_count)) for g in config.node_group_configs)


def _head_autoscaling_config(gcs_port: str) -> dict | None:
    """Runs on the head node: the autoscaling config (YAML, as a dict) that the cluster's autoscaler process (the one
    of the GCS on `gcs_port`: a machine may run several Ray instances) was started with, or None when it was started
    without one (a fixed cluster)."""
    import os

    import psutil
    import yaml

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") for part in cmdline) or \
                not any(part.startswith("--gcs-address=") and part.rsplit(":", 1)[-1] == gcs_port for part in cmdline):
            continue
        for i, part in enumerate(cmdline):
            path = part.split("=", 1)[1] if part.startswith("--autoscaling-config=") else \
                cmdline[i + 1] if part == "--autoscaling-config" and i + 1 < len(cmdline) else None
            if path:
                with open(os.path.expanduser(path)) as f:
                    return yaml.safe_load(f)
    return None


def _launcher_config() -> tuple[tuple[NodeType, ...], int | None]:
    """Source 2: the node types of the autoscaling config on the head (a task pinned to the head node)."""
    import ray

    task = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_head_autoscaling_config)
    try:
        config = ray.get(task.remote(ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]), timeout=60)
    except Exception as exc:  # noqa: BLE001 (no head resource, an older Ray, or a head that cannot run tasks)
        log.debug("could not read the head's autoscaling config: %s", exc)
        return (), None
    if not isinstance(config, dict):
        return (), None
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items() if isinstance(v, (int, float))}
        limit = 0 if name == head else spec.get("max_workers")  # the head is there already, counted in `now`
        types.append(NodeType(name, resources, int(limit) if isinstance(limit, int) else None))
    limit = config.get("max_workers")
    return tuple(types), int(limit) if isinstance(limit, int) else None


def _autoscaler_report() -> dict:
    """The report the head's autoscaler publishes in the GCS (monitor.py's `autoscaler_report`), or {}."""
    import ray

    try:
        raw = ray._private.worker.global_worker.gcs_client.internal_kv_get(AUTOSCALING_STATUS_KEY, None)
        return (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
    except Exception:  # noqa: BLE001 (no status yet, or a GCS that refuses the call)
        return {}


def _autoscaler_running(report: dict) -> bool:
    """Source 3: a fixed cluster's head runs an autoscaler too, with Ray's read-only provider, which names each
    node's type after the node itself (`node_<id>`); one that can add nodes names them after its node types
    (KubeRay's: the head group, the worker groups)."""
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"node_{node}" for node, node_type in mapping.items())


def _nodes_by_type(report: dict) -> Counter:
    """The nodes of each type the autoscaler has up or on the way."""
    return (Counter(report.get("active_nodes") or {}) + Counter(report.get("pending_launches") or {})
            + Counter(node_type for _, node_type, *_ in report.get("pending_nodes") or []))


def cluster_capacity() -> Capacity:
    """The connected cluster's resources now and the node types its autoscaler can add."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    report = _autoscaler_report()
    present = dict(_nodes_by_type(report))
    types = _reported_config()
    if types:
        return Capacity(now, True, types, source="the cluster config the autoscaler reported", nodes_by_type=present)
    types, max_workers = _launcher_config()
    if any(t.max_count != 0 for t in types):
        return Capacity(now, True, types, max_workers, source="the head's autoscaling config", nodes_by_type=present)
    return Capacity(now, _autoscaler_running(report))


def _live_nodes() -> list[NodeType]:
    """Each live node, with its total resources."""
    import ray

    return [NodeType(n.get("NodeManagerAddress", ""), {k: float(v) for k, v in n.get("Resources", {}).items()}, 1)
            for n in ray.nodes() if n.get("Alive")]


def _placeable(nodes: list[tuple[NodeType, int]], bundle: dict[str, float], strategy: str) -> int:
    """How many bundles fit on `nodes` (a type and how many of it) under a placement strategy (capacity, not what is
    free now). STRICT_PACK: all on one node; STRICT_SPREAD: one per node; PACK and SPREAD: any way they fit."""
    if strategy == "STRICT_PACK":
        return max((t.holds(bundle) for t, n in nodes if n), default=0)
    if strategy == "STRICT_SPREAD":
        return sum(n for t, n in nodes if t.holds(bundle))
    return sum(n * t.holds(bundle) for t, n in nodes)


def check_fits(bundle: dict[str, float], count: int, what: str, lower: str, strategy: str = "PACK") -> str | None:
    """Fails (EmberError) when `count` × `bundle` can never be placed on the connected cluster (its nodes now, and
    the nodes its autoscaler can add), naming the node types; returns None when they fit on the nodes there now, or
    else a line saying which node types the autoscaler will add for them. `what` names the job's part (`scaling`),
    `lower` the spec key to lower."""
    bundle = {k: float(v) for k, v in bundle.items() if v}
    live = [(node, 1) for node in _live_nodes()]
    if _placeable(live, bundle, strategy) >= count:
        return None
    shown = f"{count} × {{{', '.join(f'{k} {v:g}' for k, v in sorted(bundle.items()))}}}"
    capacity = cluster_capacity()
    if not capacity.autoscaling:
        total = {k: v * count for k, v in bundle.items()}
        short = sorted(k for k, v in total.items() if capacity.now.get(k, 0) < v)
        if short:
            k = short[0]
            raise EmberError(f"{what} asks for {total[k]:g} {k} in all ({shown}) but the Ray cluster has "
                             f"{capacity.now.get(k, 0):g} and no autoscaler to add nodes; lower {lower} or add nodes")
        raise EmberError(f"{what} asks for {shown} ({strategy}) but the Ray cluster's nodes cannot hold them, and it "
                         f"has no autoscaler to add nodes; lower {lower} or add bigger nodes")
    if not capacity.node_types:
        return f"{what}: {shown} wait for the autoscaler to add nodes (their types are not visible from here)"
    undeclared = [t.name for t in capacity.node_types if t.max_count != 0 and not t.resources]
    if undeclared:  # the cluster launcher fills in a cloud instance type's resources itself
        return f"{what}: {shown} wait for the autoscaler to add nodes (of type {', '.join(undeclared)}?)"
    addable = [t for t in capacity.node_types if t.max_count != 0 and t.holds(bundle)]
    # The nodes it can still add: each type's maximum less those up or on the way (already among `live`), within
    # the cluster's own maximum of worker nodes.
    present = capacity.nodes_by_type
    head_types = {t.name for t in capacity.node_types if t.max_count == 0}
    budget = None if capacity.max_workers is None else \
        capacity.max_workers - sum(n for name, n in present.items() if name not in head_types)
    grown = []
    for t in sorted(addable, key=lambda t: -t.holds(bundle)):
        room = None if t.max_count is None else max(0, t.max_count - present.get(t.name, 0))
        n = min(x for x in (room, budget, count) if x is not None)
        grown.append((t, max(0, n)))
        budget = None if budget is None else budget - max(0, n)
    if _placeable(live + grown, bundle, strategy) < count:
        types = "; ".join(t.describe() for t in capacity.node_types)
        raise EmberError(f"{what} asks for {shown} ({strategy}) but the cluster can never hold them: not on its "
                         f"nodes, nor on the nodes its autoscaler can add ({types}; from {capacity.source}); lower "
                         f"{lower} or add a node type that holds them")
    return f"{what}: {shown} wait for the autoscaler to add nodes of type {', '.join(t.name for t, n in grown if n)}"
