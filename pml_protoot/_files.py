"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""
from __future__ import annotations

import contextlib
import os
import secrets


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Yield a file object opened with ``mode`` whose content replaces ``path`` on success.

    The content goes to a hidden temporary file in ``path``'s folder (created if missing),
    is flushed to disk and moved onto ``path`` with ``os.replace``; on any error the
    temporary file is removed and ``path`` keeps its previous content. The file gets the
    permissions of any new file (0o666 less the process umask), unlike ``mkstemp``'s 0o600.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
