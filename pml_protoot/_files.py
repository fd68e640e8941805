"""Files the package writes and reads: atomic writes (a reader sees the old file or the new one,
never a partial one) and tensor-only loading."""
from __future__ import annotations

import contextlib
import os
import pickle
import secrets
from pathlib import Path

import torch


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
        try:
            file = os.fdopen(handle, mode)
        except BaseException:  # e.g. a bad mode: the descriptor is still ours to close
            os.close(handle)
            raise
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def check_creatable(name: str, path, folder: bool) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``path`` is (or can be made) a folder (``folder``) or a
    file in a writable folder: checked before the work whose result it would receive."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{name} {str(path)!r} is {'a file' if folder else 'a folder'}, expected a "
                         f"{'folder' if folder else 'file name'}")
    # An existing file is replaced: its folder is what must be writable (the root always exists).
    candidates = path.parents if path.is_file() else (path, *path.parents)
    existing = next(parent for parent in candidates if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r} cannot be created: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{name} {str(path)!r} cannot be created: {str(existing)!r} is not writable")


def load_saved(path, what: str, remedy: str | None = None):
    """``torch.load`` of ``path`` on the CPU, tensors and containers only (``weights_only``).

    Args:
        remedy: what the error for a file ``torch.save`` did not write says to do; by default, to save a
            model's ``state_dict()`` (a whole pickled model is refused).

    Raises:
        ValueError: a file ``torch.save`` did not write, named as ``what``.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:  # a missing or unreadable file raises its OSError here
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle, zip and torch errors alike; a truncated zip raises OSError
            raise _not_saved_tensors(path, what, err, remedy) from err


def _not_saved_tensors(path, what: str, err: Exception, remedy: str | None) -> ValueError:
    # torch's own message is pages of advice on weights_only: the exception's name says enough
    if remedy is None and isinstance(err, pickle.UnpicklingError):
        remedy = "a whole pickled model is refused too (it runs code on loading): save model.state_dict()"
    return ValueError(
        f"{what} {os.fspath(path)!r} is not a file of tensors saved with torch.save ({type(err).__name__})"
        + (f"; {remedy}" if remedy else "")
    )
