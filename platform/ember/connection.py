"""The connection to a Ray cluster: which address form each `ember` verb takes, where an address comes from when none
is given, Ray's token authentication (the auth-mode setting and the cluster token), and loopback.

A cluster answers at two addresses: its GCS (`HOST:6379`, what `ray.init` joins) and its dashboard (`http://HOST:8265`,
the Jobs, State and Serve APIs). `ADDRESS_FORMS` says which one each verb needs; `ember.cluster.address` translates a
given address into it. Without `--address`, an address comes from the environment, in the order Ray's own clients
read it (`address_from_env`); without that either, a verb that joins starts a new local instance and a verb that uses
the HTTP APIs talks to the local cluster of `ember cluster up`.

Ray's token authentication stays on: a local instance enables it by default, and a client of an existing cluster must
present the cluster's token, which Ray only does with RAY_AUTH_MODE=token (`TOKEN_AUTH_ENV`). Whoever reads the token
can run code on the cluster, so the token file Ember creates or reads is kept to its owner (0600, and 0700 on
~/.ray), with a warning when it was open to others.

Loopback: a new local instance and `ember cluster up` listen on 127.0.0.1 only. Ray binds a node to the machine's
network address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes 127.0.0.1 the node address (`LOOPBACK_NODE_ENV`), so
a process that starts one, or joins one there, sets it before Ray is imported (Ray reads it once).

Imports no Ray at module level and nothing of Ember's planes: `ember.runtime`, the cluster tools, serving and the
command all take these facts from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("ember")

GCS = "GCS address"  # the verb joins the cluster (ray.init)
DASHBOARD = "dashboard URL"  # the verb uses the cluster's HTTP APIs (Jobs, State, Serve)
LOCAL_CLUSTER = "local cluster"  # the verb manages the local cluster of `ember cluster up` (no --address)

# Verb -> the address form it needs. A verb not named here talks to no cluster.
ADDRESS_FORMS = {"run": GCS, "serve": GCS, "demo": GCS,
                 "submit": DASHBOARD, "jobs": DASHBOARD, "status": DASHBOARD,
                 "cluster": LOCAL_CLUSTER}

# Form -> the environment variables that give the address when --address does not, first set wins (as Ray's own
# `ray.init` and `ray job` read them).
ADDRESS_ENV = {GCS: ("RAY_ADDRESS",), DASHBOARD: ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")}
ADDRESS_ENV_NAMES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")  # every name above: which cluster a client talks to

# Form -> what is used when neither --address nor the environment names a cluster (the --address help says it).
ADDRESS_DEFAULT = {GCS: "a new local instance", DASHBOARD: "the cluster of `ember cluster up`"}

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_AUTH_ENV = {AUTH_MODE_ENV: "token"}  # what makes Ray's clients present the cluster token

LOOPBACK = "127.0.0.1"
_NODE_ADDRESS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_NODE_ENV = {_NODE_ADDRESS_ENV: "0"}  # 127.0.0.1 is this node's address


def address_form(verb: str) -> str | None:
    """The address form `verb` needs (GCS, DASHBOARD, LOCAL_CLUSTER), or None for a verb that talks to no cluster."""
    return ADDRESS_FORMS.get(verb)


def address_from_env(form: str = GCS) -> str | None:
    """The cluster address the environment gives for a verb of this form (see ADDRESS_ENV), or None."""
    return next((os.environ[name] for name in ADDRESS_ENV.get(form, ()) if os.environ.get(name)), None)


def cluster_address(address: str | None, form: str = GCS) -> str | None:
    """The precedence, in one place: `--address`, else the environment's for this form, else None (the caller's
    default: ADDRESS_DEFAULT)."""
    return address or address_from_env(form)


def address_help(form: str) -> str:
    """The default that `--address`'s help names for a verb of this form."""
    return f"{' or '.join(ADDRESS_ENV[form])}, else {ADDRESS_DEFAULT[form]}"


def talks_to_a_cluster(verb: str, address: str | None) -> bool:
    """Whether this run of `verb` talks to an existing cluster (and so must present its token): it was given an
    address, or the verb only ever talks to one."""
    return bool(address) or address_form(verb) in (DASHBOARD, LOCAL_CLUSTER)


def is_loopback(address: str | None) -> bool:
    """Whether a host, host:port or URL names this machine's loopback interface."""
    if not address:
        return False
    host = urlparse(address if "://" in address else f"//{address}").hostname or address
    return host in (LOOPBACK, "localhost", "::1")


def use_loopback_node_address(address: str | None) -> None:
    """For a new local instance (no address, or "local") or a cluster bound to 127.0.0.1 (`ember cluster up`), keeps
    Ray from swapping 127.0.0.1 for this machine's network address: a new instance then listens on 127.0.0.1 only
    (its GCS, raylet, agents and metrics endpoints), and a loopback cluster is reached where it listens. Ray reads the
    variable at import: call this first. A value set by the user is kept."""
    if address in (None, "", "local") or is_loopback(address):
        os.environ.setdefault(_NODE_ADDRESS_ENV, LOOPBACK_NODE_ENV[_NODE_ADDRESS_ENV])


def bind_local_instance_to_loopback() -> None:
    """`use_loopback_node_address` for the local instance about to start, also where Ray was imported before it was
    called (a library caller): Ray then read the variable already, and is told what it would have read."""
    use_loopback_node_address(None)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ[_NODE_ADDRESS_ENV].lower() not in ("1", "true"):
        constants.ENABLE_RAY_CLUSTER = False


def use_token_auth() -> None:
    """Makes this process's Ray clients present the cluster's token (Ray sends it only with RAY_AUTH_MODE=token),
    unless the user chose a mode. Call it before Ray is imported: Ray reads the variable once."""
    for name, value in TOKEN_AUTH_ENV.items():
        os.environ.setdefault(name, value)


def token_auth_on() -> bool:
    """Whether this process uses token authentication (the default, unless the user chose another mode)."""
    return os.environ.get(AUTH_MODE_ENV, TOKEN_AUTH_ENV[AUTH_MODE_ENV]).lower() == TOKEN_AUTH_ENV[AUTH_MODE_ENV]


_DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


def token_file() -> Path:
    """The file Ray reads the cluster token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or _DEFAULT_TOKEN_FILE).expanduser()


def find_token() -> str | None:
    """The cluster token where Ray looks for it: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names,
    ~/.ray/auth_token (kept to its owner first: `protect_token_file`)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = token_file()
    if not path.is_file():
        return None
    protect_token_file(path)
    return path.read_text().strip() or None


def ensure_token() -> None:
    """Makes sure a token exists for a cluster Ember starts: where none is found, Ray's generator makes one (as `ray
    get-auth-token --generate` does) into ~/.ray/auth_token, created readable by its owner only (Ray's own writes it
    with the umask's mode)."""
    if find_token() or os.environ.get("RAY_AUTH_TOKEN_PATH"):  # a named file that is missing is the user's to fix
        return
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = token_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another process made it meanwhile: that one is the token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(generate_new_authentication_token())
    protect_token_file(path)


def protect_token_file(path: Path) -> None:
    """Keeps the token file readable by its owner only (0600) and Ray's default dir for it, ~/.ray, private (0700):
    a wider mode is narrowed, with a warning. A file or dir of another owner (a mounted secret) is left as it is,
    and so is a dir the user chose with RAY_AUTH_TOKEN_PATH."""
    places = [(path, 0o600)]
    if path == _DEFAULT_TOKEN_FILE.expanduser():
        places.append((path.parent, 0o700))
    for place, mode in places:
        try:
            st = place.stat()
        except OSError:
            continue
        if st.st_uid != os.geteuid() or not st.st_mode & 0o077:
            continue
        was = st.st_mode & 0o777
        try:
            place.chmod(mode)
        except OSError as exc:
            log.warning("warning: %s is open to other users of this machine (mode %03o) and could not be made %03o "
                        "(%s): whoever reads the cluster token can run code on the cluster", place, was, mode,
                        exc.strerror)
            continue
        log.warning("warning: %s was open to other users of this machine (mode %03o); made it %03o, since whoever "
                    "reads the cluster token can run code on the cluster", place, was, mode)
