"""Progress bars that suit where they are shown.

On a terminal: an ordinary tqdm bar, redrawn in place. Anywhere else (a log file, a pipe, CI): the
same bar written as a plain line every ``OCCFACE_PROGRESS_SECONDS`` seconds (default 30) and once
at the end, instead of a carriage-return redraw per step that fills a log with hundreds of
kilobytes of partial lines.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_SECONDS = 30.0


class _LineStream:
    """A file-like wrapper that turns tqdm's in-place redraws (``"\\r" + status``) into lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:  # closing a bar redraws its last state
            self.stream.write(line + "\n")
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable | None = None, *, stream: IO[str] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` drawn on ``stream`` (default: stderr) in place on a terminal,
    or as an occasional plain line anywhere else (update postfixes with ``refresh=False``, or each
    one forces a line)."""
    stream = stream if stream is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    interval = float(os.environ.get("OCCFACE_PROGRESS_SECONDS", LOG_INTERVAL_SECONDS))
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, file=_LineStream(stream), mininterval=interval, maxinterval=interval, ncols=100,
                ascii=True, **kwargs)
