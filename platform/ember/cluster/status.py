"""`ember status`: one screen with the cluster's nodes and resources, Ember's jobs with their latest progress, the
Serve applications with their replicas, and where the dashboard is. Read over the dashboard's HTTP APIs, and the jobs'
progress records (`ember.runs.progress`) where their metadata says they are."""

from __future__ import annotations

import requests

from ember.cluster.jobs import Jobs, auth_headers, job_progress, list_jobs, took

RECENT = 5  # finished jobs shown below the running ones


def _usage(url: str) -> list[str]:
    """The "Total Usage" block of Ray's cluster status (what `ray status` prints)."""
    r = requests.get(f"{url}/api/cluster_status", params={"format": "1"}, headers=auth_headers(), timeout=10)
    r.raise_for_status()
    text = r.json().get("data", {}).get("clusterStatus", "")
    lines = text.splitlines()
    if "Total Usage:" not in lines:
        return []
    start = lines.index("Total Usage:") + 1
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line.strip())
    return block


def _serve_apps(url: str) -> tuple[int, list[str]]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(url).get_serve_details()
    rows = []
    apps = details.get("applications") or {}
    for name, app in sorted(apps.items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            replicas = dep.get("replicas") or []
            running = sum(1 for r in replicas if r.get("state") == "RUNNING")
            target = dep.get("target_num_replicas", len(replicas))
            rows.append(f"  {name}/{dep_name}: {app.get('status')}, {running}/{target} replicas running"
                        + (f", route {app.get('route_prefix')}" if app.get("route_prefix") else ""))
    return len(apps), rows


def render(address: str | None = None) -> str:
    from ray.util.state import list_nodes

    jobs = Jobs(address)
    url = jobs.url
    out = [f"cluster: {url} (Ray dashboard)"]
    nodes = list_nodes(address=url, detail=True, raise_on_missing_output=False)
    alive = [n for n in nodes if n.state == "ALIVE"]
    out.append(f"nodes: {len(alive)} alive" + (f", {len(nodes) - len(alive)} dead" if len(nodes) > len(alive) else ""))
    for n in sorted(alive, key=lambda n: (not n.is_head_node, n.node_id)):
        res = n.resources_total or {}
        gpus = f", {res['GPU']:g} GPU" if res.get("GPU") else ""
        out.append(f"  {'head  ' if n.is_head_node else 'worker'} {n.node_id[:12]} {n.node_ip}: "
                   f"{res.get('CPU', 0):g} CPU{gpus}, {res.get('memory', 0) / 2**30:.1f} GiB memory")
    usage = _usage(url)
    if usage:
        out.append("in use: " + ", ".join(usage))
    found = list_jobs(jobs, ember_only=True)
    running = [j for j in found if str(j.status) in ("PENDING", "RUNNING")]
    finished = [j for j in found if j not in running][-RECENT:]
    out.append(f"ember jobs: {len(running)} running, {len(found) - len(running)} finished")
    for j in running + finished:
        meta = j.metadata or {}
        record, latest = job_progress(jobs, meta)
        out.append(f"  {j.submission_id}  {meta.get('ember_kind')}  {j.status}  {took(j)}"
                   + (f"  {latest}" if record else f"  progress {latest}" if latest else ""))
    count, rows = _serve_apps(url)
    out.append(f"serve apps: {count or 'none'}")
    out += rows
    out.append(f"dashboard: {url}")
    return "\n".join(out)
