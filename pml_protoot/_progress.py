"""The package's one progress-bar policy."""
from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable, description: str, show: bool = True, **kwargs):
    """``tqdm`` over ``iterable``; with ``show``, drawn only where stderr is a terminal (tqdm's auto mode).

    A redirected stderr (a log file, CI) gets no carriage-return lines: the library's log lines
    (the trainer's epoch loss, the tester's domains, the feature extraction's size and time) keep
    the record there. ``kwargs`` go to ``tqdm`` (e.g. ``leave=False``).
    """
    return tqdm(iterable, desc=description, disable=None if show else True, **kwargs)
