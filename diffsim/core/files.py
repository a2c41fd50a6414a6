"""Files that a crash cannot leave half written: long runs save their state through these."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "write_json_atomic"]


@contextmanager
def atomic_file(path: Path, mode: str = "w", **options):
    """A file opened beside ``path`` that replaces it only once fully written and synced: a crash
    mid-write leaves the previous file intact (and no temporary file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # also on KeyboardInterrupt
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON through :func:`atomic_file`."""
    with atomic_file(path) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
