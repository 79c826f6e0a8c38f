"""The local-filesystem backend (plain paths and ``file://``)."""


from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from .base import Backend, ObjectExists, ObjectInfo, _atomic_write
from .uri import StorageURI

log = logging.getLogger(__name__)


class LocalBackend(Backend):
    scheme = "file"

    def stat_object(self, u: StorageURI) -> ObjectInfo:
        st = os.stat(u.key)
        if not os.path.isfile(u.key):
            raise IsADirectoryError(21, "is a directory", u.key)
        return ObjectInfo(uri=u.key, size=st.st_size, generation=str(st.st_mtime_ns))

    def download_object(self, u: StorageURI, dest: Path, info: ObjectInfo | None = None) -> None:
        shutil.copyfile(u.key, dest)

    def upload_file(self, src: Path, u: StorageURI, size: int, metadata: dict[str, str]) -> None:
        _atomic_write(Path(u.key), lambda tmp: shutil.copyfile(src, tmp))

    def get_bytes(self, u: StorageURI) -> bytes:
        return Path(u.key).read_bytes()

    def put_bytes(self, u: StorageURI, data: bytes, metadata: dict[str, str]) -> None:
        _atomic_write(Path(u.key), lambda tmp: tmp.write_bytes(data))

    def create_bytes(self, u: StorageURI, data: bytes) -> None:
        dest = Path(u.key)
        tmp = dest.with_name(f".{dest.name}.create-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.write_bytes(data)
            os.link(tmp, dest)  # fails on an existing name: the whole file appears at once, or nothing
        except FileExistsError:
            raise ObjectExists(str(dest)) from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def list_objects(self, u: StorageURI, limit: int | None = None) -> list[ObjectInfo]:
        root = Path(u.key)
        if not root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(root):
            for fname in files:
                p = Path(dirpath, fname)
                if p.is_file():
                    st = p.stat()
                    out.append(ObjectInfo(uri=str(p), size=st.st_size, generation=str(st.st_mtime_ns),
                                          rel=p.relative_to(root).as_posix()))
        return sorted(out, key=lambda o: o.rel)

    def delete_object(self, u: StorageURI) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(u.key)

    def classify(self, exc: BaseException) -> tuple[str, str] | None:
        if isinstance(exc, FileNotFoundError):
            return "not_found", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, PermissionError):
            return "forbidden", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
            return "invalid", f"{exc.strerror}: {exc.filename}"
        if isinstance(exc, OSError):
            return "other", f"{exc.strerror or exc}: {exc.filename}"
        return None

    def fix(self, kind: str, u: StorageURI, op: str) -> str:
        if kind == "forbidden":
            return "check the file permissions and that the folder is writable (or choose another path)"
        if kind == "invalid":
            return "a directory is where a file is expected or the reverse; use download_dir/upload_dir for folders"
        if kind == "other":
            return "check free disk space (set EDITINFINITY_CACHE / TMPDIR to a larger disk) and the path"
        return super().fix(kind, u, op)
