"""The tuner's on-disk cache: one small JSON file per choice made, in :func:`directory`.

An entry's key is the choice point's name, the machine (CPU model and architecture), the jax
and jaxlib versions, and the choice point's own key (shapes, dtypes, arguments); its file name
is a hash of that key. A file is written to a temporary name in the same directory and renamed
over its final name (``os.replace``, atomic): several processes sharing the directory never read
half a file; two that measure the same choice at once both write a valid entry and the last one
stays. A file that cannot be read or parsed is ignored (the choice is measured again).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile

import jax
import jaxlib

from fnn.tuning._settings import STATE, default_dir

__all__ = ["machine", "full_key", "canonical", "directory", "load", "store", "entries", "clear"]


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What a measurement depends on besides its shapes: ``{"cpu", "arch", "jax", "jaxlib"}``."""
    return {"cpu": _cpu_model(), "arch": platform.machine(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__}


def full_key(point: str, key) -> dict:
    """The cache key of choice point ``point`` at ``key`` (JSON-able) on this machine."""
    return {"point": point, **machine(), "key": key}


def canonical(k: dict) -> str:
    """``k`` as canonical JSON (sorted keys): what entries are compared and hashed by."""
    return json.dumps(k, sort_keys=True, separators=(",", ":"), default=str)


def directory() -> str:
    """The cache directory (``fnn.tuning.settings(directory=...)``, else ``$FNN_TUNE_DIR``,
    else ``~/.cache/fnn/tune``)."""
    return STATE.directory or default_dir()


def _path(k: dict) -> str:
    digest = hashlib.sha256(canonical(k).encode()).hexdigest()[:32]
    point = "".join(c if c.isalnum() or c in "._-" else "_" for c in k["point"])
    return os.path.join(directory(), f"{point}-{digest}.json")


def load(k: dict) -> dict | None:
    """The entry stored for key ``k``, or ``None`` (none, unreadable, or another key's)."""
    try:
        with open(_path(k), encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or canonical(entry.get("key", {})) != canonical(k):
        return None
    return entry


def store(k: dict, entry: dict) -> str | None:
    """Write ``entry`` (with ``"key": k``) atomically; returns its path, or ``None`` when the
    directory cannot be written (the choice then lives for this process only)."""
    path = _path(k)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**entry, "key": k}, f, indent=1, sort_keys=True, default=str)
            os.replace(tmp, path)
        except BaseException:
            with _quiet():
                os.unlink(tmp)
            raise
    except OSError:
        return None
    return path


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, OSError)


def entries() -> list[dict]:
    """Every readable entry in the cache directory (any machine), sorted by choice point."""
    out = []
    try:
        names = sorted(os.listdir(directory()))
    except OSError:
        return out
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            try:
                with open(os.path.join(directory(), name), encoding="utf-8") as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("key"), dict):
                out.append(entry)
    return sorted(out, key=lambda e: (e["key"].get("point", ""), canonical(e["key"])))


def clear() -> int:
    """Delete the cache directory's entries; returns how many were deleted."""
    n = 0
    try:
        names = os.listdir(directory())
    except OSError:
        return 0
    for name in names:
        if name.endswith(".json"):
            with _quiet():
                os.unlink(os.path.join(directory(), name))
                n += 1
    return n
