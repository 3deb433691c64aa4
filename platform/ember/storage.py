"""Paths and URIs alike: where Ember reads and writes datasets, runs, models and results.

A **location** is a local path or a URI that pyarrow opens (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path``). An S3-compatible store's options ride along as the URI's query
(``s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http``) and stay with every location joined under it
(`join`). Credentials come from the usual AWS environment variables or the instance profile; a URI may also carry
them, so `display` (what every message shows) drops the query.

**Writes publish whole objects.** `write_bytes` writes a local file under a temporary name and renames it; an object
store has no rename, but an object appears only once its upload is complete, so a reader sees all of it or none. An
output made of many objects (a dataset, a run, a model dir) is complete when its marker exists (a manifest, a stamp,
`config.json`): writers write the marker last.

**Reads of object storage go through the node cache** (`NodeCache`): one download per node, however many processes
on the node ask for it (they wait on a file lock), checked against the size and SHA-256 its writer recorded, and
verified again whenever the cached file changed on disk. The cache lives in `EMBER_CACHE_DIR` (default: the node's
temp dir) and keeps at most `EMBER_CACHE_BYTES` (default 20 GiB), evicting the least recently used files first.

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
S3_OPTIONS = {"endpoint_override", "scheme", "region", "access_key", "secret_key", "session_token", "role_arn",
              "anonymous", "force_virtual_addressing", "connect_timeout", "request_timeout"}
_FLOAT_OPTIONS, _BOOL_OPTIONS = {"connect_timeout", "request_timeout"}, {"anonymous", "force_virtual_addressing"}
_SECRET_OPTIONS = {"access_key", "secret_key", "session_token"}  # never shown in a message


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


def _query_options(query: str) -> dict[str, str]:
    """A URI's `?option=value` pairs. A '+' stays a '+' (as pyarrow reads URIs): secret keys hold them, and form
    decoding would make them spaces."""
    return dict(parse_qsl(query.lstrip("?").replace("+", "%2B"), keep_blank_values=True))


def _option_error(where: str, key: str, value: str, why: str) -> EmberError:
    """A bad `?option=value` of an s3:// URI, its value shown unless it is a credential. A value holding a path is
    most often a path written after the query (`s3://b/x?scheme=http/data`): said so."""
    shown = "(hidden)" if key in _SECRET_OPTIONS else repr(value)
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
    """Whether this process has AWS credentials for an s3:// location, or may have: in the URI, the environment,
    the shared files, a web identity or container role, or (metadata lookup not disabled) an instance profile.
    Without any, a store's refusal says that, whatever words the store used."""
    if not location.startswith("s3://"):
        return True
    options = _query_options(_split(location)[1])
    env = os.environ
    if options.get("access_key") or options.get("role_arn") or options.get("anonymous", "").lower() in ("1", "true"):
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
        path = Path(normalize(location))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
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
        target = Path(normalize(location))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        return
    fs, path = resolve(location)
    _store_call(location, "write", pafs.copy_files, str(local), path, pafs.LocalFileSystem(), fs)


def list_files(location: str | os.PathLike, recursive: bool = True) -> list[tuple[str, int]]:
    """(path relative to `location`, size) of every file under it, sorted; [] when there is none."""
    base, infos = _listing(location, recursive)
    prefix = base.rstrip("/") + "/"
    return sorted((i.path[len(prefix):] if i.path.startswith(prefix) else i.path, i.size)
                  for i in infos if i.type == pafs.FileType.File)


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
    """Removes a directory (or every object under a prefix) and all it holds."""
    if not is_uri(location):
        shutil.rmtree(normalize(location), ignore_errors=True)
        return
    fs, path = resolve(location)
    for rel, _ in list_files(location):
        _store_call(location, "delete", fs.delete_file, f"{path}/{rel}")


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str | None = None) -> None:
    """Copies a local directory to `location`, the file named `marker` (its completeness marker) last."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local_dir).as_posix() == marker)
    for path in files:
        put_file(path, join(location, path.relative_to(local_dir).as_posix()))


def make_dirs(location: str | os.PathLike) -> None:
    """Creates a local directory (an object store needs none)."""
    if not is_uri(location):
        Path(normalize(location)).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------- the node cache


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "ember-cache")


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


class NodeCache:
    """Node-local copies of remote files (see the module docstring). Safe for many processes on one node."""

    def __init__(self, directory: str | os.PathLike | None = None, budget_bytes: int | None = None):
        self.directory = Path(directory) if directory else cache_dir()
        self.budget = budget_bytes if budget_bytes is not None else \
            int(os.environ.get(CACHE_BYTES_ENV) or DEFAULT_CACHE_BYTES)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _entry(self, location: str) -> Path:
        # The key hashes the whole URI: the endpoint tells stores apart; the query may hold credentials.
        key = hashlib.sha256(normalize(location).encode()).hexdigest()[:40]
        return self.directory / "files" / key[:2] / f"{key}-{name(location)}"

    def fetch(self, location: str | os.PathLike, size: int | None = None, sha256: str | None = None) -> Cached:
        """A local copy of a remote file, downloaded once per node and checked against `size` and `sha256` (when
        given: a writer's record). A cached copy that changed on disk since it was checked is checked again and
        fetched anew when it no longer matches."""
        from filelock import FileLock

        location = normalize(location)
        entry = self._entry(location)
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if self._still_good(entry, size, sha256):
                os.utime(entry.with_name(entry.name + ".json"))  # recently used: last to be evicted
                return Cached(entry, False)
            self._download(location, entry, size, sha256)
        self._evict(keep=entry)
        return Cached(entry, True)

    def _still_good(self, entry: Path, size: int | None, sha256: str | None) -> bool:
        record_path = entry.with_name(entry.name + ".json")
        try:
            record, st = json.loads(record_path.read_text()), entry.stat()
        except (OSError, ValueError):
            return False
        if (size is not None and st.st_size != size) or (sha256 is not None and record.get("sha256") != sha256):
            return False
        if [st.st_size, st.st_mtime_ns] == record.get("stat"):
            return True
        actual = file_sha256(entry)  # changed on disk since it was checked: check its bytes again
        if actual != record.get("sha256"):
            return False
        record["stat"] = [st.st_size, st.st_mtime_ns]
        record_path.write_text(json.dumps(record))
        return True

    def _download(self, location: str, entry: Path, size: int | None, sha256: str | None) -> None:
        fs, path = resolve(location)
        tmp = entry.with_name(f".tmp-{os.getpid()}-{entry.name}")
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
        entry.with_name(entry.name + ".json").write_text(json.dumps({
            "location": display(location), "sha256": h.hexdigest(), "stat": [st.st_size, st.st_mtime_ns],
            "fetched": time.time()}))

    def _evict(self, keep: Path) -> None:
        """Removes the least recently used files until the cache fits its budget (files in use by another process
        of the node, i.e. locked, stay)."""
        from filelock import FileLock, Timeout

        entries = []
        for record in (self.directory / "files").glob("*/*.json"):
            entry = record.with_name(record.name[: -len(".json")])
            if entry.exists():
                entries.append((record.stat().st_mtime, entry))
        total = sum(e.stat().st_size for _, e in entries)
        for _, entry in sorted(entries, key=lambda x: x[0]):
            if total <= self.budget:
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
        """A local copy of a remote directory of small files (a model dir), each file fetched through the cache and
        linked into one directory per location; checked against the sizes the store lists."""
        location = normalize(location)
        files = list_files(location)
        if not files:
            raise FileNotFoundError(display(location))
        key = hashlib.sha256(location.encode()).hexdigest()[:40]
        view = self.directory / "dirs" / f"{key}-{name(location)}"
        for rel, size in files:
            cached = self.fetch(join(location, rel), size=size)
            target = view / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
            tmp.unlink(missing_ok=True)
            os.link(cached.path, tmp)
            os.replace(tmp, target)
        return view


def local_dir(location: str | os.PathLike) -> Path:
    """A directory this process can open: a local path as it is, a remote one through the node cache."""
    if not is_uri(location):
        return Path(normalize(location))
    return NodeCache().fetch_dir(location)
