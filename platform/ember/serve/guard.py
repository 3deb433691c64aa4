"""What stands in front of the routes in each replica: API keys, the body limit, and an error JSON for the unexpected.

`RequestGuard` is a plain ASGI middleware of the app, so it runs in the replica, where requests are served, whatever
started the app (`ember serve`, Ray's `serve run` / `serve deploy`, a KubeRay RayService). Per request it
1. answers the public paths (`/health`, `/openapi.json`) without a key, for GET and HEAD only: any other method gets
   405 at once, without reading a body (Ray Serve streams a body to the replica as the route reads it, so a key-less
   client that stalled in a body would hold one of the replica's `max_ongoing_requests` slots);
2. refuses a missing or wrong API key (401) on every other path, before reading any body, and records which key it
   was (`scope["state"]["api_key_sha256"]`, its digest) for the routes;
3. reads the body as a stream, stops at `max_body_bytes` (413), chunked or not, so no body is held whole beyond the
   limit, and gives the whole body `body_timeout_s` to arrive (408), so a slow body frees its slot;
4. turns anything a route did not handle into OpenAI's error JSON (500), logging the traceback here and sending none;
5. counts the response by route and status (`ember_serve_requests`).

Keys reach replicas as SHA-256 digests in the deployment's args (`api_key_sha256`), never in clear, and are compared
in constant time; a replica also reads its own `api_keys_env` / `api_keys_file` when its node has them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ray import serve
from ray.exceptions import TaskCancelledError

from ember.connection import is_loopback
from ember.errors import EmberError
from ember.serve.protocol import APIError

log = logging.getLogger("ember")

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/openapi.json")
PUBLIC = ("/health", "/openapi.json")  # answered without a key, to GET and HEAD only
PUBLIC_METHODS = ("GET", "HEAD")
BODY_METHODS = ("POST", "PUT", "PATCH")


def read_api_keys(env_name: Optional[str], file: Optional[str], *, missing_ok: bool = False) -> set[str]:
    """Keys from an environment variable (comma-separated) and a file (one per line; blank lines and `#` comments
    are not keys)."""
    keys = set()
    if env_name and os.environ.get(env_name):
        keys |= {k.strip() for k in os.environ[env_name].split(",") if k.strip()}
    if file:
        path = Path(file).expanduser()
        if path.is_file():
            keys |= {line.strip() for line in path.read_text().splitlines()
                     if line.strip() and not line.strip().startswith("#")}
        elif not missing_ok:
            raise EmberError(f"api_keys_file: {path} not found")
    return keys


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class APIKeys:
    """The accepted keys as SHA-256 digests; a presented key is compared with every one in constant time."""

    def __init__(self, digests):
        self.digests = sorted({bytes.fromhex(d) for d in digests})

    def __bool__(self) -> bool:
        return bool(self.digests)

    def match(self, authorization: Optional[str]) -> Optional[str]:
        """The digest (hex) of the accepted key an `Authorization: Bearer KEY` header presents; None if none."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode("utf-8", "surrogatepass")).digest()
        matches = [hmac.compare_digest(presented, d) for d in self.digests]  # no early exit
        return next((d.hex() for d, ok in zip(self.digests, matches) if ok), None)


def require_keys(proxy_host: Optional[str], has_keys: bool, allow_unauthenticated: bool, where: str) -> None:
    """A server its proxy exposes beyond this machine needs API keys unless the config says otherwise."""
    if has_keys or allow_unauthenticated or is_loopback(proxy_host):
        return
    shown = proxy_host or "an unknown host"
    raise EmberError(f"{where}: the HTTP proxy listens on {shown}, beyond this machine, and no API key is "
                     "configured (set api_keys_env's variable, api_keys_file or api_key_sha256), or set "
                     "allow_unauthenticated: true")


@dataclass(frozen=True)
class GuardPolicy:
    """What a replica's guard enforces."""

    keys: APIKeys
    max_body_bytes: int
    body_timeout_s: float  # for the whole body, from the first read
    on_response: Optional[Callable[[str, int], None]] = None  # (route, status) of every response


def _route(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path if path in ROUTES else "other"  # a bounded set of metric tags, whatever clients send


def _header(scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """ASGI middleware: keys, the streamed body limit, a catch-all error JSON, metrics (see the module docstring).

    The policy comes from the replica this app runs in (`policy()` of Serve's replica context), read at the first
    request; outside a replica every request fails closed with a 500."""

    def __init__(self, app, policy: Optional[Callable[[], GuardPolicy]] = None):
        self.app = app
        self._policy_source = policy or _replica_policy
        self._policy: Optional[GuardPolicy] = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, state = _route(scope), {"status": 500, "started": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                state["started"], state["status"] = True, message["status"]
            await send(message)

        policy = None
        try:
            policy = self._policy or self._load_policy()
            error, body, reads = _admit(scope, route, policy), b"", scope.get("method") in BODY_METHODS
            if error is None and reads:
                body, error = await self._read_body(scope, receive, policy)
            if error is not None:
                await error.response()(scope, receive, tracked)
            elif body is None:
                return  # the client went away while sending its body
            else:
                await self.app(scope, _replay(body, receive) if reads else receive, tracked)
        except Exception as exc:
            if _cancelled(exc):  # the client went away and Serve cancelled the request: nothing to answer
                raise
            log.exception("request to %s failed", scope.get("path"))
            if not state["started"]:
                await APIError(500, "internal error: the server logged it; the request can be retried",
                               kind="server_error", code="internal_error").response()(scope, receive, tracked)
            else:  # a stream had begun: end it
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if policy is not None and policy.on_response is not None:
                policy.on_response(route, state["status"])

    def _load_policy(self) -> GuardPolicy:
        self._policy = self._policy_source()
        return self._policy

    @staticmethod
    async def _read_body(scope, receive, policy: GuardPolicy) -> tuple[Optional[bytes], Optional[APIError]]:
        """The whole body, read chunk by chunk: refused as soon as it passes `max_body_bytes`, or once
        `body_timeout_s` has passed before its end arrived."""
        limit = policy.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return b"", _too_large(limit)
        try:
            async with asyncio.timeout(policy.body_timeout_s):
                return await _read_chunks(receive, limit)
        except TimeoutError:
            return b"", APIError(408, f"the request body did not arrive within {policy.body_timeout_s:g} s (the "
                                      "server's body_timeout_s)", code="body_timeout")


def _admit(scope, route: str, policy: GuardPolicy) -> Optional[APIError]:
    """What a request gets before any of its body is read (None: go on), by its path, method and key; the key's
    digest goes into the request's state for the routes (`api_key_sha256`, None without keys)."""
    scope["state"] = {**(scope.get("state") or {}), "api_key_sha256": None}  # this request's own dict
    if route in PUBLIC:
        if scope.get("method") in PUBLIC_METHODS:
            return None
        return APIError(405, f"{route} answers GET and HEAD only", code="method_not_allowed",
                        headers={"allow": ", ".join(PUBLIC_METHODS)})
    if not policy.keys:
        return None
    digest = policy.keys.match(_header(scope, b"authorization"))
    if digest is None:
        return APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                        kind="authentication_error", code="invalid_api_key")
    scope["state"]["api_key_sha256"] = digest
    return None


async def _read_chunks(receive, limit: int) -> tuple[Optional[bytes], Optional[APIError]]:
    """The body's chunks joined (None when the client went away), or 413 as soon as they pass `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes, the most this server accepts",
                    code="body_too_large")


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, TaskCancelledError)


def _replay(body: bytes, receive):
    """A receive that hands the app the body already read, then the client's later messages (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _replica_policy() -> GuardPolicy:
    return serve.get_replica_context().servable_object.guard_policy
