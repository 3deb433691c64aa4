"""Paths and URIs alike: where Ember reads and writes datasets, runs, models and results.

A **location** is a local path or a URI that pyarrow opens (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path``). An S3-compatible store's options ride along as the URI's query
(``s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http``) and stay with every location joined under it
(`join`). Credentials come from the usual AWS environment variables, a profile, or the instance profile, never from
a URI: a location is written to run dirs, job metadata, trackers and logs, so one that carries a key, a secret or a
session token is refused (`secret_options`). `display` (what every message shows) drops the query all the same.

**Writes publish whole objects.** `write_bytes` writes a local file under a unique temporary name, flushes it to disk
and renames it (a crash leaves the old file or the new one); an object
store has no rename, but an object appears only once its upload is complete, so a reader sees all of it or none. An
output made of many objects (a dataset, a run, a model dir) is complete when its marker exists (a manifest, a stamp,
`config.json`): writers write the marker last.

**Reads of object storage go through the node cache** (`NodeCache`): one download per node, however many processes
on the node ask for it (they wait on a file lock), checked against the size and SHA-256 its writer recorded (hashed
again on a process's first use, and whenever the cached file changed on disk) and the modification time the store
lists (a rewritten object is fetched again). The cache lives in `EMBER_CACHE_DIR` (default: `ember-cache-UID` in the
node's temp dir, private to its user: 0700, checked) and keeps at most `EMBER_CACHE_BYTES` (default 20 GiB), evicting
the least recently used files first. Every path taken from a listing or a manifest is checked (`relative_key`) before
anything is written: an object key cannot reach outside the directory it is copied into.

Errors from the store (an unreachable endpoint, a missing bucket, refused credentials) become one `EmberError` that
names the location and what to do (`storage_error`). Transient failures are retried with backoff by pyarrow's S3
client (`RETRY_ATTEMPTS` attempts per request, or `EMBER_S3_RETRY_ATTEMPTS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from ember.errors import EmberError

CACHE_DIR_ENV = "EMBER_CACHE_DIR"
CACHE_BYTES_ENV = "EMBER_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 20 << 30
RETRY_ATTEMPTS = 5  # per S3 request, with the AWS SDK's exponential backoff between attempts
RETRY_ATTEMPTS_ENV = "EMBER_S3_RETRY_ATTEMPTS"  # overrides RETRY_ATTEMPTS
# The query options an s3:// URI may carry (pyarrow's S3FileSystem arguments of the same names).
S3_OPTIONS = {"endpoint_override", "scheme", "region", "role_arn", "anonymous", "force_virtual_addressing",
              "connect_timeout", "request_timeout"}
_FLOAT_OPTIONS, _BOOL_OPTIONS = {"connect_timeout", "request_timeout"}, {"anonymous", "force_virtual_addressing"}
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")  # pyarrow's names; refused in every URI
CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment "
                    "(`ember submit --env NAME` passes one to a job), a profile in ~/.aws, or the node's instance "
                    "profile")


# ----------------------------------------------------------------- locations


def is_uri(location: str | os.PathLike) -> bool:
    """Whether `location` is a URI of a remote store (``file://`` URIs are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A location in the form every other function here takes: an absolute local path, or the URI as given without
    a trailing slash."""
    text = str(location)
    if text.startswith("file://"):
        text = urlsplit(text).path
    if not is_uri(text):
        return os.path.abspath(os.path.expanduser(text))
    base, query = _split(text)
    return base.rstrip("/") + query


def _split(uri: str) -> tuple[str, str]:
    """(the URI without its query, "?query" or "")."""
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` / parts, keeping a URI's query at the end."""
    if not is_uri(location):
        return os.path.join(str(location), *parts)
    base, query = _split(str(location))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + query


def parent(location: str | os.PathLike) -> str:
    if not is_uri(location):
        return os.path.dirname(os.path.abspath(str(location)))
    base, query = _split(str(location))
    return base.rstrip("/").rsplit("/", 1)[0] + query


def name(location: str | os.PathLike) -> str:
    return _split(str(location))[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else \
        os.path.basename(str(location).rstrip("/"))


def display(location: str | os.PathLike) -> str:
    """The location as messages show it: a URI without its query (which may carry credentials)."""
    return _split(str(location))[0] if is_uri(location) else str(location)


def relative_key(rel: str, where: str | os.PathLike) -> str:
    """`rel` if it is a plain relative POSIX path (no leading '/', no empty, '.' or '..' segment, no NUL or
    backslash), so that joined onto a directory it stays inside it; else an EmberError naming it and `where` (the
    listing or manifest it came from). Every path taken from a listing or a manifest goes through here: an object key
    such as `m//etc/x` or `m/../x` must not reach outside the directory it is copied into."""
    parts = rel.split("/")
    if not rel or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise EmberError(f"{display(where)}: refusing {rel!r}: not a plain relative path inside it (an absolute "
                         "path, an empty, '.' or '..' segment, or a backslash); nothing was written for it")
    return rel


def _at(location: str, path: str) -> str:
    """The location of `path` (a path as `location`'s store lists it) on `location`'s store, with its query."""
    if not is_uri(location):
        return path
    base, query = _split(location)
    parts = urlsplit(base)
    netloc = "" if parts.scheme in ("s3", "gs", "gcs") else parts.netloc
    return f"{parts.scheme}://{netloc}{path}{query}"


# ----------------------------------------------------------------- file systems


@lru_cache(maxsize=32)
def _filesystem(fs_key: str) -> pafs.FileSystem:
    """The pyarrow file system of a URI's scheme, host and query ("" = local), one per process."""
    if not fs_key:
        return pafs.LocalFileSystem()
    parts = urlsplit(fs_key)
    if parts.scheme != "s3":
        return pafs.FileSystem.from_uri(fs_key)[0]
    options = _query_options(parts.query)
    if secret_options(fs_key):
        raise EmberError(f"{parts.scheme}://{parts.netloc}: credentials in a URI ({', '.join(secret_options(fs_key))}) "
                         "are not accepted: a location is written to run dirs, job metadata and logs; "
                         f"{CREDENTIALS_HELP}")
    unknown = sorted(set(options) - S3_OPTIONS)
    if unknown:
        raise EmberError(f"{parts.scheme}://{parts.netloc}: unknown S3 option(s) {', '.join(unknown)} in the URI "
                         f"(known: {', '.join(sorted(S3_OPTIONS))})")
    where = f"{parts.scheme}://{parts.netloc}"
    kwargs: dict = {}
    for key, value in options.items():
        if key in _FLOAT_OPTIONS:
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise _option_error(where, key, value, "is not a number") from None
        elif key in _BOOL_OPTIONS:
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif key == "scheme" and value not in ("http", "https"):
            raise _option_error(where, key, value, "is neither http nor https")
        else:
            kwargs[key] = value
    kwargs.setdefault("connect_timeout", 5.0)
    kwargs.setdefault("request_timeout", 60.0)
    if "region" not in kwargs and os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = os.environ["AWS_DEFAULT_REGION"]
    attempts = int(os.environ.get(RETRY_ATTEMPTS_ENV) or RETRY_ATTEMPTS)
    try:
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
    except (pa.ArrowInvalid, ValueError, TypeError) as exc:
        raise EmberError(f"{where}: the S3 client refused the URI's options: {exc}") from None


def secret_options(text: str) -> list[str]:
    """The credential options (`SECRET_OPTIONS`) a URI's query carries, by name; [] for anything else."""
    if "://" not in text or "?" not in text:
        return []
    found = {k.lower() for k, _ in parse_qsl(_split(text)[1].lstrip("?"), keep_blank_values=True)}
    return [k for k in SECRET_OPTIONS if k in found]


def _query_options(query: str) -> dict[str, str]:
    """A URI's `?option=value` pairs. A '+' stays a '+' (as pyarrow reads URIs): secret keys hold them, and form
    decoding would make them spaces."""
    return dict(parse_qsl(query.lstrip("?").replace("+", "%2B"), keep_blank_values=True))


def _option_error(where: str, key: str, value: str, why: str) -> EmberError:
    """A bad `?option=value` of an s3:// URI (never a credential: those are refused first). A value holding a path is
    most often a path written after the query (`s3://b/x?scheme=http/data`): said so."""
    shown = repr(value)
    hint = "; a URI's path goes before its '?': s3://bucket/path?option=value" \
        if "/" in value.split("://", 1)[-1] else ""
    return EmberError(f"{where}: S3 option {key}={shown} {why}{hint}")


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path on it) of a location."""
    text = normalize(location)
    if not is_uri(text):
        return _filesystem(""), text
    base, query = _split(text)
    parts = urlsplit(base)
    path = (parts.netloc + parts.path) if parts.scheme in ("s3", "gs", "gcs") else parts.path
    return _filesystem(f"{parts.scheme}://{parts.netloc}{query}"), path.rstrip("/")


def storage_error(exc: BaseException, location: str | os.PathLike, doing: str) -> EmberError:
    """The one message for a store that refused: what was being done, to which location, why, and what to do.
    pyarrow's S3 client reports the AWS SDK's error names in its message (it has no error codes of its own); this
    is the one place that reads them."""
    text, where = str(exc), display(location)
    reasons = (  # (cause, what the SDK's message holds, what to say)
        ("missing bucket", ("NO_SUCH_BUCKET", "NoSuchBucket", "bucket does not exist"),
         "the bucket does not exist; create it or fix the URI"),
        ("denied", ("ACCESS_DENIED", "AccessDenied", "Forbidden", "HTTP response code: 403"),
         "permission denied; grant this node's credentials access to it"),
        ("refused credentials",
         ("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch",
          "No credentials", "NoCredentials", "INVALID_CLIENT_TOKEN_ID", "EXPIRED_TOKEN"),
         "the credentials were refused; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's instance "
         "profile) for this store"),
        ("unreachable",
         ("curlCode: 7", "curlCode: 6", "curlCode: 28", "Couldn't connect", "Could not resolve", "Connection refused",
          "Timeout was reached"),
         "cannot reach the store's endpoint; check endpoint_override in the URI and the network"),
        ("failing",
         ("SLOW_DOWN", "SlowDown", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError",
          "HTTP status 503", "HTTP status 500", "HTTP response code: 503", "HTTP response code: 500"),
         "the store kept failing (throttled or unavailable) through every retry; try again later, or raise "
         f"{RETRY_ATTEMPTS_ENV}"),
    )
    cause, why = next(((c, reason) for c, needles, reason in reasons if any(n in text for n in needles)),
                      (None, text.splitlines()[0] if text else type(exc).__name__))
    if cause not in ("missing bucket", "unreachable") and not _has_credentials(str(location)):
        # A refusal, in whatever words the store chose, to a process that has no keys at all.
        why = ("no credentials were found for this store; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile "
               "in ~/.aws, or the node's instance profile (or add anonymous=true to the URI for a public bucket)")
    return EmberError(f"cannot {doing} {where}: {why}")


def _has_credentials(location: str) -> bool:
    """Whether this process has AWS credentials for an s3:// location, or may have: a role in the URI, the environment,
    the shared files, a web identity or container role, or (metadata lookup not disabled) an instance profile.
    Without any, a store's refusal says that, whatever words the store used."""
    if not location.startswith("s3://"):
        return True
    options = _query_options(_split(location)[1])
    env = os.environ
    if options.get("role_arn") or options.get("anonymous", "").lower() in ("1", "true"):
        return True
    if any(env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    home = Path.home() / ".aws"
    if any(os.path.isfile(f) for f in (env.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials",
                                       env.get("AWS_CONFIG_FILE") or home / "config")):
        return True
    return env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"


def _store_call(location, doing: str, fn, *args):
    """`fn(*args)` against the store of `location`; a refusal becomes `storage_error` (FileNotFoundError stays)."""
    try:
        return fn(*args)
    except (EmberError, FileNotFoundError):
        raise
    except (OSError, pa.ArrowException) as exc:
        if "HeadObject" in str(exc) and "ACCESS_DENIED" in str(exc):
            # A refused HEAD request has no body to say why (bad credentials or no permission); a listing of the
            # same prefix does, so its answer names the cause.
            fs, path = resolve(location)
            try:
                fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0], allow_not_found=True))
            except (OSError, pa.ArrowException) as listed:
                exc = listed
        raise storage_error(exc, location, doing) from None


def _listing(location: str | os.PathLike, recursive: bool = False) -> tuple[str, list[pafs.FileInfo]]:
    """(the location's path on its store, the entries under it); no entries when there is nothing there."""
    fs, base = resolve(location)
    selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
    return base, _store_call(location, "list", fs.get_file_info, selector)


def info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return _store_call(location, "read", fs.get_file_info, path)


def is_file(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    """A local directory, or a prefix of an object store that holds at least one object."""
    if not is_uri(location):
        return os.path.isdir(normalize(location))
    kind = info(location).type
    if kind == pafs.FileType.Directory:
        return True
    if kind == pafs.FileType.File:
        return False
    return bool(_listing(location)[1])


def exists(location: str | os.PathLike) -> bool:
    return info(location).type != pafs.FileType.NotFound


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file or object; FileNotFoundError when there is none."""
    if not is_uri(location):
        return Path(normalize(location)).read_bytes()
    fs, path = resolve(location)

    def read():  # one request: a missing object raises FileNotFoundError
        with fs.open_input_stream(path) as stream:
            return stream.read()

    return _store_call(location, "read", read)


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | os.PathLike):
    """The parsed JSON at `location`, or None when there is none or it is not JSON."""
    try:
        return json.loads(read_bytes(location))
    except (FileNotFoundError, ValueError):
        return None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Publishes `data` whole: a local file under a temporary name, then renamed (creating the parent directory);
    an object in one upload."""
    if not is_uri(location):
        _publish_local(Path(normalize(location)), lambda f: f.write(data))
        return
    fs, path = resolve(location)

    def write():
        with fs.open_output_stream(path) as stream:
            stream.write(data)

    _store_call(location, "write", write)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str | os.PathLike, data) -> None:
    write_text(location, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def put_file(local: str | os.PathLike, location: str | os.PathLike) -> None:
    """Publishes a local file at `location` (a local path: a copy renamed into place)."""
    if not is_uri(location):
        def copy(dst):
            with open(local, "rb") as src:
                shutil.copyfileobj(src, dst, 8 << 20)

        _publish_local(Path(normalize(location)), copy)
        return
    fs, path = resolve(location)
    _store_call(location, "write", pafs.copy_files, str(local), path, pafs.LocalFileSystem(), fs)


def _publish_local(target: Path, fill) -> None:
    """Writes a local file whole or not at all: `fill(f)` writes into a temporary file of a unique name beside
    `target` (two writers never share one), which is flushed to disk, renamed over `target`, and the rename itself
    flushed (the directory), so a crash leaves the old file or the new one, never a torn one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[tuple[str, int]]:
    """(path relative to `location`, size) of every file under it, sorted; [] when there is none. A listed key
    that is not a plain relative path under `location` (`relative_key`) is an error."""
    return sorted((rel, i.size) for rel, i in _files(location, recursive))


def _files(location: str | os.PathLike, recursive: bool = True) -> list[tuple[str, pafs.FileInfo]]:
    """(checked relative path, the store's entry) of every file under `location`."""
    base, infos = _listing(location, recursive)
    prefix = base.rstrip("/") + "/"
    return [(relative_key(i.path[len(prefix):] if i.path.startswith(prefix) else i.path, location), i)
            for i in infos if i.type == pafs.FileType.File]


def file_stats(location: str | os.PathLike, prefix: str = "", contains: str = "") -> list[tuple[str, int, int]]:
    """(location, size, modification time in ns) of the files directly under `location` whose names start with
    `prefix` and hold `contains`, sorted: what `ember.identity.files_fingerprint` takes."""
    return sorted((display(join(location, i.base_name)), i.size, i.mtime_ns or 0) for i in _listing(location)[1]
                  if i.type == pafs.FileType.File and i.base_name.startswith(prefix) and contains in i.base_name)


def list_names(location: str | os.PathLike) -> set[str]:
    """The names of the files and directories (prefixes) directly under `location`; empty when there is none."""
    return {i.base_name for i in _listing(location)[1]}


def delete(location: str | os.PathLike) -> None:
    """Removes a file or object; nothing when there is none (or when it is a directory: see `delete_tree`)."""
    if not is_uri(location):
        if os.path.isfile(normalize(location)):
            os.unlink(normalize(location))
        return
    fs, path = resolve(location)
    try:
        _store_call(location, "delete", fs.delete_file, path)
    except FileNotFoundError:
        pass


def delete_tree(location: str | os.PathLike) -> None:
    """Removes a directory (or every object under a prefix, whatever the keys' form, and the prefix's own marker
    object, which uploads create) and all it holds."""
    if not is_uri(location):
        shutil.rmtree(normalize(location), ignore_errors=True)
        return
    fs, path = resolve(location)
    try:
        _store_call(location, "delete", fs.delete_dir, path)
    except FileNotFoundError:
        pass


def copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a file within one store (S3's CopyObject: the bytes stay in the store; locally, a published copy)."""
    if not is_uri(target):
        put_file(normalize(source), target)
        return
    fs, source_path = resolve(source)
    _, target_path = resolve(target)
    _store_call(target, "write", fs.copy_file, source_path, target_path)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str | None = None) -> None:
    """Copies a local directory to `location`, the file named `marker` (its completeness marker) last."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local_dir).as_posix() == marker)
    for path in files:
        put_file(path, join(location, path.relative_to(local_dir).as_posix()))


def publish_dir(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str) -> None:
    """Publishes a local dir at a location so that the dir there stays whole until the new one is (a model dir that
    replicas may be loading): uploaded beside it first (`.tmp-NAME-RANDOM/`), then copied into place inside the
    store, `marker` last; only then are the previous files the new set lacks removed, and the uploaded copies. A
    kill during the upload (the long part) leaves the previous dir as it was."""
    import uuid

    local_dir = Path(local_dir)
    staging = join(parent(location), f".tmp-{name(location)}-{uuid.uuid4().hex[:12]}")
    previous = {rel for rel, _ in list_files(location)}
    new = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    new.sort(key=lambda rel: rel == marker)
    try:
        upload_dir(local_dir, staging, marker=marker)
        for rel in new:
            copy(join(staging, rel), join(location, rel))
        for rel in sorted(previous - set(new)):
            delete(join(location, rel))
    finally:
        delete_tree(staging)


def make_dirs(location: str | os.PathLike) -> None:
    """Creates a local directory (an object store needs none)."""
    if not is_uri(location):
        Path(normalize(location)).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------- the node cache


def cache_dir() -> Path:
    """`EMBER_CACHE_DIR`, or this user's own dir in the node's temp dir (`ember-cache-UID`): created 0700, and
    checked to be this user's and writable by no one else (`_private_dir`)."""
    directory = Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / f"ember-cache-{os.getuid()}")
    _private_dir(directory)
    return directory


def _private_dir(directory: Path) -> None:
    """Creates `directory` (mode 0700), or checks that the one there is this user's and that no one else may write
    it: a cache another user can write could hand this one a file of their choosing."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise EmberError(f"the node cache {directory} belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}; "
                         f"it must be this user's (uid {os.getuid()}) and writable by no one else (0700): fix it, "
                         f"or set {CACHE_DIR_ENV} to a dir of your own")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a local file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Cached:
    """A file of the node cache: its local path, and whether this call downloaded it."""

    path: Path
    downloaded: bool


_VERIFIED: set[tuple[str, int, int]] = set()  # (entry, size, mtime) whose bytes this process has hashed


class NodeCache:
    """Node-local copies of remote files (see the module docstring). Safe for many processes on one node."""

    def __init__(self, directory: str | os.PathLike | None = None, budget_bytes: int | None = None):
        self.directory = Path(directory) if directory else cache_dir()
        self.budget = budget_bytes if budget_bytes is not None else \
            int(os.environ.get(CACHE_BYTES_ENV) or DEFAULT_CACHE_BYTES)
        if directory:
            _private_dir(self.directory)

    def _entry(self, location: str) -> Path:
        # The key hashes the whole URI: the endpoint tells stores apart; the query may hold credentials.
        key = hashlib.sha256(normalize(location).encode()).hexdigest()[:40]
        return self.directory / "files" / key[:2] / f"{key}-{name(location)}"

    def fetch(self, location: str | os.PathLike, size: int | None = None, sha256: str | None = None,
              version: int | None = None) -> Cached:
        """A local copy of a remote file, downloaded once per node and checked against `size` and `sha256` (when
        given: a writer's record). `version` (the modification time the store lists) tells a rewritten object from
        the one cached, whatever its size. A cached copy is hashed again the first time a process uses it when a
        `sha256` is known, and whenever it changed on disk since it was checked; one that no longer matches is
        fetched anew."""
        from filelock import FileLock

        location = normalize(location)
        entry = self._entry(location)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if self._still_good(entry, size, sha256, version):
                os.utime(entry.with_name(entry.name + ".json"))  # recently used: last to be evicted
                return Cached(entry, False)
            self._evict(keep=entry, reserve=size or 0)  # room for it first: the budget holds during the download
            self._download(location, entry, size, sha256, version)
        self._evict(keep=entry)
        return Cached(entry, True)

    def _still_good(self, entry: Path, size: int | None, sha256: str | None, version: int | None) -> bool:
        record_path = entry.with_name(entry.name + ".json")
        try:
            record, st = json.loads(record_path.read_text()), entry.stat()
        except (OSError, ValueError):
            return False
        if (size is not None and st.st_size != size) or (sha256 is not None and record.get("sha256") != sha256) \
                or (version is not None and record.get("version") != version):
            return False
        seen = (str(entry), st.st_size, st.st_mtime_ns)
        if [st.st_size, st.st_mtime_ns] == record.get("stat") and (sha256 is None or seen in _VERIFIED):
            return True
        if file_sha256(entry) != record.get("sha256"):  # changed on disk, or first use here: check its bytes
            return False
        _VERIFIED.add(seen)
        record["stat"] = [st.st_size, st.st_mtime_ns]
        record_path.write_text(json.dumps(record))
        return True

    def _download(self, location: str, entry: Path, size: int | None, sha256: str | None,
                  version: int | None) -> None:
        fs, path = resolve(location)
        # A name of this thread's own: the entry's file lock excludes other processes, not this one's other
        # threads (a reader's background fetches).
        tmp = entry.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{entry.name}")
        h, n = hashlib.sha256(), 0
        try:
            def copy():
                nonlocal n
                with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                    for chunk in iter(lambda: src.read(8 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
                        n += len(chunk)

            _store_call(location, "read", copy)  # a missing object raises FileNotFoundError
            if (size is not None and n != size) or (sha256 is not None and h.hexdigest() != sha256):
                raise EmberError(f"{display(location)}: the object holds {n} bytes with SHA-256 {h.hexdigest()[:12]}…, "
                                 f"not the {size} bytes / {str(sha256)[:12]}… its writer recorded; the object "
                                 "changed after it was published (write the output again)")
            os.replace(tmp, entry)
        finally:
            tmp.unlink(missing_ok=True)
        st = entry.stat()
        _VERIFIED.add((str(entry), st.st_size, st.st_mtime_ns))
        entry.with_name(entry.name + ".json").write_text(json.dumps({
            "location": display(location), "sha256": h.hexdigest(), "stat": [st.st_size, st.st_mtime_ns],
            "version": version, "fetched": time.time()}))

    def _evict(self, keep: Path, reserve: int = 0) -> None:
        """Removes the least recently used files until the cache fits its budget with `reserve` bytes to spare
        (files in use by another process of the node, i.e. locked, stay)."""
        from filelock import FileLock, Timeout

        entries = []
        for record in (self.directory / "files").glob("*/*.json"):
            entry = record.with_name(record.name[: -len(".json")])
            try:  # another process of the node may evict it meanwhile
                entries.append((record.stat().st_mtime, entry, entry.stat().st_size))
            except FileNotFoundError:
                continue
        total = sum(size for _, _, size in entries)
        for _, entry, _ in sorted(entries, key=lambda x: x[0]):
            if total + reserve <= self.budget:
                break
            if entry == keep:
                continue
            try:
                with FileLock(str(entry) + ".lock", timeout=0):
                    size = entry.stat().st_size
                    entry.unlink()
                    entry.with_name(entry.name + ".json").unlink(missing_ok=True)
                    total -= size
            except (Timeout, OSError):
                continue

    def fetch_dir(self, location: str | os.PathLike) -> Path:
        """A local copy of a remote directory of small files (a model dir): every listed key checked first
        (`relative_key`; one that is not a plain relative path fails the whole dir before anything is written),
        each exact key fetched through the cache (checked against its listed size and modification time), and
        linked into a view of its own for this listing, so a re-export is seen whole, without files of the one
        before."""
        location = normalize(location)
        files = _files(location)
        if not files:
            raise FileNotFoundError(display(location))
        listing = sorted((rel, i.size, i.mtime_ns or 0) for rel, i in files)
        place = self.directory / "dirs" / hashlib.sha256(location.encode()).hexdigest()[:40]
        view = place / f"{hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}-{name(location)}"
        if view.is_dir():
            os.utime(view)  # in use: not an old view (`_drop_old_views`)
            return view
        place.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=place))
        try:
            for rel, entry in files:
                cached = self.fetch(_at(location, entry.path), size=entry.size, version=entry.mtime_ns)
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(cached.path, staging / rel)
            try:
                os.rename(staging, view)
            except OSError:  # another process of the node published the same view first
                if not view.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._drop_old_views(place, keep=view)
        return view

    @staticmethod
    def _drop_old_views(place: Path, keep: Path, age_s: float = 3600) -> None:
        """Removes the views of earlier listings of a location not used for `age_s` (their files stay in the
        cache; a process that opened them keeps what it opened)."""
        for old in place.iterdir():
            try:
                if old != keep and not old.name.startswith(".tmp-") and time.time() - old.stat().st_mtime > age_s:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                continue


def local_dir(location: str | os.PathLike) -> Path:
    """A directory this process can open: a local path as it is, a remote one through the node cache."""
    if not is_uri(location):
        return Path(normalize(location))
    return NodeCache().fetch_dir(location)
