"""One run at a time into a remote ``--out`` (docs/reliability.md): the claim object is made with a conditional create
(S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) against the loopback servers of test_storage.py (moto with
authentication, fake-gcs-server), so a second run into the same prefix fails instead of both publishing."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid

import pytest

from editinfinity import storage
from editinfinity.errors import OutputError
from editinfinity.outputs import claim_output
from editinfinity.remote_outputs import CLAIM_NAME, claim_remote, release_remote
from test_storage import BUCKET, gcs, s3  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["s3", "gs"])
def prefix(request) -> str:
    request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return f"{request.param}://{BUCKET}/claims-{uuid.uuid4().hex[:8]}"


def _names(uri: str) -> list[str]:
    return sorted(o.rel for o in storage.list_objects(uri))


def test_a_second_run_into_one_remote_out_fails_and_the_first_publishes(prefix):
    with claim_output(prefix) as tmp:
        (tmp / "summary.json").write_text(json.dumps({"run_id": "first", "spec": {}}))
        assert _names(prefix) == [CLAIM_NAME]
        with pytest.raises(OutputError, match="another editinfinity run .* is writing --out"):
            with claim_output(prefix, overwrite=True):
                pytest.fail("the second run was let in")
    assert CLAIM_NAME not in _names(prefix) and "summary.json" in _names(prefix)
    with pytest.raises(OutputError, match="already holds a result"):
        with claim_output(prefix):
            pass
    with claim_output(prefix, overwrite=True) as tmp:  # once the first is done, --overwrite replaces it
        (tmp / "summary.json").write_text(json.dumps({"run_id": "second", "spec": {}}))
    assert json.loads(storage.read_bytes(f"{prefix}/summary.json"))["run_id"] == "second"
    assert CLAIM_NAME not in _names(prefix)


def test_of_runs_starting_together_exactly_one_claims(prefix):
    from editinfinity.remote_outputs import _read_claim

    won, lost = [], []
    start = threading.Barrier(6)

    def run() -> None:
        start.wait()
        try:
            won.append(claim_remote(storage.parse_uri(prefix)))
        except OutputError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    assert _read_claim(storage.parse_uri(prefix).join(CLAIM_NAME))["token"] == won[0]
    release_remote(storage.parse_uri(prefix), "not-its-token")  # only the holder's token removes it
    assert _names(prefix) == [CLAIM_NAME]
    release_remote(storage.parse_uri(prefix), won[0])
    assert _names(prefix) == []


def test_a_failed_run_releases_its_claim_and_publishes_nothing(prefix):
    with pytest.raises(RuntimeError):
        with claim_output(prefix) as tmp:
            (tmp / "summary.json").write_text("{}")
            raise RuntimeError("the edit failed")
    assert _names(prefix) == []


def test_a_killed_runs_claim_is_removed_here_and_reported_from_another_host(prefix):
    from editinfinity.outputs import _host

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    claim = f"{prefix}/{CLAIM_NAME}"
    storage.write_bytes(claim, json.dumps({"pid": int(gone.stdout), "host": _host(), "token": "x"}).encode())
    with claim_output(prefix) as tmp:  # this host's claim of a process that is gone: removed, and the run goes on
        (tmp / "summary.json").write_text(json.dumps({"run_id": "r", "spec": {}}))
    assert "summary.json" in _names(prefix) and CLAIM_NAME not in _names(prefix)
    storage.write_bytes(claim, json.dumps({"pid": 1, "host": "elsewhere", "token": "x", "created": "t"}).encode())
    with pytest.raises(OutputError, match=f"pid 1 on elsewhere.*delete {claim}"):
        with claim_output(prefix, overwrite=True):
            pass
    assert CLAIM_NAME in _names(prefix)  # someone else's claim is never removed
