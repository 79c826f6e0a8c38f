"""Storage settings: endpoints, timeouts and retry bounds, from the environment or given."""


from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from editinfinity.errors import StorageError

log = logging.getLogger(__name__)

MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} is not a number: set it to e.g. {default}") from None


def _normalize_endpoint(url: str | None) -> str | None:
    if not url:
        return None
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


@dataclass(frozen=True)
class StorageSettings:
    """How to reach the stores and how hard to try. ``from_env()`` fills endpoints and limits from the environment.

    Timeouts are per connection attempt / per socket read. Retries cover transient errors only and stop after
    ``max_attempts`` attempts (``max_unreachable_attempts`` when the endpoint refuses connections) or when the next
    backoff would pass ``retry_deadline`` seconds since the first attempt.
    """

    s3_endpoint_url: str | None = None
    gcs_endpoint: str | None = None
    gcs_project: str | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    max_unreachable_attempts: int = 3
    max_integrity_attempts: int = 2
    retry_deadline: float = 30.0
    backoff_initial: float = 0.25
    backoff_max: float = 4.0
    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    gcs_chunk_size: int = 8 * MiB  # a multiple of 256 KiB (GCS resumable-upload rule)
    max_concurrency: int = 4

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageSettings:
        """Settings from ``EDITINFINITY_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
        ``STORAGE_EMULATOR_HOST``, ``GOOGLE_CLOUD_PROJECT`` and ``EDITINFINITY_STORAGE_{CONNECT_TIMEOUT,READ_TIMEOUT,
        MAX_ATTEMPTS,RETRY_DEADLINE}``; keyword overrides win."""
        values: dict[str, Any] = {
            "s3_endpoint_url": _env_s3_endpoint(),
            "gcs_endpoint": _normalize_endpoint(os.environ.get("STORAGE_EMULATOR_HOST")),
            "gcs_project": os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCLOUD_PROJECT"),
            "connect_timeout": _env_float("EDITINFINITY_STORAGE_CONNECT_TIMEOUT", cls.connect_timeout),
            "read_timeout": _env_float("EDITINFINITY_STORAGE_READ_TIMEOUT", cls.read_timeout),
            "max_attempts": int(_env_float("EDITINFINITY_STORAGE_MAX_ATTEMPTS", cls.max_attempts)),
            "retry_deadline": _env_float("EDITINFINITY_STORAGE_RETRY_DEADLINE", cls.retry_deadline),
        }
        values.update(overrides)
        s = cls(**values)
        if s.gcs_chunk_size % (256 * 1024):
            raise StorageError(f"gcs_chunk_size={s.gcs_chunk_size} must be a multiple of 256 KiB")
        return s


def _env_s3_endpoint() -> str | None:
    for name in ("EDITINFINITY_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return _normalize_endpoint(os.environ[name])
    return None


def resolve_settings(settings: StorageSettings | None) -> StorageSettings:
    return settings if settings is not None else StorageSettings.from_env()
