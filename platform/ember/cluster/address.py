"""A Ray cluster's two addresses, and `--address` in either form: translating one form into the other.

A cluster answers at its GCS address (`HOST:6379`: what `ray.init` joins) and at its dashboard URL (`http://HOST:8265`:
the Jobs, State and Serve APIs); which verb needs which is `ember.connection.ADDRESS_FORMS`. Every verb takes either
form; a verb given the other one finds the form it needs (`in_form`):

- the local cluster of `ember cluster up` has both in its state file (`ember.cluster.local.read_state`);
- from a GCS address: the dashboard URL the cluster publishes in its GCS (where Ray's own job client looks), else the
  GCS's host with Ray's default dashboard port. A `HOST:PORT` that answers HTTP is a dashboard given without
  `http://`, as Ember took it before;
- from a dashboard URL: its host with Ray's default GCS port, since none of Ray's HTTP APIs tells the GCS port.

The functions here take the local cluster's state as an argument, so that they can be tested without one.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from ember.cluster.local import ClusterInfo
from ember.connection import GCS, is_loopback
from ember.errors import EmberError

GCS_PORT = 6379  # Ray's defaults: `ray start --port`, `--dashboard-port`
DASHBOARD_PORT = 8265
PROBE_TIMEOUT = 3.0  # seconds; a GCS or a dashboard that is up answers at once


@dataclass(frozen=True)
class Found:
    """The address a verb uses, and how it was found when it is not the form it was given in."""

    address: str
    note: str = ""  # "" when the address was given in this form

    def line(self) -> str:
        return f"cluster: {self.address} ({self.note})"


def is_dashboard_url(address: str) -> bool:
    return urlsplit(address).scheme in ("http", "https")


def _host_port(address: str) -> tuple[str, int | None]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        return parts.hostname or "", parts.port
    except ValueError:  # a port that is not a number
        return parts.hostname or "", None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two addresses (either form) name the same host and port; 127.0.0.1 and localhost are one host."""
    (host_a, port_a), (host_b, port_b) = _host_port(a), _host_port(b)
    return port_a == port_b and (host_a == host_b or (is_loopback(host_a) and is_loopback(host_b)))


def in_form(address: str, form: str, local: ClusterInfo | None = None) -> Found:
    """`address` (either form) in `form`: `ember.connection.GCS` or `DASHBOARD`."""
    return (to_gcs if form == GCS else to_dashboard)(address, local)


def to_gcs(address: str, local: ClusterInfo | None = None) -> Found:
    """The GCS address for `address` in either form; `local` is the local cluster's ClusterInfo, if one runs. A GCS
    address, `auto` and a Ray Client `ray://` address are returned as they are: Ray reads them."""
    if not is_dashboard_url(address):
        return Found(address)
    url = address.rstrip("/")
    if local is not None and _same_endpoint(url, local.dashboard_url):
        return Found(local.address, f"Ray GCS, from the dashboard URL {url}: the local cluster of `ember cluster up`")
    host, _ = _host_port(url)
    return Found(_join(host, GCS_PORT), f"Ray GCS, from the dashboard URL {url}: its host, Ray's default GCS port")


def to_dashboard(address: str, local: ClusterInfo | None = None) -> Found:
    """The dashboard URL for `address` in either form (see the module docstring for how a GCS address's is found);
    `local` is the local cluster's ClusterInfo, if one runs."""
    if is_dashboard_url(address):
        return Found(address.rstrip("/"))
    if address == "auto":
        if local is not None:
            return Found(local.dashboard_url, "Ray dashboard, for --address auto: the local cluster of "
                                              "`ember cluster up`")
        gcs = _auto_gcs()
    else:
        gcs = address
    if local is not None and _same_endpoint(gcs, local.address):
        return Found(local.dashboard_url, f"Ray dashboard, from the GCS address {address}: the local cluster of "
                                          "`ember cluster up`")
    host, port = _host_port(gcs)
    if not host or port is None:
        raise EmberError(f"--address {address}: expected a GCS address HOST:PORT (e.g. 10.0.0.5:6379), 'auto', or a "
                         "dashboard URL http://HOST:PORT")
    answer = _probe(host, port)
    if answer == "http":
        return Found(f"http://{_join(host, port)}", f"Ray dashboard: {address} answers HTTP")
    published = _published_dashboard(gcs) if answer == "other" else None
    if published:
        return Found(published, f"Ray dashboard, from the GCS address {address}")
    return Found(f"http://{_join(host, DASHBOARD_PORT)}",
                 f"Ray dashboard, from the GCS address {address}: its host, Ray's default dashboard port")


def _probe(host: str, port: int) -> str | None:
    """What answers at host:port: "http" (a dashboard), "other" (a GCS speaks gRPC, not HTTP/1), or None (nothing:
    refused or unreachable). Asked first because Ray's GCS client waits a long time for a GCS that is not one."""
    try:
        sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT)
    except OSError:
        return None
    with sock:
        try:
            sock.sendall(b"GET /api/version HTTP/1.0\r\n\r\n")
            reply = sock.recv(5)
        except OSError:  # a server that keeps quiet is not an HTTP one
            return "other"
    return "http" if reply.startswith(b"HTTP/") else "other"


def _published_dashboard(gcs: str) -> str | None:
    """The dashboard URL the cluster's dashboard recorded in its GCS, or None when it cannot be read."""
    from ember.connection import use_token_auth

    use_token_auth()  # the GCS asks for the cluster's token too
    from ray._private import ray_constants
    from ray._raylet import GcsClient

    try:
        value = GcsClient(address=gcs).internal_kv_get(ray_constants.DASHBOARD_ADDRESS.encode(),
                                                       namespace=ray_constants.KV_NAMESPACE_DASHBOARD,
                                                       timeout=PROBE_TIMEOUT)
    except Exception:  # noqa: BLE001 (an RpcError or an auth failure: the default port's error names the URL)
        return None
    return f"http://{value.decode()}" if value else None


def _auto_gcs() -> str:
    """The GCS address `auto` means to Ray: RAY_ADDRESS, else the cluster `ray start` last started on this machine."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as exc:  # none found, or RAY_ADDRESS holds something else
        raise EmberError(f"--address auto: {exc}") from None
