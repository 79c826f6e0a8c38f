"""The Google Cloud Storage backend through google-cloud-storage (or the fake-gcs-server emulator)."""


from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from .base import SHA256_METADATA_KEY, Backend, ObjectExists, ObjectInfo
from .settings import _normalize_endpoint
from .uri import StorageURI

log = logging.getLogger(__name__)


# ---- GCS -------------------------------------------------------------------------------------------------------

# One client per configuration, shared by threads (as google-cloud-storage's own transfer_manager does), so
# application-default credentials are fetched once per process, not once per worker thread.
_GCS_CLIENTS: dict[tuple, Any] = {}
_GCS_LOCK = threading.Lock()


class GCSBackend(Backend):
    scheme = "gs"

    def endpoint(self) -> str | None:
        return self.settings.gcs_endpoint or _normalize_endpoint(os.environ.get("STORAGE_EMULATOR_HOST"))

    def client(self) -> Any:
        """A google-cloud-storage client: anonymous against an emulator, application-default credentials otherwise."""
        endpoint = self.endpoint()
        key = (endpoint, self.settings.gcs_project, os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))
        with _GCS_LOCK:
            c = _GCS_CLIENTS.get(key)
            if c is not None:
                return c
        from google.cloud import storage

        if endpoint:
            from google.auth.credentials import AnonymousCredentials

            c = storage.Client(project=self.settings.gcs_project or "editinfinity", credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": endpoint})
        else:
            c = storage.Client(project=self.settings.gcs_project)
        with _GCS_LOCK:
            if len(_GCS_CLIENTS) > 16:
                _GCS_CLIENTS.clear()
            _GCS_CLIENTS[key] = c
        return c

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def _blob(self, u: StorageURI, **kw: Any) -> Any:
        return self.client().bucket(u.bucket).blob(u.key, **kw)

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        b = self._blob(u)
        b.reload(timeout=self._timeout, retry=None)
        md5 = None
        if b.md5_hash:
            import base64

            md5 = base64.b64decode(b.md5_hash).hex()
        return ObjectInfo(uri=str(u), size=int(b.size or 0), etag=b.etag,
                          generation=str(b.generation) if b.generation is not None else None,
                          sha256=(b.metadata or {}).get(SHA256_METADATA_KEY), md5=md5, crc32c=b.crc32c)

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        # Pin the generation we stat-ed: a concurrent overwrite then fails with 412 and is retried from stat.
        gen = int(info.generation) if info is not None and info.generation else None
        self._blob(u).download_to_filename(str(dest), timeout=self._timeout, retry=None, checksum="auto",
                                           if_generation_match=gen)

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        # Above the threshold: resumable upload in chunks of gcs_chunk_size.
        chunk = self.settings.gcs_chunk_size if size > self.settings.multipart_threshold else None
        b = self._blob(u, chunk_size=chunk)
        b.metadata = metadata
        b.upload_from_filename(str(src), timeout=self._timeout, retry=None)

    def get_bytes(self, u: StorageURI) -> bytes:
        return self._blob(u).download_as_bytes(timeout=self._timeout, retry=None)

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        b = self._blob(u)
        b.metadata = metadata
        b.upload_from_string(data, content_type="application/octet-stream", timeout=self._timeout, retry=None)

    def create_bytes(self, u: StorageURI, data: bytes) -> None:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self._blob(u).upload_from_string(data, content_type="application/json", timeout=self._timeout,
                                             retry=None, if_generation_match=0)
        except PreconditionFailed:
            raise ObjectExists(str(u)) from None

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        prefix = u.dir_prefix()
        out = []
        for b in self.client().list_blobs(u.bucket, prefix=prefix or None, max_results=limit,
                                          timeout=self._timeout, retry=None):
            out.append(ObjectInfo(uri=f"gs://{u.bucket}/{b.name}", size=int(b.size or 0), etag=b.etag,
                                  generation=str(b.generation) if b.generation is not None else None,
                                  sha256=(b.metadata or {}).get(SHA256_METADATA_KEY), crc32c=b.crc32c,
                                  rel=b.name[len(prefix):]))
        return out

    def delete_object(self, u: StorageURI) -> None:
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            self._blob(u).delete(timeout=self._timeout, retry=None)

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self.client().bucket(bucket).exists(timeout=self._timeout, retry=None))

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        import google.auth.exceptions as gauth
        import requests
        from google.api_core import exceptions as gx
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

        def by_status(status: int, detail: str) -> tuple[str, str]:
            if status == 404:
                return "not_found", detail
            if status == 401:
                return "credentials", detail
            if status == 403:
                return "forbidden", detail
            if status in (408, 412, 429) or status >= 500:
                return "transient", detail
            if status == 400:
                return "invalid", detail
            return "other", detail

        if isinstance(exc, gx.GoogleAPICallError):
            return by_status(int(exc.code or 0), f"HTTP {exc.code}: {exc.message}")
        if isinstance(exc, DataCorruption):
            return "integrity", str(exc)
        if isinstance(exc, InvalidResponse):
            status = int(getattr(getattr(exc, "response", None), "status_code", 0) or 0)
            return by_status(status, f"HTTP {status}: {exc}")
        if isinstance(exc, (gauth.DefaultCredentialsError, gauth.RefreshError)):
            return "credentials", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, gauth.TransportError):
            return "unreachable", str(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            return "tls", str(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return "unreachable", str(exc)
        if isinstance(exc, requests.exceptions.ConnectionError):
            text = str(exc)
            if any(t in text for t in ("NewConnectionError", "Failed to establish", "Connection refused",
                                       "Name or service not known", "nodename nor servname")):
                return "unreachable", text
            return "transient", text
        if isinstance(exc, (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        return super().classify(exc)

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        ep = self.endpoint()
        if kind == "credentials":
            return ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or run `gcloud auth "
                    "application-default login`); on GKE use Workload Identity; for an emulator set "
                    "STORAGE_EMULATOR_HOST")
        if kind == "no_bucket":
            return (f"create the bucket (gcloud storage buckets create gs://{u.bucket}) or correct the bucket name "
                    f"{u.bucket!r} in the URI" + (f"; the emulator in use is STORAGE_EMULATOR_HOST={ep}" if ep else ""))
        if kind == "forbidden":
            role = "roles/storage.objectViewer" if op in ("download", "read", "stat", "list") else \
                "roles/storage.objectAdmin"
            return f"grant {role} on gs://{u.bucket} to the service account in use, or use other credentials"
        if kind == "unreachable":
            return (f"could not connect to {ep or 'storage.googleapis.com'}: check STORAGE_EMULATOR_HOST (now "
                    f"{ep or 'unset'}), that the server is running, and the network/proxy settings (HTTPS_PROXY, "
                    "NO_PROXY)")
        if kind == "tls":
            return "check the scheme (http vs https) in STORAGE_EMULATOR_HOST and the CA bundle (REQUESTS_CA_BUNDLE)"
        return super().fix(kind, u, op)
