"""Connecting to Ray: an existing cluster (`--address` or RAY_ADDRESS) or a new local instance.

Ray's token authentication stays on: a local instance enables it by default, and a client of an existing cluster
must present the cluster's token, which Ray only does with RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from ember.errors import EmberError

log = logging.getLogger("ember")


def is_loopback(address: str | None) -> bool:
    """Whether a host, host:port or URL names this machine's loopback interface."""
    if not address:
        return False
    host = urlparse(address if "://" in address else f"//{address}").hostname or address
    return host in ("127.0.0.1", "localhost", "::1")


def use_loopback_node_address(address: str | None) -> None:
    """For a cluster bound to 127.0.0.1 (`ember cluster up`), keeps Ray from swapping 127.0.0.1 for this machine's
    network address, where that cluster does not listen. Ray reads the variable at import: call this first."""
    if is_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def use_token_auth() -> None:
    """Makes this process's Ray clients present the cluster's token (Ray sends it only with RAY_AUTH_MODE=token),
    unless the user chose a mode. Call it before Ray is imported: Ray reads the variable once."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def ensure_ray(address: str | None = None) -> None:
    """Connects this process to Ray unless it already is; a new local instance binds to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # The `ember` command has translated a dashboard URL by now (ember.cluster.address); a library caller is told.
    if address and urlparse(address).scheme in ("http", "https"):
        raise EmberError(f"{address} is a Ray dashboard URL; joining the cluster needs its GCS address HOST:PORT "
                         "(ember.cluster.address.to_gcs finds it)")
    if address:
        use_token_auth()
        use_loopback_node_address(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as exc:
        raise EmberError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    log.info("ray: %s (%s CPUs)", address or "started a local instance", int(ray.cluster_resources().get("CPU", 0)))


def _inner_errors(exc: BaseException) -> list:
    """The exceptions an exception carries as objects: a Ray task's `cause`, Python's chaining, and Ray Train's
    per-worker failures (`WorkerGroupError.worker_failures`, each a wrapper holding the worker's own exception in
    `_base_exc`) and controller failure."""
    inner = [getattr(exc, "cause", None), exc.__cause__, exc.__context__, getattr(exc, "_base_exc", None),
             getattr(exc, "controller_failure", None)]
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        inner += [failures[rank] for rank in sorted(failures)]
    return [e for e in inner if isinstance(e, BaseException)]


def find_ember_error(exc: BaseException) -> EmberError | None:
    """The EmberError behind an exception, looking through the objects Ray's task, Ray Data and Ray Train wrappers
    carry (never through their text)."""
    seen, todo = set(), [exc]
    while todo:
        exc = todo.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, EmberError):
            return exc
        todo += _inner_errors(exc)
    return None
