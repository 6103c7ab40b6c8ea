"""A progress bar on stderr for long ``visionrpc predict`` runs: tqdm when installed."""

from __future__ import annotations

import sys
from typing import Any, Protocol


class ProgressReporter(Protocol):
    """Called as ``report(done, total)``; ``close()`` ends the line."""

    def __call__(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def __call__(self, done: int, total: int) -> None:
        return None

    def close(self) -> None:
        return None


class _TqdmBar:
    def __init__(self, total: int, tqdm: Any) -> None:
        self._bar = tqdm(total=total, unit="img", file=sys.stderr, desc="predict")

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class _PlainBar:
    """A one-line counter rewritten in place, for when tqdm is not installed."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        sys.stderr.write(f"\rpredict: {done}/{total} images ({percent}%)")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_reporter(total: int, *, enabled: bool) -> ProgressReporter:
    """A bar for ``total`` images, or a silent reporter when disabled or stderr is no terminal."""
    if not enabled or not sys.stderr.isatty():
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total)
    return _TqdmBar(total, tqdm)
