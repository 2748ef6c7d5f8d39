"""The one progress display of the command-line tools (`retry`, `dead-letters replay|purge`,
`reconciler-sample`): how far a long operation got, on stderr.

On a terminal, one line redrawn in place at every step. Elsewhere (a pipe, a file, journald), where
carriage-return redraws are noise: a plain line at most every `every` seconds (never, when None),
and a last one at the end. What the line says is the caller's (`describe`).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, describe: Callable[[], str], every: float | None = None, stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.describe, self.every, self.quiet = describe, every, quiet
        self.stream = stream or sys.stderr
        self.redraw = not quiet and self.stream.isatty()
        self.finished = False
        self._drawn = False
        self._shown = time.monotonic()

    def step(self) -> None:
        """Something was done: show where the operation stands, if it is time to."""
        if self.quiet:
            return
        if self.redraw:
            self.stream.write(f"\r{self.describe()}")
            self.stream.flush()
            self._drawn = True
        elif self.every is not None and time.monotonic() - self._shown >= self.every:
            self._line()

    def finish(self) -> None:
        """End the display (once: later calls do nothing): the redrawn line's newline, or a last line."""
        if self.finished or self.quiet:
            self.finished = True
            return
        self.finished = True
        if self.redraw:
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()
        elif self.every is not None:
            self._line()

    def _line(self) -> None:
        self._shown = time.monotonic()
        print(self.describe(), file=self.stream, flush=True)
