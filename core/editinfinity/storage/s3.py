"""The S3 backend (AWS, MinIO, Ceph) through boto3."""


from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from .base import SHA256_METADATA_KEY, Backend, ObjectExists, ObjectInfo
from .settings import _env_s3_endpoint
from .uri import StorageURI

log = logging.getLogger(__name__)


# ---- S3 --------------------------------------------------------------------------------------------------------

_S3_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_S3_CRED_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "MissingSecurityHeader", "UnrecognizedClientException",
    "InvalidSecurity", "RequestTimeTooSkewed", "401",
}
_S3_FORBIDDEN_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_S3_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_S3_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "BandwidthLimitExceeded", "PreconditionFailed",
    "OperationAborted", "XAmzContentSHA256Mismatch", "BadDigest", "ConditionalRequestConflict",
}
_S3_CLIENTS: dict[tuple, Any] = {}
_S3_LOCK = threading.Lock()


class S3Backend(Backend):
    scheme = "s3"

    def endpoint(self) -> str | None:
        return self.settings.s3_endpoint_url or _env_s3_endpoint()

    def client(self) -> Any:
        """A boto3 S3 client for the current endpoint and credential environment (cached; clients are thread-safe)."""
        s = self.settings
        creds = hashlib.sha256("\0".join(os.environ.get(k) or "" for k in _S3_CRED_ENV).encode()).hexdigest()
        key = (self.endpoint(), s.connect_timeout, s.read_timeout, s.max_concurrency, creds)
        with _S3_LOCK:
            c = _S3_CLIENTS.get(key)
            if c is not None:
                return c
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint()
        cfg = Config(
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
            retries={"total_max_attempts": 1},  # our retry loop bounds count and time; no hidden retries below it
            max_pool_connections=max(10, 2 * s.max_concurrency),
            # MinIO/Ceph/moto behind a plain host:port need path-style addressing.
            s3={"addressing_style": "path"} if endpoint else {},
        )
        session = boto3.session.Session()
        region = session.region_name or ("us-east-1" if endpoint else None)
        c = session.client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
        with _S3_LOCK:
            if len(_S3_CLIENTS) > 16:
                _S3_CLIENTS.clear()
            _S3_CLIENTS[key] = c
        return c

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        s = self.settings
        return TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        r = self.client().head_object(Bucket=u.bucket, Key=u.key)
        etag = (r.get("ETag") or "").strip('"') or None
        md5 = etag if etag and "-" not in etag and re.fullmatch(r"[0-9a-f]{32}", etag) else None
        return ObjectInfo(uri=str(u), size=int(r["ContentLength"]), etag=etag, generation=r.get("VersionId"),
                          sha256=(r.get("Metadata") or {}).get(SHA256_METADATA_KEY), md5=md5)

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        self.client().download_file(u.bucket, u.key, str(dest), Config=self._transfer_config())

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        self.client().upload_file(str(src), u.bucket, u.key, ExtraArgs={"Metadata": metadata},
                                  Config=self._transfer_config())

    def get_bytes(self, u: StorageURI) -> bytes:
        return self.client().get_object(Bucket=u.bucket, Key=u.key)["Body"].read()

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        self.client().put_object(Bucket=u.bucket, Key=u.key, Body=data, Metadata=metadata)

    def create_bytes(self, u: StorageURI, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().put_object(Bucket=u.bucket, Key=u.key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectExists(str(u)) from None
            raise

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        prefix = u.dir_prefix()
        out = []
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=u.bucket, Prefix=prefix, PaginationConfig={"MaxItems": limit} if limit else {})
        for page in pages:
            for o in page.get("Contents", []):
                etag = (o.get("ETag") or "").strip('"') or None
                out.append(ObjectInfo(uri=f"s3://{u.bucket}/{o['Key']}", size=int(o["Size"]), etag=etag,
                                      rel=o["Key"][len(prefix):]))
        return out

    def delete_object(self, u: StorageURI) -> None:
        self.client().delete_object(Bucket=u.bucket, Key=u.key)

    def bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client().head_bucket(Bucket=bucket)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    def refine(self, kind: str, u: StorageURI) -> tuple[str, str]:
        if kind == "forbidden":
            # HEAD answers carry no error body: a bare 403 may be a bad key. A listing call says which.
            from botocore.exceptions import ClientError

            try:
                self.client().list_objects_v2(Bucket=u.bucket, Prefix=u.key, MaxKeys=1)
            except ClientError as e:
                err = e.response.get("Error", {})
                if err.get("Code") in _S3_CRED_CODES:
                    return "credentials", f"a listing call said {err.get('Code')}: {err.get('Message', '')}"
            except Exception:  # best effort: keep the original diagnosis
                pass
            return kind, ""
        return super().refine(kind, u)

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            detail = f"{code or status}: {err.get('Message', '')} (HTTP {status})".strip()
            if code == "NoSuchBucket":
                return "no_bucket", detail
            if code in _S3_CRED_CODES:
                return "credentials", detail
            if code in _S3_FORBIDDEN_CODES:
                return "forbidden", detail
            if code in _S3_NOT_FOUND_CODES:
                return "not_found", detail
            if code in _S3_TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient", detail
            if code in ("InvalidBucketName", "InvalidArgument", "KeyTooLongError", "InvalidRequest"):
                return "invalid", detail
            return "other", detail
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                            bx.ProfileNotFound)):
            return "credentials", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, bx.SSLError):
            return "tls", str(exc)
        if isinstance(exc, (bx.EndpointConnectionError, bx.ProxyConnectionError)):  # incl. ConnectTimeoutError
            return "unreachable", str(exc)
        if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, bx.FlexibleChecksumError)):
            return "transient", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, bx.NoRegionError):
            return "invalid", f"{exc} (set AWS_DEFAULT_REGION)"
        if isinstance(exc, bx.BotoCoreError):
            return "other", f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "S3UploadFailedError":
            return "other", str(exc)
        if isinstance(exc, ValueError) and "endpoint" in str(exc).lower():
            return "invalid", f"{exc} (check AWS_ENDPOINT_URL / EDITINFINITY_S3_ENDPOINT)"
        return super().classify(exc)

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        ep = self.endpoint()
        where = f"the S3 endpoint {ep}" if ep else "AWS S3"
        if kind == "credentials":
            return (
                f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or "
                f"AWS_PROFILE, to credentials valid for {where}; on EKS use IRSA/pod identity; in KFP mount the "
                "credential Secret as these environment variables"
            )
        if kind == "no_bucket":
            mb = f"aws s3 mb s3://{u.bucket}" + (f" --endpoint-url {ep}" if ep else "")
            return (f"create the bucket ({mb}) or correct the bucket name {u.bucket!r} in the URI; check that "
                    f"AWS_ENDPOINT_URL points at the right server (now {ep or 'unset: AWS'})")
        if kind == "forbidden":
            action = {"download": "s3:GetObject", "read": "s3:GetObject", "stat": "s3:GetObject",
                      "list": "s3:ListBucket"}.get(op, "s3:PutObject/s3:DeleteObject")
            return (f"the credentials are valid but may not do this: grant {action} (and s3:ListBucket) on "
                    f"arn:aws:s3:::{u.bucket}/* in the IAM or bucket policy, or use other credentials")
        if kind == "unreachable":
            return (f"could not connect to {ep or 'the AWS S3 endpoint'}: check AWS_ENDPOINT_URL / "
                    f"EDITINFINITY_S3_ENDPOINT (now {ep or 'unset'}), that the server is running, and the network/"
                    "proxy settings (HTTPS_PROXY, NO_PROXY)")
        if kind == "tls":
            return ("check the endpoint's scheme (http vs https) in AWS_ENDPOINT_URL and the CA bundle "
                    "(AWS_CA_BUNDLE) for self-signed MinIO/Ceph certificates")
        return super().fix(kind, u, op)
