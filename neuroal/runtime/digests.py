"""Full-file SHA-256 digests of input files, cached by file identity (the resume key).

A 70B checkpoint is about 138 GB: hashing it takes minutes, so a digest is computed once per
file version and remembered in ``<cache dir>/digests.json`` under the file's identity
``(real path, device, inode, size, mtime_ns, ctime_ns)``. Any write to the file changes its
mtime and ctime (the ctime cannot be set back by the user: ``touch -d`` changes it too), a
replaced file has another inode, so a cached digest is only reused for the very same bytes.

Standard library only; the cache is advisory: an unreadable or corrupt cache is ignored (the
files are hashed again), an unwritable one is logged once and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

CACHE_NAME = "digests.json"
MAX_ENTRIES = 20_000  # oldest entries dropped beyond this (a few MB of JSON at most)
_CHUNK = 16 << 20  # 16 MiB reads; hashlib releases the GIL on large updates
_LOCK = threading.Lock()
_warned: set[str] = set()


def default_cache_dir() -> Path:
    """``$NEUROAL_CACHE`` or ``~/.cache/neuroal``."""
    return Path(os.environ.get("NEUROAL_CACHE") or Path.home() / ".cache" / "neuroal")


def file_identity(path: str | Path) -> str:
    """The cache key of a file version: real path, device, inode, size, mtime_ns, ctime_ns."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return f"{real}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def stream_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache: Path) -> dict[str, str]:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return {k: v for k, v in (entries or {}).items()
            if isinstance(k, str) and isinstance(v, str) and len(v) == 64}


def _write_cache(cache: Path, entries: dict[str, str]) -> None:
    """Atomic rewrite (temp file + rename); concurrent runs lose entries, never the file."""
    keep = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.part")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": 1, "entries": keep}))
        os.replace(tmp, cache)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if str(cache) not in _warned:
            _warned.add(str(cache))
            log.warning("cannot write the digest cache %s (%s): input files will be hashed "
                        "again by the next run", cache, exc)


def file_digests(paths: Iterable[str | Path], cache_dir: str | Path | None = None,
                 threads: int = 4) -> dict[str, str]:
    """``str(path) -> SHA-256 hex`` of each file's full content, reusing cached digests of
    unchanged files; the others are hashed (``threads`` files at a time) and cached.

    Args:
        paths: Regular files to hash.
        cache_dir: Where ``digests.json`` lives (default :func:`default_cache_dir`).
        threads: Files hashed concurrently.

    Raises:
        OSError: A file cannot be read (named by the OS error).
    """
    paths = [Path(p) for p in paths]
    cache = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    keys = {p: file_identity(p) for p in paths}
    with _LOCK:
        known = _read_cache(cache)
    todo = [p for p in paths if keys[p] not in known]
    if todo:
        size = sum(p.stat().st_size for p in todo)
        if size > 1 << 30:
            log.info("hashing %d input file(s), %.1f GB, once (cached in %s)", len(todo),
                     size / 1e9, cache)
        with ThreadPoolExecutor(max(1, min(threads, len(todo)))) as pool:
            fresh = dict(zip(todo, pool.map(stream_sha256, todo), strict=True))
        with _LOCK:
            known = _read_cache(cache)
            for p, digest in fresh.items():
                if file_identity(p) == keys[p]:  # unchanged while it was read
                    known.pop(keys[p], None)
                    known[keys[p]] = digest
            _write_cache(cache, known)
        return {str(p): fresh[p] if p in fresh else known[keys[p]] for p in paths}
    return {str(p): known[keys[p]] for p in paths}
