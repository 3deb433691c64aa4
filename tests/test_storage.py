"""The storage layer on a real S3 API (moto's server on 127.0.0.1) and on local disk: locations, whole-object
writes, listing, the errors a store gives, and the node cache shared by processes of one node."""

from __future__ import annotations

import json
import multiprocessing
import os
import re

import pytest

from conftest import free_port
from ember import storage
from ember.errors import EmberError


def bucket_uri(s3_server, prefix: str) -> str:
    bucket, endpoint, _ = s3_server
    return f"s3://{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http"


def test_locations_keep_a_uri_query_at_the_end_and_messages_drop_it():
    uri = "s3://b/runs/x?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=hush"
    assert storage.join(uri, "model", "config.json") == \
        "s3://b/runs/x/model/config.json?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=hush"
    assert storage.parent(uri) == "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=hush"
    assert storage.name(uri) == "x"
    assert storage.display(storage.join(uri, "a")) == "s3://b/runs/x/a"
    assert storage.normalize("s3://b/x/") == "s3://b/x" and storage.normalize("file:///tmp/a") == "/tmp/a"
    assert not storage.is_uri("relative/dir") and storage.normalize("relative/dir") == os.path.abspath("relative/dir")
    with pytest.raises(EmberError, match=r"s3://b: unknown S3 option\(s\) endpoint in the URI"):
        storage.resolve("s3://b/x?endpoint=127.0.0.1:1")
    # A path joined after the query (by hand, not with storage.join) lands in the last option's value.
    with pytest.raises(EmberError, match=r"^s3://b: S3 option scheme='http/data/docs' is neither http nor https; a "
                                         r"URI's path goes before its '\?': s3://bucket/path\?option=value$"):
        storage.resolve("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http/data/docs")
    with pytest.raises(EmberError, match=r"S3 option connect_timeout='soon' is not a number$"):
        storage.resolve("s3://b/x?connect_timeout=soon")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_list_and_delete_alike_on_disk_and_in_a_bucket(where, tmp_path, s3_server):
    root = str(tmp_path / "root") if where == "local" else bucket_uri(s3_server, f"rw-{tmp_path.name}")
    assert storage.list_files(root) == [] and storage.list_names(root) == set() and not storage.exists(root)
    storage.write_json(storage.join(root, "a", "stamp.json"), {"identity": "x"})
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f.txt").write_text("f")
    (local / "config.json").write_text("{}")
    storage.upload_dir(local, storage.join(root, "model"), marker="config.json")
    assert storage.read_json(storage.join(root, "a", "stamp.json")) == {"identity": "x"}
    assert storage.read_json(storage.join(root, "nothing.json")) is None
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01"
    assert storage.list_files(root) == [("a/stamp.json", len(storage.read_bytes(storage.join(root, "a/stamp.json")))),
                                        ("b.bin", 2), ("model/config.json", 2), ("model/sub/f.txt", 1)]
    assert storage.list_names(root) == {"a", "b.bin", "model"}
    assert storage.is_dir(storage.join(root, "model")) and storage.is_file(storage.join(root, "b.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "gone.bin"))
    storage.delete_tree(storage.join(root, "model"))
    storage.delete(storage.join(root, "b.bin"))
    assert [rel for rel, _ in storage.list_files(root)] == ["a/stamp.json"]


def test_a_missing_bucket_and_an_unreachable_endpoint_name_the_location_and_what_to_do(s3_server):
    _, endpoint, _ = s3_server
    with pytest.raises(EmberError) as missing:
        storage.write_bytes(f"s3://no-such-bucket/x/a.bin?endpoint_override={endpoint}&scheme=http", b"1")
    assert str(missing.value) == "cannot write s3://no-such-bucket/x/a.bin: the bucket does not exist; create it " \
                                 "or fix the URI"
    port = free_port()  # nothing listens there
    with pytest.raises(EmberError) as unreachable:
        storage.read_bytes(f"s3://b/x.json?endpoint_override=127.0.0.1:{port}&scheme=http&connect_timeout=1")
    assert str(unreachable.value).startswith("cannot read s3://b/x.json: cannot reach the store's endpoint")


def _fetch_in_process(cache_dir: str, uri: str, size: int, sha256: str, results) -> None:
    cached = storage.NodeCache(cache_dir).fetch(uri, size=size, sha256=sha256)
    results.put((str(cached.path), cached.downloaded, cached.path.read_bytes() == b"shard" * 200_000))


def test_the_node_cache_downloads_once_per_node_and_refetches_a_corrupted_copy(tmp_path, s3_server):
    import hashlib

    uri = bucket_uri(s3_server, f"cache-{tmp_path.name}/train/u000000-000.arrow")
    data = b"shard" * 200_000
    storage.write_bytes(uri, data)
    size, sha256 = len(data), hashlib.sha256(data).hexdigest()
    # Two "ranks" of one node ask at once: one downloads, the other waits on the lock and finds the copy.
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    ranks = [ctx.Process(target=_fetch_in_process, args=(str(tmp_path / "cache"), uri, size, sha256, results))
             for _ in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    got = [results.get(timeout=5) for _ in ranks]
    assert sorted(downloaded for _, downloaded, _ in got) == [False, True]
    assert all(ok for *_, ok in got) and got[0][0] == got[1][0]
    cache = storage.NodeCache(tmp_path / "cache")
    path = cache.fetch(uri, size=size, sha256=sha256).path
    assert not cache.fetch(uri, size=size, sha256=sha256).downloaded
    # A cached copy changed on disk (same size, other bytes) is found out and fetched again.
    path.write_bytes(b"X" + data[1:])
    again = cache.fetch(uri, size=size, sha256=sha256)
    assert again.downloaded and again.path.read_bytes() == data
    # An object that is not what its writer recorded is refused, naming it.
    with pytest.raises(EmberError, match=r"u000000-000.arrow: the object holds 1000000 bytes .* changed after it "
                                         r"was published"):
        storage.NodeCache(tmp_path / "other-cache").fetch(uri, size=size, sha256="0" * 64)


def test_a_cached_copy_is_hashed_again_on_a_process_first_use(tmp_path, s3_server):
    """A copy whose bytes were changed with its size and modification time kept passes a stat check; a new process
    that knows the SHA-256 hashes it before trusting it."""
    import hashlib

    uri = bucket_uri(s3_server, f"rehash-{tmp_path.name}/u.arrow")
    data = b"shard" * 200_000
    storage.write_bytes(uri, data)
    size, sha256 = len(data), hashlib.sha256(data).hexdigest()
    path = storage.NodeCache(tmp_path / "cache").fetch(uri, size=size, sha256=sha256).path
    st = path.stat()
    path.write_bytes(b"X" + data[1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same size and mtime as the record holds
    results = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(
        target=_fetch_in_process, args=(str(tmp_path / "cache"), uri, size, sha256, results))
    proc.start()
    proc.join(60)
    _, downloaded, intact = results.get(timeout=5)
    assert downloaded and intact


def test_object_keys_that_leave_their_dir_are_refused_and_nothing_is_written(tmp_path, s3_server):
    """`m//abs/path` lists as an absolute path and `m/a/../../x` climbs out: the model dir fails naming the key,
    and neither the file it aimed at nor any view is written."""
    _, _, client = s3_server
    victim = tmp_path / "victim"
    victim.write_text("original")
    for prefix, evil in ((f"keys-{tmp_path.name}/abs", f"/{str(victim).lstrip('/')}"),
                         (f"keys-{tmp_path.name}/up", "a/../../victim")):
        client.put_object(Bucket="ember-corpus", Key=f"{prefix}/config.json", Body=b"{}")
        client.put_object(Bucket="ember-corpus", Key=f"{prefix}/{evil}", Body=b"evil")
        client.put_object(Bucket="ember-corpus", Key=f"{prefix}/{evil.lstrip('/')}", Body=b"evil")
        cache = storage.NodeCache(tmp_path / "cache")
        with pytest.raises(EmberError, match=rf"{prefix}: refusing '{re.escape(evil)}': not a plain relative path"):
            cache.fetch_dir(bucket_uri(s3_server, prefix))
        assert victim.read_text() == "original"
        assert not (tmp_path / "cache" / "dirs").exists() or not any((tmp_path / "cache" / "dirs").rglob("config.json"))
    for bad in ("/etc/passwd", "../x", "a//b", "a/./b", "", "a\\b"):
        with pytest.raises(EmberError, match="not a plain relative path"):
            storage.relative_key(bad, "manifest.json")
    assert storage.relative_key("train/u-000.arrow", "manifest.json") == "train/u-000.arrow"


def test_a_reexported_model_dir_is_seen_whole_without_the_old_files(tmp_path, s3_server):
    """Same URI, same sizes, other bytes, one file fewer: the cache fetches the new objects (their listed
    modification time changed) and the new view lacks the file the new export lacks."""
    import time

    uri = bucket_uri(s3_server, f"reexport-{tmp_path.name}/model")
    first = {"config.json": b'{"v": 1}', "model.safetensors": b"1" * 100, "model.safetensors.index.json": b"{}"}
    for rel, data in first.items():
        storage.write_bytes(storage.join(uri, rel), data)
    cache = storage.NodeCache(tmp_path / "cache")
    old = cache.fetch_dir(uri)
    assert (old / "model.safetensors").read_bytes() == b"1" * 100
    time.sleep(1.1)  # the store lists modification times in whole seconds
    storage.delete(storage.join(uri, "model.safetensors.index.json"))
    storage.write_bytes(storage.join(uri, "model.safetensors"), b"2" * 100)
    storage.write_bytes(storage.join(uri, "config.json"), b'{"v": 2}')
    new = cache.fetch_dir(uri)
    assert sorted(p.name for p in new.iterdir()) == ["config.json", "model.safetensors"]
    assert (new / "model.safetensors").read_bytes() == b"2" * 100 and (new / "config.json").read_bytes() == b'{"v": 2}'
    assert (old / "model.safetensors").read_bytes() == b"1" * 100  # a process that opened v1 keeps what it opened


def test_the_default_cache_is_this_user_s_own_private_dir(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.delenv(storage.CACHE_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = storage.NodeCache()
    assert cache.directory == tmp_path / f"ember-cache-{os.getuid()}"
    assert cache.directory.stat().st_mode & 0o777 == 0o700
    cache.directory.chmod(0o777)  # a dir others may write: refused, naming it
    with pytest.raises(EmberError, match=rf"{cache.directory} belongs to uid {os.getuid()} with mode 777; .* "
                                         r"writable by no one else"):
        storage.NodeCache()
    with pytest.raises(EmberError, match="belongs to uid"):  # every user of the cache dir checks it
        storage.cache_dir()
    if os.getuid() == 0:  # another user's dir (root can make one here)
        cache.directory.chmod(0o700)
        os.chown(cache.directory, 12345, 12345)
        with pytest.raises(EmberError, match=r"belongs to uid 12345"):
            storage.NodeCache()


def test_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """Eight threads publish the same file at once: no write fails and the file is always one writer's whole."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "result.json"
    payloads = [bytes([65 + i]) * (1 << 16) for i in range(8)]

    def write(i):
        for _ in range(20):
            storage.write_bytes(target, payloads[i])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_the_node_cache_keeps_to_its_budget_evicting_the_least_recently_used(tmp_path, s3_server):
    import time

    uris = [bucket_uri(s3_server, f"budget-{tmp_path.name}/f{i}.bin") for i in range(3)]
    for uri in uris:
        storage.write_bytes(uri, b"x" * 1000)
    cache = storage.NodeCache(tmp_path / "cache", budget_bytes=2500)
    first = cache.fetch(uris[0]).path
    time.sleep(0.05)
    second = cache.fetch(uris[1]).path
    time.sleep(0.05)
    assert not cache.fetch(uris[0]).downloaded  # used again: now the most recent
    time.sleep(0.05)
    third = cache.fetch(uris[2]).path
    assert first.exists() and third.exists() and not second.exists()


def test_the_cli_names_a_missing_bucket_and_a_half_written_dataset_in_one_line(tmp_path, s3_server):
    """As a user meets them: `ember run` on the shipped specs with a bucket that does not exist, and pretraining on a
    bucket prefix whose tokenize job never finished (no manifest). Both fail before any Ray work, in one line, and
    nothing is written locally under a name that looks like the URI."""
    from conftest import REPO, run_ember

    bucket, endpoint, client = s3_server
    query = f"?endpoint_override={endpoint}&scheme=http"
    missing = run_ember("run", REPO / "jobs" / "tokenize-demo.yaml", "--set",
                        f"output.dir=s3://no-such-bucket/data/docs{query}", cwd=tmp_path, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: cannot write s3://no-such-bucket/data/docs/.ember/job.json: the bucket " \
                                     "does not exist; create it or fix the URI"
    assert endpoint not in missing.stderr + missing.stdout  # the query part of a URI is never printed
    client.put_object(Bucket=bucket, Key="half/docs/.ember/job.json", Body=b'{"identity": "x"}')
    half = run_ember("run", REPO / "jobs" / "pretrain-demo.yaml", "--set", f"data.dir=s3://{bucket}/half/docs{query}",
                     "--set", f"output.dir=s3://{bucket}/half/run{query}", cwd=tmp_path, timeout=120)
    assert half.returncode == 1
    assert half.stderr.strip() == f"error: not a dataset directory (no manifest.json): s3://{bucket}/half/docs (a " \
                                  "dataset is complete once its manifest is written: was its job stopped before the " \
                                  "end?)"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def locked_store():
    """An S3 API that checks credentials (moto's server with IAM enforced after its first 5 requests, which set up a
    bucket with one object and a user denied every S3 action): (endpoint, that user's key id, its secret)."""
    import socket
    import subprocess
    import sys
    import time

    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.time() < deadline, "moto's server did not start"
                time.sleep(0.1)
        kw = {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}
        boto3.client("s3", **kw).create_bucket(Bucket="locked")
        boto3.client("s3", **kw).put_object(Bucket="locked", Key="data/manifest.json", Body=b"{}")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="nobody")
        iam.put_user_policy(UserName="nobody", PolicyName="no-s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield f"127.0.0.1:{port}", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.kill()
        server.wait()


@pytest.mark.parametrize("who", ["wrong key", "no permission"])
@pytest.mark.parametrize("doing", ["read", "list", "write"])
def test_refused_credentials_and_denied_permission_are_told_apart(locked_store, who, doing, monkeypatch):
    endpoint, key_id, secret = locked_store
    key_id, secret = ("AKIAEMBERWRONGKEY000", "wrong") if who == "wrong key" else (key_id, secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    storage._filesystem.cache_clear()  # a client with these keys (one per process and URI otherwise)
    uri = f"s3://locked/data?endpoint_override={endpoint}&scheme=http"
    with pytest.raises(EmberError) as refused:
        {"read": lambda: storage.read_bytes(storage.join(uri, "manifest.json")),
         "list": lambda: storage.list_names(uri),
         "write": lambda: storage.write_bytes(storage.join(uri, "new.bin"), b"1")}[doing]()
    message = str(refused.value)
    where = "s3://locked/data" + {"read": "/manifest.json", "list": "", "write": "/new.bin"}[doing]
    assert message.startswith(f"cannot {doing} {where}: ")
    if who == "wrong key":
        assert message.endswith("the credentials were refused; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
                                "the node's instance profile) for this store")
    else:
        assert message.endswith("permission denied; grant this node's credentials access to it")
    assert secret not in message and key_id not in message


def test_no_credentials_at_all_is_told_as_such(locked_store, monkeypatch):
    """No key anywhere (none in the URI, the environment or ~/.aws; no instance profile to ask): the store's refusal,
    in whatever words, is told as missing credentials."""
    endpoint, _, _ = locked_store
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("EMBER_S3_RETRY_ATTEMPTS", "1")
    uri = f"s3://locked/data?endpoint_override={endpoint}&scheme=http&connect_timeout=4"  # a file system of its own
    for doing, call in (("read", lambda: storage.read_bytes(storage.join(uri, "manifest.json"))),
                        ("list", lambda: storage.list_names(uri))):
        with pytest.raises(EmberError) as refused:
            call()
        assert str(refused.value).startswith(f"cannot {doing} s3://locked/data")
        assert str(refused.value).endswith(": no credentials were found for this store; set AWS_ACCESS_KEY_ID / "
                                           "AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or the node's instance "
                                           "profile (or add anonymous=true to the URI for a public bucket)")


class FlakyStore:
    """A proxy in front of the S3 server that answers the first `failures` requests with 503 SlowDown (what S3 says
    when it throttles), then forwards every request; it counts what it saw."""

    def __init__(self, upstream: str, failures: int):
        import http.server
        import threading
        import urllib.request

        store = self
        self.failures, self.seen = failures, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                store.seen += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if store.seen <= store.failures:
                    reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply if self.command != "HEAD" else b"")
                    return
                request = urllib.request.Request(f"http://{upstream}{self.path}", data=body or None,
                                                 method=self.command, headers=dict(self.headers))
                try:
                    with urllib.request.urlopen(request, timeout=10) as r:
                        status, headers, reply = r.status, r.headers, r.read()
                except urllib.error.HTTPError as err:
                    status, headers, reply = err.code, err.headers, err.read()
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer carries the object's length, not its own (empty) body's.
                length = headers.get("Content-Length", "0") if self.command == "HEAD" else str(len(reply))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_transient_errors_are_retried_and_a_store_that_keeps_failing_is_named(s3_server, tmp_path, monkeypatch):
    bucket, endpoint, client = s3_server
    client.put_object(Bucket=bucket, Key=f"flaky-{tmp_path.name}/a.json", Body=b'{"ok": 1}')
    flaky, failing = FlakyStore(endpoint, failures=2), FlakyStore(endpoint, failures=10**6)
    try:
        uri = f"s3://{bucket}/flaky-{tmp_path.name}/a.json?endpoint_override={flaky.endpoint}&scheme=http"
        assert storage.read_json(uri) == {"ok": 1}  # two throttled answers, then the object
        assert flaky.seen > 2
        monkeypatch.setenv(storage.RETRY_ATTEMPTS_ENV, "3")  # a store met from now on: 3 attempts per request
        uri = f"s3://{bucket}/flaky-{tmp_path.name}/a.json?endpoint_override={failing.endpoint}&scheme=http"
        with pytest.raises(EmberError) as refused:
            storage.read_bytes(uri)
        assert str(refused.value) == f"cannot read s3://{bucket}/flaky-{tmp_path.name}/a.json: the store kept " \
                                     "failing (throttled or unavailable) through every retry; try again later, or " \
                                     "raise EMBER_S3_RETRY_ATTEMPTS"
        assert failing.seen == 3  # one request, tried three times
    finally:
        flaky.server.shutdown()
        failing.server.shutdown()


def test_a_torn_last_line_of_the_metrics_does_not_stop_a_resume(tmp_path):
    """A crash mid-append leaves half a row at the end of metrics.jsonl: the resume drops it (it is past the
    restored step) and goes on."""
    from ember.train.metrics import MetricsLog

    rows = "".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 4, "lo')
    log = MetricsLog(str(tmp_path), resumed_step=3)
    assert [r["step"] for r in log.rows] == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text() == rows
