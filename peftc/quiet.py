"""One context manager that keeps library noise out of peftc's output.

Tracing, exporting and loading checkpoints make torch, onnxscript and
transformers log specialisation notes, emit warnings and draw progress bars that
say nothing to a peftc user (a failure is reported by peftc itself). Each caller
names the loggers it wants silenced. This module imports nothing from peftc.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings as _warnings
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def quiet(loggers: Iterable[str] = (), level: int = logging.ERROR, warnings: bool = True,
          hf_progress: bool = False) -> Iterator[None]:
    """Raise ``loggers`` to ``level`` for the duration of the block, and restore their levels after.

    Arguments:
        loggers: names for :func:`logging.getLogger`.
        level: the least severe record that still gets through.
        warnings: also ignore every Python warning inside the block.
        hf_progress: also hide transformers' progress bars (only if transformers
            is imported already: this never imports it).
    """
    with contextlib.ExitStack() as stack:
        for logger in {logging.getLogger(name) for name in loggers}:
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(level)
        if warnings:
            stack.enter_context(_warnings.catch_warnings())
            _warnings.simplefilter("ignore")
        hf_logging = sys.modules.get("transformers.utils.logging") if hf_progress else None
        if hf_logging is not None and hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            stack.callback(hf_logging.enable_progress_bar)
        yield


def hide_progress(progress: bool | None, n: int) -> bool:
    """Whether a progress bar over ``n`` items stays hidden: as ``progress`` says, or by default
    unless there are 64 items or more."""
    return not progress if progress is not None else n < 64
