"""`ember serve SERVE.yaml|MODEL_DIR`: deploys Ember's app on Ray Serve, waits until it answers, prints the URL.

A Ray Serve config file (the format of `serve deploy`: `http_options`, `applications` with `import_path` and `args`)
is validated with Ray Serve's own schema; a model dir gets the defaults of `ServeArgs`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from ember import storage
from ember.connection import LOOPBACK, cluster_address, is_loopback
from ember.errors import EmberError
from ember.model import builtin
from ember.runtime import ensure_ray

log = logging.getLogger("ember")


def load_serve_config(path: Path) -> dict:
    """The config as Ray Serve's `ServeDeploySchema` accepts it (errors name the file and the field)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EmberError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise EmberError(f"{path}: a Ray Serve config is a mapping with 'applications'")
    try:
        ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") else \
            ServeDeploySchema.parse_obj(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EmberError(f"{path}: {where}: {first['msg']}") from None
    return data


def _build(import_path: str, args: dict):
    """The Application an import path names: a builder called with `args`, or a bound deployment."""
    from pydantic import ValidationError

    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise EmberError(f"import_path {import_path!r}: {exc}") from None
    if not callable(target):
        return target
    try:
        return target(args)
    except ValidationError as exc:
        raise _args_error(exc) from None


def _args_error(exc) -> EmberError:
    """A pydantic error of serve args as one line per problem, naming each key; never the values (a URI may carry
    credentials)."""
    return EmberError("; ".join(f"args.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))


def wait_ready(url: str, timeout: float = 600, api_key: str | None = None, app: str | None = None) -> dict | None:
    """Polls GET /health until an engine replica answers (vLLM takes tens of seconds to start), then GET /v1/models:
    its JSON, or None when the app is up but refuses requests without a key and none was given (401). A key the app
    refuses, or Serve's report that application `app` failed to deploy, is an EmberError."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if app is not None:
            _check_deployed(app)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=15):
                pass  # 200: the ingress is up and an engine replica answers
            req = urllib.request.Request(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}
                                         if api_key else {})
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                if api_key is None:
                    return None
                raise EmberError(f"the app at {url} is up but refused the configured API key (401)") from None
            last = exc
        except Exception as exc:  # noqa: BLE001 (refused, reset, not yet routed: not up yet, until the deadline)
            last = exc
        time.sleep(0.5)
    raise EmberError(f"the app did not answer at {url} within {timeout:.0f}s ({last})")


def _check_deployed(app: str) -> None:
    """Raises EmberError with Serve's message when application `app` failed to deploy (a replica's constructor
    raised, for example vLLM refusing its engine arguments)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
        lines = [line for line in (status.message or "").splitlines() if line.strip()]
        raise EmberError(f"the app {app} failed to deploy: {lines[-1] if lines else 'see the Serve logs'}")


def _readiness_key(app_args: dict) -> str | None:
    """A key the app accepts, read as the app reads its keys (for the readiness check only; never printed)."""
    from ember.serve.args import ServeArgs
    from ember.serve.guard import read_api_keys

    args = ServeArgs.model_validate(app_args)
    keys = sorted(read_api_keys(args.api_keys_env, args.api_keys_file, missing_ok=True))
    return keys[0] if keys else None


def serve_target(target: str, *, address: str | None = None, detach: bool = False, host: str | None = None,
                 port: int | None = None, args: dict | None = None, quiet: bool = False) -> tuple[str, list[str]]:
    """Deploys a config file or a model dir; returns (base URL, application names). `args` override the args of
    Ember's apps in a config; `quiet` keeps Ray Serve's own INFO lines and access logs out of the output."""
    http, apps, proxy_location = _deployment(target, host, port)
    if detach and not cluster_address(address):
        raise EmberError("--detach needs a running Ray cluster to keep the app (--address or RAY_ADDRESS)")
    # Ray first: building a ray.serve.llm deployment reads the job's runtime env, which would otherwise start a
    # local Ray instance of its own (and an app on it that dies with this process, --detach or not).
    ensure_ray(address)
    built = _build_apps(apps, http, args)
    _deploy(built, http, proxy_location, quiet)
    shown = LOOPBACK if http["host"] in ("0.0.0.0", "::") else http["host"]
    base = f"http://{shown}:{http['port']}"
    for name, prefix, _, key in built:
        url = base + (prefix.rstrip("/") if prefix and prefix != "/" else "")
        models = wait_ready(url, api_key=key, app=name)
        if models is None:
            log.info("serve: %s is up at %s/v1; it needs an API key (Authorization: Bearer KEY) that this shell "
                     "does not have", name, url)
        else:
            log.info("serve: %s is up at %s/v1 (model %s)", name, url, models["data"][0]["id"])
    return base, [name for name, _, _, _ in built]


def _deployment(target: str, host: str | None, port: int | None) -> tuple[dict, list[dict], str | None]:
    """(HTTP options, applications, proxy location) of a config file, or of Ember's app on a model dir."""
    path = Path(target).expanduser()
    if storage.is_uri(target) or path.is_dir() or builtin.is_builtin(target):  # a model dir: local, remote, built-in
        from pydantic import ValidationError

        from ember.serve.args import ServeArgs

        args = {"model_dir": target if builtin.is_builtin(target) else storage.normalize(target)}
        if host:
            args["host"] = host
        if port:
            args["port"] = port
        try:
            s = ServeArgs.model_validate(args)
        except ValidationError as exc:
            raise _args_error(exc) from None
        apps = [{"name": "ember", "route_prefix": "/", "import_path": "ember.serve.app:build_app", "args": args}]
        return {"host": s.host, "port": s.port}, apps, None
    if not path.is_file():
        raise EmberError(f"{target}: neither a serve config file nor a model directory")
    config = load_serve_config(path)
    http = dict(config.get("http_options") or {})
    http.setdefault("host", LOOPBACK)
    http.setdefault("port", 8000)
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    return http, config["applications"], config.get("proxy_location")


def _build_apps(apps: list[dict], http: dict, args: dict | None) -> list[tuple]:
    """(name, route prefix, Application, readiness key) of each app; Ember's apps get `args` and where the proxy
    listens."""
    built = []
    for i, app in enumerate(apps):
        app_args, key = dict(app.get("args") or {}), None
        if app.get("import_path", "").startswith("ember.serve.app"):
            app_args.update(args or {})
            app_args["host"] = http["host"]  # where the proxy really listens decides whether keys are required
            app_args.setdefault("port", http["port"])
        application = _build(app["import_path"], app_args)
        if app.get("import_path", "").startswith("ember.serve.app"):
            key = _readiness_key(app_args)
        built.append((app.get("name") or f"app{i}", app.get("route_prefix", "/"), application, key))
    return built


def _deploy(built: list[tuple], http: dict, proxy_location: str | None, quiet: bool) -> None:
    """Starts Ray Serve's proxies and deploys the apps without waiting for them."""
    from ray import serve

    # A proxy per node suits a real cluster; on loopback every node is this machine, where one port fits one proxy.
    loopback = is_loopback(http["host"])
    logging_config = {"log_level": "WARNING", "enable_access_log": False} if quiet else None
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": http["host"], "port": http["port"]},
                proxy_location=proxy_location or ("HeadOnly" if loopback else "EveryNode"),
                logging_config=logging_config)
    for name, prefix, application, _ in built:
        log.info("serve: deploying %s at %s", name, prefix)
        serve.run(application, name=name, route_prefix=prefix, blocking=False, logging_config=logging_config)


def serve_forever(names: list[str]) -> None:
    """Blocks until Ctrl-C, then deletes the apps."""
    from ray import serve

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("serve: shutting down %s", ", ".join(names))
        for name in names:
            serve.delete(name)
