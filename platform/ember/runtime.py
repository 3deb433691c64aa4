"""The process Ember runs in: connecting it to Ray (an existing cluster, or a new local instance), keeping other
libraries' chatter off its console, ending the processes it leaves, and finding the Ember error behind a wrapped one.

What an address is and where it comes from, token authentication and loopback are `ember.connection`'s; this module
applies them when it connects.

A new local instance (`ember run` or `ember demo` without a cluster) listens on 127.0.0.1 only, its metrics endpoints
and agents included, and all of it stops when the process that started it exits: Ray's processes, and whatever of
theirs outlives them (a Ray Data actor that missed its raylet's end).

What a user sees is Ember's lines and every library's warnings and errors. Set-up and progress lines of Ray Data,
Ray Train and DeepSpeed, and torch's deprecation notices for the calls DeepSpeed makes, stay off the console
(`quiet_libraries`); Ray Data's still go to its log file (ray-data.log in the Ray session's logs). `--debug`, or
EMBER_LOG_LEVEL=DEBUG, shows everything, in the driver and in the workers.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from urllib.parse import urlparse

from ember.connection import (
    GCS,
    bind_local_instance_to_loopback,
    cluster_address,
    ensure_token,
    token_auth_on,
    use_loopback_node_address,
    use_token_auth,
)
from ember.errors import EmberError

log = logging.getLogger("ember")

LOG_LEVEL_ENV = "EMBER_LOG_LEVEL"  # DEBUG (what --debug sets) shows every library's lines, in every process
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Loggers of other libraries → (level from which their records reach the console, the one source module they are
# hidden from; None: all). Named by module, as these libraries name their loggers: a module that moves only brings
# its lines back.
_QUIET: dict[str, tuple[int, str | None]] = {
    # Ray Train: the controller's resource request and worker group start, each worker's process group set-up, and
    # each rank's checkpoints and (see _ray_train_context_logger) reports, which Ember's progress line says once.
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy": (logging.WARNING, None),
    "ray.train.v2._internal.execution.worker_group.worker_group": (logging.WARNING, None),
    "ray.train.v2._internal.execution.storage": (logging.WARNING, None),
    "ray.train.torch.config": (logging.WARNING, None),
    # Ray Data: each dataset's start, plan, progress and end.
    "ray.data._internal.execution.streaming_executor": (logging.WARNING, None),
    "ray.data._internal.progress": (logging.WARNING, None),
    "ray.data._internal.progress.logging_progress": (logging.WARNING, None),
    # "Token authentication is enabled": Ember keeps it on by design.
    "ray._private.authentication.authentication_token_setup": (logging.ERROR, None),
    # DeepSpeed's accelerator detection: "Setting accelerator to CPU" on every worker of a CPU run.
    "DeepSpeed": (logging.ERROR, "real_accelerator"),
    # The root logger receives what print() says in Ray Train's workers: DeepSpeed's "op built successfully".
    "": (logging.WARNING, None),
}


class _OffTheConsole(logging.Filter):
    """Keeps a logger's records below `level` (from `module` only, when given) off the console, Ember's own always
    through. A logger's filters outlive the logging configs that Ray Data and Ray Train apply (which replace
    handlers and levels), so this is set once, before those libraries are imported."""

    def __init__(self, level: int, module: str | None):
        super().__init__()
        self.level, self.module = level, module

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= self.level or record.pathname.startswith(_PACKAGE_DIR)
                or (self.module is not None and record.module != self.module)):
            return True
        if record.name.startswith("ray.data"):
            record.hide = True  # Ray Data's console handler skips it; its file handler (ray-data.log) keeps it
            return True
        return False


def debugging() -> bool:
    """Whether every library's output should show (`--debug` or EMBER_LOG_LEVEL=DEBUG)."""
    return os.environ.get(LOG_LEVEL_ENV, "").upper() == "DEBUG"


def quiet_libraries() -> None:
    """Keeps other libraries' chatter off this process's console unless `debugging()`; idempotent. The CLI calls it
    at start, the unit executor's actors and each training worker before they work. Imports no library: it only
    names their loggers."""
    if debugging():
        return
    for name, (level, module) in {**_QUIET, **_ray_train_context_logger()}.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OffTheConsole) for f in logger.filters):
            logger.addFilter(_OffTheConsole(level, module))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed functions that torch has deprecated; nothing an Ember user can change.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.")
    # Progress bars (tqdm: the harness's requests, datasets' splits, transformers' weight loading) are each library's
    # own; Ember logs its progress. Read when a bar is made, so setting them here reaches every later one.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _ray_train_context_logger() -> dict[str, tuple[int, str | None]]:
    """Ray Train's execution context logs each rank's reports under a logger named by its file's path; found without
    importing Ray (which reads its environment once, at import)."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(spec.submodule_search_locations[0], "train", "v2", "_internal", "execution", "context.py")
    return {path: (logging.WARNING, None)}


def training_worker_env() -> dict[str, str]:
    """The environment of the training workers (Ray Train's `worker_runtime_env`).

    - Ray starts its workers at nice 15, below its own processes and the driver; a training worker then yields its
      core to any of them that wakes, and on 2 cores 1-worker ZeRO-0 training ran at 0.94 and 0.95 of the plain
      loop, 2 workers at 0.84 and 0.80 (train_bench, two runs), against 1.00 and 1.02, 0.98 and 0.88 at nice 0.
      Ray Jobs starts a job's driver at 0 the same way (`RAY_worker_niceness` in its runtime env).
    - OpenMP: libgomp's own spin-then-sleep wait (300000 spins) even when it counts more OpenMP threads than cores.
      Ray Train runs the training loop in a thread of the worker actor, and the actor's main thread has its own
      (idle) OpenMP pool from Ray Train's set-up; with both counted, libgomp cuts its spinning to almost none, and
      every parallel region of the loop waits for its workers to wake from sleep (a matmul loop measured 430 us per
      iteration in Ray Train's thread against 290 us in a plain process, and 296 us with these).

    - The node cache's budget (`EMBER_CACHE_BYTES`), when the driver sets one: the streamed shards of this run keep
      to it.

    Values set in this environment are kept."""
    wanted = {"RAY_worker_niceness": "0", "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
    passed = {k: os.environ[k] for k in ("EMBER_CACHE_BYTES",) if os.environ.get(k)}
    return {**{k: os.environ.get(k, v) for k, v in wanted.items()}, **passed}


def _job_runtime_env() -> dict | None:
    """Debugging, the runtime env that makes this driver's workers as talkative as it: EMBER_LOG_LEVEL, since a
    cluster's workers do not inherit this shell's environment (a submitted job's workers already have it: `ember
    submit` forwards it, and Ray refuses a driver's env var that the job sets too). Otherwise none: Ember's code
    quiets the processes it runs in (the unit executor's actors, the trainer), Ray Train is told its log level
    (`RunConfig.logging_config`), and a job-wide runtime env would cost every worker process its prestart."""
    if not debugging() or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # the latter: set in a submitted job
        return None
    return {"env_vars": {LOG_LEVEL_ENV: os.environ[LOG_LEVEL_ENV]}}


def use_environment_ninja() -> None:
    """Puts this Python environment's `ninja` (the package DeepSpeed depends on) first on PATH, for DeepSpeed's JIT
    builds of its ops. Two ninja versions keep build logs that do not recognise each other's builds, so a process
    that found the system's ninja and one that found the environment's would each rebuild what the other built (a
    minute or more per op, in every training run that loads it). The prebuild of `make install` and every training
    worker call this, so they all find the same one."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(bin_dir, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def ensure_ray(address: str | None = None) -> None:
    """Connects this process to Ray unless it already is: to the cluster at `address` or RAY_ADDRESS, else to a new
    local instance, bound to 127.0.0.1 and stopped, all of it, when this process exits (`_stop_local_instance`)."""
    address = cluster_address(address, GCS)
    if address is None and "ray" not in sys.modules:
        use_loopback_node_address(None)  # before Ray's import, which reads it (not once Ray runs here: see below)
    import ray  # here, not at the top: Ray reads RAY_AUTH_MODE and the loopback setting once, at import

    if ray.is_initialized():
        return
    # The `ember` command has translated a dashboard URL by now (ember.cluster.address); a library caller is told.
    if address and urlparse(address).scheme in ("http", "https"):
        raise EmberError(f"{address} is a Ray dashboard URL; joining the cluster needs its GCS address HOST:PORT "
                         "(ember.cluster.address.to_gcs finds it)")
    if address:
        use_token_auth()
        use_loopback_node_address(address)
    else:
        # A local instance has no node that a cloud could drain: Ray Train's preemption watcher (an actor per run)
        # would only cost a process and print Ray's error line about its constructor arguments. Its processes
        # inherit this environment; a value set by the user is kept.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        bind_local_instance_to_loopback()
        if token_auth_on():
            ensure_token()
    try:
        # "local": a new instance, as documented, never a `ray start` instance that /tmp/ray records on this machine.
        ray.init(address=address or "local", logging_level=logging.INFO if debugging() else logging.WARNING,
                 log_to_driver=True, runtime_env=_job_runtime_env())
    except ConnectionError as exc:
        raise EmberError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    if address is None:
        atexit.register(_stop_local_instance)  # runs before Ray's own ray.shutdown at exit (registered earlier)
    log.info("ray: %s (%s CPUs)", address or "started a local instance", int(ray.cluster_resources().get("CPU", 0)))


def _stop_local_instance() -> None:
    """Stops the local instance this process started, all of it. `ray.shutdown()` stops the node's own processes
    (GCS, raylet, dashboard, agents), and the raylet's workers are meant to exit with it; a process of the instance
    still running moments later is ended: one under those processes, or one elsewhere (a worker's own child that left
    its process group, parented to init) whose environment names the raylet that started its worker. A Ray Data pool
    actor was once seen alive 40 minutes after its run had ended."""
    import psutil
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    if node is None:
        return
    started = {}
    for infos in node.all_processes.values():
        for info in infos:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(info.process.pid)
                started.update((p.pid, p) for p in [process, *process.children(recursive=True)])
    raylets = {str(p.pid): p.create_time() for p in started.values()
               if p.pid in {i.process.pid for i in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])}}
    ray.shutdown()
    _, alive = psutil.wait_procs(started.values(), timeout=2)
    end_processes(list({p.pid: p for p in [*alive, *_workers_of(raylets)]}.values()))


def _workers_of(raylets: dict[str, float]):
    """This user's processes started by one of these raylets (pid -> start time), or by a process they started: Ray
    gives every worker RAY_RAYLET_PID, and its children inherit it. Only processes younger than their raylet, so a
    process of an earlier raylet that had the same pid is not taken for one."""
    import psutil

    for process in psutil.process_iter(["uids", "create_time"]):
        uids = process.info["uids"]  # None where it may not be read: another user's
        with contextlib.suppress(psutil.Error):
            if not uids or uids.real != os.getuid():
                continue
            started = raylets.get(process.environ().get("RAY_RAYLET_PID"))
            if started is not None and process.info["create_time"] >= started:
                yield process


def end_processes(processes: list, grace: float = 5) -> None:
    """Ends these processes (psutil's): SIGTERM, then SIGKILL for what still runs `grace` seconds later."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


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
